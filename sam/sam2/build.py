"""Building SAM 2 / 2.1 (`Sam2`, Hiera tiny/small/base+/large): the architecture spec of one
size (`Sam2Spec`, `HIERA_SIZES` from the official configs), the model as sam2's `build_sam2`
assembles it (`assemble_sam2`), and reading the trunk off an official-layout state dict
(`infer_sam2_config`). The sizes' rows (URLs, SHA-256) are in the one registry table in
`sam.build`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..checkpoint import CheckpointError, CheckpointSpec
from .decoder import Sam2MaskDecoder, Sam2PromptEncoder, Sam2TwoWayTransformer
from .hiera import Hiera
from .memory import MemoryAttention, MemoryAttentionLayer, MemoryEncoder, RoPEAttention
from .model import Sam2, Sam2TrackingConfig
from .neck import FpnNeck, PositionEmbeddingSine, Sam2ImageEncoder

IMAGE_SIZE = 1024
# The key only a SAM 2 state dict has.
SAM2_KEY = "image_encoder.trunk.patch_embed.proj.weight"


@dataclass(frozen=True)
class Sam2Spec(CheckpointSpec):
    """Architecture and official checkpoint of one SAM 2.0 / 2.1 size.

    Only the Hiera trunk differs between sizes; the neck, decoder and memory modules are the
    same. `version` "2.1" checkpoints carry two more parameters than "2.0" ones
    (`no_obj_embed_spatial`, `obj_ptr_tpos_proj`).
    """

    name: str
    version: str
    trunk_embed_dim: int
    trunk_num_heads: int
    trunk_stages: tuple[int, ...]
    trunk_global_att_blocks: tuple[int, ...]
    trunk_window_spec: tuple[int, ...] = (8, 4, 14, 7)
    trunk_pos_embed_size: tuple[int, int] = (14, 14)
    family: str = "sam2"

    def trunk_config(self) -> dict[str, Any]:
        return {
            "trunk_embed_dim": self.trunk_embed_dim,
            "trunk_num_heads": self.trunk_num_heads,
            "trunk_stages": tuple(self.trunk_stages),
            "trunk_global_att_blocks": tuple(self.trunk_global_att_blocks),
            "trunk_window_spec": tuple(self.trunk_window_spec),
            "trunk_pos_embed_size": tuple(self.trunk_pos_embed_size),
        }


# The four Hiera sizes of the official configs (sam2/configs/sam2*/sam2*_hiera_{t,s,b+,l}.yaml).
HIERA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(trunk_embed_dim=96, trunk_num_heads=1, trunk_stages=(1, 2, 7, 2),
                 trunk_global_att_blocks=(5, 7, 9), trunk_pos_embed_size=(7, 7)),
    "small": dict(trunk_embed_dim=96, trunk_num_heads=1, trunk_stages=(1, 2, 11, 2),
                  trunk_global_att_blocks=(7, 10, 13), trunk_pos_embed_size=(7, 7)),
    "base_plus": dict(trunk_embed_dim=112, trunk_num_heads=2, trunk_stages=(2, 3, 16, 3),
                      trunk_global_att_blocks=(12, 16, 20), trunk_pos_embed_size=(14, 14)),
    "large": dict(trunk_embed_dim=144, trunk_num_heads=2, trunk_stages=(2, 6, 36, 4),
                  trunk_global_att_blocks=(23, 33, 43), trunk_window_spec=(8, 4, 16, 8),
                  trunk_pos_embed_size=(7, 7)),
}
SAM2_HIDDEN_DIM = 256  # d_model of the neck, decoder and memory attention
SAM2_MEMORY_DIM = 64  # memory encoder output width


def assemble_sam2(
    version: str,
    trunk_embed_dim: int,
    trunk_num_heads: int,
    trunk_stages: tuple[int, ...],
    trunk_global_att_blocks: tuple[int, ...],
    trunk_window_spec: tuple[int, ...],
    trunk_pos_embed_size: tuple[int, int],
) -> Sam2:
    """A SAM 2 model as the official configs build it, with the given Hiera trunk."""
    trunk = Hiera(
        embed_dim=trunk_embed_dim,
        num_heads=trunk_num_heads,
        stages=tuple(trunk_stages),
        global_att_blocks=tuple(trunk_global_att_blocks),
        window_spec=tuple(trunk_window_spec),
        window_pos_embed_bkg_spatial_size=tuple(trunk_pos_embed_size),
    )
    neck = FpnNeck(
        d_model=SAM2_HIDDEN_DIM,
        backbone_channel_list=trunk.channel_list,
        position_encoding=PositionEmbeddingSine(SAM2_HIDDEN_DIM),
        fpn_top_down_levels=(2, 3),  # levels 0 and 1 use the backbone features directly
        fpn_interp_model="nearest",
    )
    image_encoder = Sam2ImageEncoder(trunk, neck, scalp=1)

    def memory_layer() -> MemoryAttentionLayer:
        return MemoryAttentionLayer(
            d_model=SAM2_HIDDEN_DIM,
            dim_feedforward=2048,
            dropout=0.1,
            self_attention=RoPEAttention(SAM2_HIDDEN_DIM, num_heads=1, dropout=0.1, feat_sizes=(64, 64)),
            cross_attention=RoPEAttention(
                SAM2_HIDDEN_DIM, num_heads=1, dropout=0.1, kv_in_dim=SAM2_MEMORY_DIM,
                rope_k_repeat=True, feat_sizes=(64, 64),
            ),
            pos_enc_at_attn=False,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
        )

    memory_attention = MemoryAttention(
        SAM2_HIDDEN_DIM, [memory_layer() for _ in range(4)], pos_enc_at_input=True
    )
    memory_encoder = MemoryEncoder(out_dim=SAM2_MEMORY_DIM, in_dim=SAM2_HIDDEN_DIM, fuser_layers=2)
    grid = IMAGE_SIZE // 16
    prompt_encoder = Sam2PromptEncoder(
        embed_dim=SAM2_HIDDEN_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    # Every released SAM 2 / 2.1 model uses the decoder's defaults, which include what the
    # reference's build_sam2 switches on for inference (dynamic multimask via stability).
    mask_decoder = Sam2MaskDecoder(
        transformer_dim=SAM2_HIDDEN_DIM,
        transformer=Sam2TwoWayTransformer(depth=2, embedding_dim=SAM2_HIDDEN_DIM, num_heads=8, mlp_dim=2048),
    )
    return Sam2(
        image_encoder,
        memory_attention,
        memory_encoder,
        prompt_encoder,
        mask_decoder,
        version=version,
        image_size=IMAGE_SIZE,
        tracking=Sam2TrackingConfig.for_version(version),
    )


def infer_sam2_config(
    state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, Sam2Spec]
) -> dict[str, Any]:
    """Read what the weights tell about a SAM 2 model: the version, the trunk width, the
    blocks per stage and the size of the background position embedding.

    Heads, windows and which blocks attend globally leave no trace in the weights; they come
    from the size in `specs` (the registry) with the same shapes ("name"), or are None for a
    custom trunk.
    """
    if SAM2_KEY not in state_dict:
        raise CheckpointError(f"not a SAM 2 checkpoint: key {SAM2_KEY!r} is missing")
    prefix = "image_encoder.trunk."
    depth = 0
    while f"{prefix}blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    if depth == 0 or f"{prefix}pos_embed" not in state_dict or f"{prefix}pos_embed_window" not in state_dict:
        raise CheckpointError("not a SAM 2 checkpoint: no Hiera blocks or position embedding in the trunk")
    # Each later stage starts with a block that widens the tokens, and only those have `proj`.
    starts = [0] + [i for i in range(1, depth) if f"{prefix}blocks.{i}.proj.weight" in state_dict]
    stages = tuple(end - start for start, end in zip(starts, starts[1:] + [depth]))
    pos_embed = state_dict[f"{prefix}pos_embed"]
    config: dict[str, Any] = {
        "version": "2.1" if "no_obj_embed_spatial" in state_dict else "2.0",
        "trunk_embed_dim": int(state_dict[SAM2_KEY].shape[0]),
        "trunk_stages": stages,
        "trunk_pos_embed_size": (int(pos_embed.shape[2]), int(pos_embed.shape[3])),
        "first_window": int(state_dict[f"{prefix}pos_embed_window"].shape[2]),
        "name": None,
    }
    for name, spec in specs.items():
        if (
            spec.version == config["version"]
            and spec.trunk_embed_dim == config["trunk_embed_dim"]
            and tuple(spec.trunk_stages) == stages
            and tuple(spec.trunk_pos_embed_size) == config["trunk_pos_embed_size"]
            and spec.trunk_window_spec[0] == config["first_window"]
        ):
            config["name"] = name
    return config
