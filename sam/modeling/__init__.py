"""Blocks every SAM family shares (`nn.Module`s only, official parameter names): the common
layers, the two-way transformer, the prompt encoder and the mask decoder. Each family's own
modules sit in its package: `sam.sam1` (ViT encoder, `Sam`), `sam.sam2` (Hiera, neck, memory,
`Sam2`), `sam.sam3` (SAM 3's image model)."""

from .common import MLP, LayerNorm2d, MLPBlock
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer

__all__ = ["LayerNorm2d", "MLP", "MLPBlock", "MaskDecoder", "PromptEncoder", "TwoWayTransformer"]
