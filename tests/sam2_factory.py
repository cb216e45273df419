"""Tiny SAM 2 / 2.1 models with every parameter randomised, in the official checkpoint layout,
and Meta's reference model (`sam2` package) with identical weights.

The Hiera trunks keep the real block layouts (stages, query pooling, window sizes, global
blocks, position-embedding grids) of two official sizes at a small width; the neck, decoder
and memory modules keep their real 256-wide shapes, so the parameter names and most shapes are
exactly those of the official files. The reference zero-initialises position embeddings and
memory tokens, which would hide bugs in exactly those paths, so everything is drawn at random.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sam_factory import randomize_parameters

from sam import build_sam, save_checkpoint
from sam.sam2 import Sam2

TINY_WIDTH = 16
# Two official block layouts at a tiny width. "tiny": stages (1, 2, 7, 2), windows (8, 4, 14, 7)
# (stage 3 windows need padding), 1 head, global blocks (5, 7, 9), 7x7 position grid.
# "large": stages (2, 6, 36, 4), windows (8, 4, 16, 8) (no padding), 2 heads, global blocks
# (23, 33, 43), 7x7 position grid.
LAYOUTS = {"tiny": "hiera_tiny", "large": "hiera_large"}
REFERENCE_CONFIGS = {
    ("2.1", "tiny"): "configs/sam2.1/sam2.1_hiera_t.yaml",
    ("2.1", "large"): "configs/sam2.1/sam2.1_hiera_l.yaml",
    ("2.0", "tiny"): "configs/sam2/sam2_hiera_t.yaml",
    ("2.0", "large"): "configs/sam2/sam2_hiera_l.yaml",
}
# What build_sam("auto", ...) cannot read off the weights of a custom-width trunk.
LAYOUT_HINTS = {
    "tiny": dict(trunk_num_heads=1, trunk_global_att_blocks=(5, 7, 9), trunk_window_spec=(8, 4, 14, 7)),
    "large": dict(trunk_num_heads=2, trunk_global_att_blocks=(23, 33, 43), trunk_window_spec=(8, 4, 16, 8)),
}


def model_type(version: str, layout: str) -> str:
    return f"{'sam2.1' if version == '2.1' else 'sam2'}_{LAYOUTS[layout]}"


def make_tiny_sam2(layout: str = "tiny", version: str = "2.1", seed: int = 0) -> Sam2:
    """A tiny-width SAM 2 (2.1 or 2.0) with the block layout of an official size, all random."""
    torch.manual_seed(seed)  # the prompt encoder's random-Fourier matrix is drawn at construction
    model = build_sam(model_type(version, layout), trunk_embed_dim=TINY_WIDTH)
    return randomize_parameters(model, seed).eval()


def reference_overrides(width: int) -> list[str]:
    channels = [width * 8, width * 4, width * 2, width]
    return [
        f"++model.image_encoder.trunk.embed_dim={width}",
        f"++model.image_encoder.neck.backbone_channel_list=[{','.join(map(str, channels))}]",
    ]


def build_reference_sam2(version: str, layout: str, width: int | None = TINY_WIDTH):
    """Meta's model from its bundled config (hydra), at our tiny width unless width=None."""
    from sam2.build_sam import build_sam2

    overrides = reference_overrides(width) if width is not None else []
    return build_sam2(REFERENCE_CONFIGS[(version, layout)], None, device="cpu", hydra_overrides_extra=overrides)


def make_reference_sam2(our_model: Sam2, layout: str):
    """Meta's reference model with exactly the weights of `our_model` (strict load)."""
    width = our_model.image_encoder.trunk.patch_embed.proj.out_channels
    reference = build_reference_sam2(our_model.version, layout, width)
    reference.load_state_dict(our_model.state_dict(), strict=True)
    return reference.eval()


def save_tiny_sam2_checkpoint(path: str | Path, layout: str = "tiny", version: str = "2.1", seed: int = 0) -> Path:
    """Write a tiny random SAM 2 as an official-layout `{"model": state_dict}` `.pt` file."""
    return save_checkpoint(make_tiny_sam2(layout, version, seed), path)


@pytest.fixture(scope="session")
def tiny_sam2_checkpoint(tmp_path_factory) -> Path:
    """An official-layout `.pt` of a tiny random SAM 2.1 (hiera-tiny layout); load it with
    build_sam("auto", path, **LAYOUT_HINTS["tiny"]) or
    build_sam("sam2.1_hiera_tiny", path, trunk_embed_dim=TINY_WIDTH)."""
    return save_tiny_sam2_checkpoint(tmp_path_factory.mktemp("sam2") / "tiny_sam2.1.pt")
