"""Tiny SAM models with every parameter randomised, in the official checkpoint layout.

The reference (Meta's segment_anything) zero-initialises the relative-position tables and the
absolute position embedding, which would hide bugs in exactly those paths, so everything is
drawn at random here. Encoders are small (few layers, narrow) but keep the real 1024 input.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from sam import build_sam, save_checkpoint
from sam.sam1 import Sam

TINY_SAM_OVERRIDES = {
    "encoder_embed_dim": 64,
    "encoder_depth": 3,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
}


def randomize_parameters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    embedding_names = {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            elif param.ndim == 1:  # norm scales
                param.copy_(1.0 + 0.1 * noise)
            elif name in embedding_names:  # learned prompt / output-token embeddings
                param.copy_(0.5 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(fan_in))
    return model


def make_tiny_sam(seed: int = 0, **overrides) -> Sam:
    config = {**TINY_SAM_OVERRIDES, **overrides}
    torch.manual_seed(seed)  # the random-Fourier matrix is a buffer drawn at construction
    return randomize_parameters(build_sam("vit_b", **config), seed).eval()


def make_reference_sam(our_sam: Sam):
    """Meta's reference model with exactly the weights of `our_sam` (strict load)."""
    from segment_anything.build_sam import _build_sam

    encoder = our_sam.image_encoder
    global_indexes = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
    reference = _build_sam(
        encoder_embed_dim=encoder.patch_embed.proj.out_channels,
        encoder_depth=len(encoder.blocks),
        encoder_num_heads=encoder.blocks[0].attn.num_heads,
        encoder_global_attn_indexes=global_indexes,
        checkpoint=None,
    )
    reference.load_state_dict(our_sam.state_dict(), strict=True)
    return reference.eval()


def save_tiny_sam_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SAM as an official-layout `.pth` (or `.safetensors`) state dict."""
    return save_checkpoint(make_tiny_sam(seed), path)


def real_photo(name: str = "chelsea") -> np.ndarray:
    """A real photo from scikit-image as (H, W, 3) uint8 RGB."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])
