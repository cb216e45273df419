"""The SAM model registry, `build_sam`, and safe checkpoint loading.

One table (`SAM_SPECS`) names every model size with its encoder configuration and its official
checkpoint (URL, SHA-256, size). `sam_model_registry` is derived from it and keeps the official
calling convention: `sam_model_registry["vit_b"](checkpoint=None)`.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

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
MODEL_ALIASES = {"default": "vit_h"}
ENCODER_OVERRIDES = frozenset(SAM_SPECS["vit_b"].encoder_config())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely or does not fit the model."""


def valid_model_types() -> list[str]:
    return [*SAM_SPECS, *MODEL_ALIASES, "auto"]


def resolve_model_type(model_type: str) -> str:
    """Map an alias to its canonical name; raise ValueError listing the valid names."""
    name = MODEL_ALIASES.get(model_type, model_type)
    if name not in SAM_SPECS and name != "auto":
        raise ValueError(
            f"unknown SAM model type {model_type!r}; valid types: {', '.join(valid_model_types())}"
        )
    return name


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


# --------------------------------------------------------------------------- checkpoints
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.pth`/`.pt` (tensors only, `weights_only=True`) or `.safetensors`.

    Never unpickles arbitrary objects: a pickle that holds anything but tensors and plain
    containers is refused with CheckpointError.
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
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError) as error:
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


def _describe(config: Mapping[str, Any]) -> str:
    for name, spec in SAM_SPECS.items():
        if spec.encoder_config() == {k: config[k] for k in ENCODER_OVERRIDES}:
            return name
    return (
        f"a custom encoder (embed_dim={config['encoder_embed_dim']}, depth={config['encoder_depth']}, "
        f"heads={config['encoder_num_heads']}, global blocks={list(config['encoder_global_attn_indexes'])})"
    )


def load_sam_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_type: str, source: str = "checkpoint"
) -> None:
    """Strictly load `state_dict` into `model`; on mismatch raise CheckpointError naming the
    model type and the first mismatched keys."""
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
        hint = ""
        try:
            hint = f" The checkpoint looks like {_describe(infer_encoder_config(state_dict))};"
            hint += " pass that model type, or model_type='auto' to infer it."
        except CheckpointError:
            hint = " It does not look like a SAM checkpoint at all."
        raise CheckpointError(
            f"{source} does not match SAM model type {model_type!r}: {'; '.join(parts)}.{hint}"
        )
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- builders
def build_sam(model_type: str = "vit_b", checkpoint: str | Path | None = None, **overrides: Any) -> Sam:
    """Build a SAM model in eval mode, optionally loading an official-layout checkpoint.

    model_type: "vit_h" | "vit_l" | "vit_b" | "default" (= vit_h) | "auto" (infer the encoder
    size from `checkpoint`). overrides: any of encoder_embed_dim, encoder_depth,
    encoder_num_heads, encoder_global_attn_indexes (e.g. small encoders for tests; the input
    resolution stays 1024).
    """
    name = resolve_model_type(model_type)
    unknown = set(overrides) - ENCODER_OVERRIDES
    if unknown:
        raise ValueError(
            f"unknown build_sam overrides {sorted(unknown)}; valid: {sorted(ENCODER_OVERRIDES)}"
        )
    state_dict = None
    if checkpoint is not None:
        state_dict = load_state_dict_file(checkpoint)
    if name == "auto":
        if state_dict is None:
            raise ValueError("model_type='auto' needs a checkpoint to infer the model size from")
        config = infer_encoder_config(state_dict)
        logger.info("inferred SAM encoder from %s: %s", checkpoint, _describe(config))
    else:
        config = SAM_SPECS[name].encoder_config()
    config.update(overrides)
    model = _assemble(**config)
    if state_dict is not None:
        load_sam_state_dict(model, state_dict, model_type, source=f"checkpoint {checkpoint}")
    return model.eval()


def _registry_builder(name: str) -> Callable[..., Sam]:
    return partial(build_sam, name)


sam_model_registry: dict[str, Callable[..., Sam]] = {
    name: _registry_builder(name) for name in [*MODEL_ALIASES, *SAM_SPECS]
}


def save_checkpoint(model: Sam, path: str | Path) -> Path:
    """Save `model` in the official layout (`.pth` state dict) or as `.safetensors`."""
    path = Path(path)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
