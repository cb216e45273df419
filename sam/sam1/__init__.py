"""SAM 1 (Kirillov et al. 2023): the ViT image encoder and the `Sam` model. The blocks it
shares with the other families (prompt encoder, two-way transformer, mask decoder) are in
`sam.modeling`; its registry entries (vit_b, vit_l, vit_h) are in `sam.build`."""

from .image_encoder import ImageEncoderViT
from .model import Sam

__all__ = ["ImageEncoderViT", "Sam"]
