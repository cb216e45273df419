"""Building SAM 1 (`Sam`, ViT-B/L/H): the architecture spec of one size (`SamSpec`), the model
as segment-anything's `build_sam` assembles it (`assemble_sam`), and reading the encoder size
off an official-layout state dict (`infer_encoder_config`). The sizes themselves (vit_b, vit_l,
vit_h, with URLs and SHA-256) are rows of the one registry table in `sam.build`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..checkpoint import CheckpointError, CheckpointSpec
from ..modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from .image_encoder import ImageEncoderViT
from .model import Sam

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
PATCH_SIZE = 16
WINDOW_SIZE = 14
# The key only a SAM 1 state dict has (SAM 2's patch embedding sits under `trunk.`).
SAM1_KEY = "image_encoder.patch_embed.proj.weight"


@dataclass(frozen=True)
class SamSpec(CheckpointSpec):
    """Encoder configuration and official checkpoint of one SAM size."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    family: str = "sam1"

    def encoder_config(self) -> dict[str, Any]:
        return {
            "encoder_embed_dim": self.encoder_embed_dim,
            "encoder_depth": self.encoder_depth,
            "encoder_num_heads": self.encoder_num_heads,
            "encoder_global_attn_indexes": tuple(self.encoder_global_attn_indexes),
        }


def assemble_sam(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
) -> Sam:
    """A SAM 1 model as segment-anything's build_sam assembles it, with the given ViT encoder."""
    grid = IMAGE_SIZE // PATCH_SIZE
    image_encoder = ImageEncoderViT(
        img_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        embed_dim=encoder_embed_dim,
        depth=encoder_depth,
        num_heads=encoder_num_heads,
        mlp_ratio=4,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=WINDOW_SIZE,
        global_attn_indexes=tuple(encoder_global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=PROMPT_EMBED_DIM,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder)


def infer_encoder_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the encoder size off an official-layout SAM state dict.

    The width comes from the patch embedding, the depth from the block count, the head width
    from the relative-position tables, and global blocks are those whose tables span the whole
    64x64 grid (windowed blocks span 14x14).
    """
    key = SAM1_KEY
    if key not in state_dict:
        raise CheckpointError(f"not a SAM checkpoint: key {key!r} is missing")
    embed_dim = int(state_dict[key].shape[0])
    depth = 0
    while f"image_encoder.blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    rel_key = "image_encoder.blocks.0.attn.rel_pos_h"
    if depth == 0 or rel_key not in state_dict:
        raise CheckpointError("not a SAM checkpoint: no image-encoder blocks with relative positions")
    head_dim = int(state_dict[rel_key].shape[1])
    grid_span = 2 * (IMAGE_SIZE // PATCH_SIZE) - 1
    global_indexes = tuple(
        index
        for index in range(depth)
        if state_dict[f"image_encoder.blocks.{index}.attn.rel_pos_h"].shape[0] == grid_span
    )
    return {
        "encoder_embed_dim": embed_dim,
        "encoder_depth": depth,
        "encoder_num_heads": embed_dim // head_dim,
        "encoder_global_attn_indexes": global_indexes,
    }
