"""SAM 2 / 2.1 (Ravi et al. 2024): the Hiera trunk, the FPN neck, the decoder's SAM 2
differences, the memory attention and memory encoder, and the `Sam2` model (one image step and
one tracking step per frame). The video tracker built on it is `sam.video`; the registry entries
(sam2_hiera_*, sam2.1_hiera_*) are in `sam.build`."""

from .decoder import Sam2MaskDecoder, Sam2PromptEncoder
from .hiera import Hiera
from .memory import MemoryAttention, MemoryEncoder
from .model import Sam2
from .neck import FpnNeck, Sam2ImageEncoder

__all__ = [
    "FpnNeck",
    "Hiera",
    "MemoryAttention",
    "MemoryEncoder",
    "Sam2",
    "Sam2ImageEncoder",
    "Sam2MaskDecoder",
    "Sam2PromptEncoder",
]
