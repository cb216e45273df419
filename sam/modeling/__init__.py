from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "TwoWayTransformer"]

from .hiera import Hiera
from .memory import MemoryAttention, MemoryEncoder
from .neck import FpnNeck, Sam2ImageEncoder
from .sam2 import Sam2
from .sam2_decoder import Sam2MaskDecoder, Sam2PromptEncoder

__all__ += [
    "FpnNeck",
    "Hiera",
    "MemoryAttention",
    "MemoryEncoder",
    "Sam2",
    "Sam2ImageEncoder",
    "Sam2MaskDecoder",
    "Sam2PromptEncoder",
]
