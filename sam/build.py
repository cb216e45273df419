"""The SAM model registry, `build_sam`, and safe checkpoint loading.

One registry (`MODEL_SPECS`) names every model type with its architecture and its official
checkpoint (URL, SHA-256, size): the SAM 1 sizes (`SAM_SPECS`: vit_h, vit_l, vit_b) and the
SAM 2.0 / 2.1 Hiera sizes (`SAM2_SPECS`: sam2_hiera_* and sam2.1_hiera_*). `build_sam` builds
any of them, or reads the family and size off a checkpoint (`"auto"`). `sam_model_registry`
keeps the official segment-anything calling convention for SAM 1:
`sam_model_registry["vit_b"](checkpoint=None)`.
"""

from __future__ import annotations

import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from .modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from .sam1 import ImageEncoderViT, Sam
from .sam2.hiera import Hiera
from .sam2.memory import MemoryAttention, MemoryAttentionLayer, MemoryEncoder, RoPEAttention
from .sam2.neck import FpnNeck, PositionEmbeddingSine, Sam2ImageEncoder
from .sam2.model import Sam2, Sam2TrackingConfig
from .sam2.decoder import Sam2MaskDecoder, Sam2PromptEncoder, Sam2TwoWayTransformer

logger = logging.getLogger(__name__)

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
PATCH_SIZE = 16
WINDOW_SIZE = 14


@dataclass(frozen=True)
class SamSpec:
    """Encoder configuration and official checkpoint of one SAM size."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    family: str = "sam1"

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None

    def encoder_config(self) -> dict[str, Any]:
        return {
            "encoder_embed_dim": self.encoder_embed_dim,
            "encoder_depth": self.encoder_depth,
            "encoder_num_heads": self.encoder_num_heads,
            "encoder_global_attn_indexes": tuple(self.encoder_global_attn_indexes),
        }


_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

SAM_SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(
        "vit_h", 1280, 32, 16, (7, 15, 23, 31),
        url=_BASE_URL + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size_bytes=2564550879,
    ),
    "vit_l": SamSpec(
        "vit_l", 1024, 24, 16, (5, 11, 17, 23),
        url=_BASE_URL + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size_bytes=1249524607,
    ),
    "vit_b": SamSpec(
        "vit_b", 768, 12, 12, (2, 5, 8, 11),
        url=_BASE_URL + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375042383,
    ),
}


@dataclass(frozen=True)
class Sam2Spec:
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
    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    family: str = "sam2"

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None

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
_HIERA_SIZES: dict[str, dict[str, Any]] = {
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
# Official files (dl.fbaipublicfiles.com, identical to the Hugging Face facebook/sam2*-hiera-*
# copies): SHA-256 and byte size, each checked against several independent public manifests.
_SAM2_FILES: dict[str, tuple[str, str, int]] = {
    "sam2.1_hiera_tiny": ("092824", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156008466),
    "sam2.1_hiera_small": ("092824", "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184416285),
    "sam2.1_hiera_base_plus": ("092824", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323606802),
    "sam2.1_hiera_large": ("092824", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898083611),
    "sam2_hiera_tiny": ("072824", "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", 155906050),
    "sam2_hiera_small": ("072824", "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", 184309650),
    "sam2_hiera_base_plus": ("072824", "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", 323493298),
    "sam2_hiera_large": ("072824", "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", 897952466),
}
_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"


def _sam2_spec(name: str) -> Sam2Spec:
    version = "2.1" if name.startswith("sam2.1_") else "2.0"
    folder, sha256, size_bytes = _SAM2_FILES[name]
    return Sam2Spec(
        name, version, **_HIERA_SIZES[name.split("_hiera_")[1]],
        url=f"{_SAM2_BASE_URL}{folder}/{name}.pt", sha256=sha256, size_bytes=size_bytes,
    )


SAM2_SPECS: dict[str, Sam2Spec] = {
    name: _sam2_spec(name)
    for name in [f"{prefix}_hiera_{size}" for prefix in ("sam2.1", "sam2") for size in _HIERA_SIZES]
}
# THE registry: every model type of both families.
MODEL_SPECS: dict[str, Union[SamSpec, Sam2Spec]] = {**SAM_SPECS, **SAM2_SPECS}
# Aliases: SAM 1's "default", and the official SAM 2 config names (sam2.1_hiera_t, _s, _b+, _l).
MODEL_ALIASES = {
    "default": "vit_h",
    **{
        f"{prefix}_hiera_{short}": f"{prefix}_hiera_{size}"
        for prefix in ("sam2.1", "sam2")
        for short, size in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))
    },
}
ENCODER_OVERRIDES = frozenset(SAM_SPECS["vit_b"].encoder_config())
SAM2_OVERRIDES = frozenset(SAM2_SPECS["sam2.1_hiera_tiny"].trunk_config())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely or does not fit the model."""


def valid_model_types() -> list[str]:
    return [*SAM_SPECS, "default", *SAM2_SPECS, *(a for a in MODEL_ALIASES if a != "default"), "auto"]


def resolve_model_type(model_type: str) -> str:
    """Map an alias to its canonical name; raise ValueError listing the valid names."""
    name = MODEL_ALIASES.get(model_type, model_type) if isinstance(model_type, str) else None
    if name not in MODEL_SPECS and name != "auto":
        raise ValueError(
            f"unknown SAM model type {model_type!r}; valid types: {', '.join(valid_model_types())}"
        )
    return name


def model_family(model_type: str) -> str:
    """The family of a (canonical or alias) model type other than "auto": "sam1" or "sam2"."""
    name = resolve_model_type(model_type)
    if name == "auto":
        raise ValueError("'auto' has no family until a checkpoint is read")
    return "sam2" if name in SAM2_SPECS else "sam1"


def _assemble(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
) -> Sam:
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




SAM2_HIDDEN_DIM = 256  # d_model of the neck, decoder and memory attention
SAM2_MEMORY_DIM = 64  # memory encoder output width


def _assemble_sam2(
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
    mask_decoder = Sam2MaskDecoder(
        transformer_dim=SAM2_HIDDEN_DIM,
        transformer=Sam2TwoWayTransformer(depth=2, embedding_dim=SAM2_HIDDEN_DIM, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        use_high_res_features=True,
        iou_prediction_use_sigmoid=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        # What the reference's build_sam2 switches on for inference (apply_postprocessing).
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
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


# --------------------------------------------------------------------------- checkpoints
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.pth`/`.pt` (tensors only, `weights_only=True`) or `.safetensors`.

    Never unpickles arbitrary objects: a pickle that holds anything but tensors and plain
    containers is refused with CheckpointError. The official SAM 2 layout `{"model": ...}` is
    unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); delete it and download again")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {error}") from error
    else:
        state = _torch_load_weights_only(path)
    if isinstance(state, Mapping):
        # Some training scripts wrap the weights; accept the common wrappers.
        for wrapper in ("model", "state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} does not hold a state dict (a mapping of parameter names to tensors)"
        )
    return dict(state)


def _torch_load_weights_only(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Legacy (non-zip) files cannot be memory-mapped; read them normally.
            if "mmap" not in str(error) and "zip" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects other than tensors, and loading "
            f"it would run code from the file. Only plain state dicts (or .safetensors) are accepted. "
            f"Details: {str(error).splitlines()[0]}"
        ) from error
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, struct.error) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); delete it and download again"
        ) from error


def infer_encoder_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the encoder size off an official-layout SAM state dict.

    The width comes from the patch embedding, the depth from the block count, the head width
    from the relative-position tables, and global blocks are those whose tables span the whole
    64x64 grid (windowed blocks span 14x14).
    """
    key = "image_encoder.patch_embed.proj.weight"
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


_SAM1_KEY = "image_encoder.patch_embed.proj.weight"
_SAM2_KEY = "image_encoder.trunk.patch_embed.proj.weight"


def checkpoint_family(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The family a state dict belongs to: "sam1", "sam2" (2.0 or 2.1), or None (neither)."""
    if _SAM2_KEY in state_dict:
        return "sam2"
    if _SAM1_KEY in state_dict:
        return "sam1"
    return None


def infer_sam2_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read what the weights tell about a SAM 2 model: the version, the trunk width, the
    blocks per stage and the size of the background position embedding.

    Heads, windows and which blocks attend globally leave no trace in the weights; they come
    from the registry size with the same shapes ("name"), or are None for a custom trunk.
    """
    if _SAM2_KEY not in state_dict:
        raise CheckpointError(f"not a SAM 2 checkpoint: key {_SAM2_KEY!r} is missing")
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
        "trunk_embed_dim": int(state_dict[_SAM2_KEY].shape[0]),
        "trunk_stages": stages,
        "trunk_pos_embed_size": (int(pos_embed.shape[2]), int(pos_embed.shape[3])),
        "first_window": int(state_dict[f"{prefix}pos_embed_window"].shape[2]),
        "name": None,
    }
    for name, spec in SAM2_SPECS.items():
        if (
            spec.version == config["version"]
            and spec.trunk_embed_dim == config["trunk_embed_dim"]
            and tuple(spec.trunk_stages) == stages
            and tuple(spec.trunk_pos_embed_size) == config["trunk_pos_embed_size"]
            and spec.trunk_window_spec[0] == config["first_window"]
        ):
            config["name"] = name
    return config


def _describe_sam1(config: Mapping[str, Any]) -> str:
    for name, spec in SAM_SPECS.items():
        if spec.encoder_config() == {k: config[k] for k in ENCODER_OVERRIDES}:
            return name
    return (
        f"a custom encoder (embed_dim={config['encoder_embed_dim']}, depth={config['encoder_depth']}, "
        f"heads={config['encoder_num_heads']}, global blocks={list(config['encoder_global_attn_indexes'])})"
    )


_describe = _describe_sam1  # the SAM 1 name the tests and callers have used


def describe_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short phrase naming what a state dict looks like, e.g. "vit_b (SAM 1)",
    "sam2.1_hiera_tiny (SAM 2.1)" or "a custom SAM 2.1 model (...)"; raises CheckpointError
    for a state dict of neither family."""
    family = checkpoint_family(state_dict)
    if family == "sam2":
        config = infer_sam2_config(state_dict)
        if config["name"]:
            return f"{config['name']} (SAM {config['version']})"
        return (
            f"a custom SAM {config['version']} model (trunk embed_dim={config['trunk_embed_dim']}, "
            f"stages={config['trunk_stages']}, pos_embed={config['trunk_pos_embed_size']})"
        )
    if family == "sam1":
        described = _describe_sam1(infer_encoder_config(state_dict))
        if described.startswith("a custom encoder"):
            return described.replace("a custom encoder", "a custom SAM 1 encoder", 1)
        return f"{described} (SAM 1)"
    raise CheckpointError("not a SAM checkpoint")


def _what_to_pass(looks_like: str) -> str:
    if looks_like.startswith("a custom"):
        return "pass model_type='auto' to build it from the file (with overrides for what the weights do not record)."
    return "pass that model type, or model_type='auto' to infer it."


def _family_label(model: nn.Module) -> str:
    return f"SAM {model.version}" if isinstance(model, Sam2) else "SAM 1"


def load_sam_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_type: str, source: str = "checkpoint"
) -> None:
    """Strictly load `state_dict` into `model` (a Sam or a Sam2); on mismatch raise
    CheckpointError naming the model type, what the checkpoint looks like, and the first
    mismatched keys."""
    wanted = "sam2" if isinstance(model, Sam2) else "sam1"
    found = checkpoint_family(state_dict)
    if found is not None and found != wanted:
        looks_like = describe_checkpoint(state_dict)
        raise CheckpointError(
            f"{source} does not match SAM model type {model_type!r}: the model is {_family_label(model)} "
            f"but the checkpoint looks like {looks_like}; {_what_to_pass(looks_like)}"
        )
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} (checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)})"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches: {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}")
        try:
            looks_like = describe_checkpoint(state_dict)
            hint = f" The checkpoint looks like {looks_like}; {_what_to_pass(looks_like)}"
        except CheckpointError:
            hint = " It does not look like a SAM checkpoint at all."
        raise CheckpointError(
            f"{source} does not match SAM model type {model_type!r}: {'; '.join(parts)}.{hint}"
        )
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- builders
def _check_overrides(overrides: Mapping[str, Any], allowed: frozenset, family: str) -> None:
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(
            f"unknown build_sam overrides {sorted(unknown)} for a {family} model; valid: {sorted(allowed)}"
        )


def _sam2_config_from_checkpoint(
    state_dict: Mapping[str, torch.Tensor], overrides: Mapping[str, Any], checkpoint: Any
) -> tuple[str, dict[str, Any]]:
    """(version, trunk config) for `auto`: the registry size with these shapes, or, for a
    custom trunk, the shapes read off the weights plus what the caller passes."""
    found = infer_sam2_config(state_dict)
    if found["name"] is not None:
        config = SAM2_SPECS[found["name"]].trunk_config()
        logger.info("inferred SAM 2 model from %s: %s", checkpoint, found["name"])
    else:
        needed = ["trunk_num_heads", "trunk_global_att_blocks", "trunk_window_spec"]
        absent = [key for key in needed if key not in overrides]
        if absent:
            raise CheckpointError(
                f"checkpoint {checkpoint} is {describe_checkpoint(state_dict)}, which matches no registry "
                f"size. The weights do not record {', '.join(absent)}; pass them to build_sam "
                f"(e.g. build_sam('auto', checkpoint, trunk_num_heads=1, "
                f"trunk_global_att_blocks=(5, 7, 9), trunk_window_spec=(8, 4, 14, 7)))."
            )
        config = {
            "trunk_embed_dim": found["trunk_embed_dim"],
            "trunk_stages": found["trunk_stages"],
            "trunk_pos_embed_size": found["trunk_pos_embed_size"],
        }
    config.update(overrides)
    return found["version"], config


def build_sam(
    model_type: str = "vit_b", checkpoint: str | Path | None = None, **overrides: Any
) -> Union[Sam, Sam2]:
    """Build a SAM 1 (`Sam`) or SAM 2 (`Sam2`) model in eval mode, optionally loading an
    official-layout checkpoint strictly.

    model_type: "vit_h" | "vit_l" | "vit_b" | "default" (= vit_h) | "sam2.1_hiera_tiny" |
    "sam2.1_hiera_small" | "sam2.1_hiera_base_plus" | "sam2.1_hiera_large" | the same four
    "sam2_hiera_*" (SAM 2.0) | the config aliases "sam2.1_hiera_t", "_s", "_b+", "_l" (and
    "sam2_hiera_*") | "auto" (family and size read off `checkpoint`).

    overrides (e.g. small models for tests; the input resolution stays 1024):
    - SAM 1: encoder_embed_dim, encoder_depth, encoder_num_heads, encoder_global_attn_indexes;
    - SAM 2: trunk_embed_dim, trunk_num_heads, trunk_stages (blocks per stage),
      trunk_global_att_blocks (indices of global-attention blocks), trunk_window_spec (window
      per stage), trunk_pos_embed_size (background position-embedding grid (h, w)).
    """
    name = resolve_model_type(model_type)
    state_dict = None
    if name == "auto":
        _check_overrides(overrides, ENCODER_OVERRIDES | SAM2_OVERRIDES, "SAM")
    elif name in SAM2_SPECS:
        _check_overrides(overrides, SAM2_OVERRIDES, "SAM 2")
    else:
        _check_overrides(overrides, ENCODER_OVERRIDES, "SAM 1")
    if checkpoint is not None:
        state_dict = load_state_dict_file(checkpoint)

    if name == "auto":
        if state_dict is None:
            raise ValueError("model_type='auto' needs a checkpoint to infer the model size from")
        family = checkpoint_family(state_dict)
        if family is None:
            raise CheckpointError(
                f"not a SAM checkpoint: neither {_SAM1_KEY!r} (SAM 1) nor {_SAM2_KEY!r} (SAM 2) is in "
                f"{checkpoint}"
            )
        if family == "sam2":
            if set(overrides) & ENCODER_OVERRIDES:
                raise ValueError(f"{checkpoint} is a SAM 2 checkpoint; SAM 1 overrides do not apply")
            version, config = _sam2_config_from_checkpoint(state_dict, overrides, checkpoint)
            model: Union[Sam, Sam2] = _assemble_sam2(version, **config)
            model.model_type = infer_sam2_config(state_dict)["name"] if not overrides else None
        else:
            if set(overrides) & SAM2_OVERRIDES:
                raise ValueError(f"{checkpoint} is a SAM 1 checkpoint; SAM 2 overrides do not apply")
            config = infer_encoder_config(state_dict)
            logger.info("inferred SAM encoder from %s: %s", checkpoint, _describe_sam1(config))
            config.update(overrides)
            model = _assemble(**config)
    elif name in SAM2_SPECS:
        spec = SAM2_SPECS[name]
        config = {**spec.trunk_config(), **overrides}
        model = _assemble_sam2(spec.version, **config)
        model.model_type = name if not overrides else None
    else:
        config = SAM_SPECS[name].encoder_config()
        config.update(overrides)
        model = _assemble(**config)
    if state_dict is not None:
        load_sam_state_dict(model, state_dict, model_type, source=f"checkpoint {checkpoint}")
    return model.eval()


def _registry_builder(name: str) -> Callable[..., Sam]:
    return partial(build_sam, name)


# segment-anything's convention, SAM 1 only (its keys are exactly the official ones); every
# type, SAM 2 included, builds with build_sam(name, checkpoint).
sam_model_registry: dict[str, Callable[..., Sam]] = {
    name: _registry_builder(name) for name in [*MODEL_ALIASES, *MODEL_SPECS]
}


def save_checkpoint(model: Union[Sam, Sam2], path: str | Path) -> Path:
    """Save `model` in its official layout, which Meta's code loads strictly: a flat state dict
    for SAM 1, `{"model": state_dict}` for SAM 2 (`.pt`/`.pth`); `.safetensors` is always flat."""
    path = Path(path)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif isinstance(model, Sam2):
        torch.save({"model": state}, path)
    else:
        torch.save(state, path)
    return path
