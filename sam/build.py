"""THE SAM model registry, `build_sam`, and safe checkpoint loading.

One table (`MODEL_SPECS`) names every model type with its family, architecture and official
checkpoint (URL, SHA-256, size): SAM 1 (`vit_h`, `vit_l`, `vit_b`; `SAM_SPECS`) and SAM 2.0 /
2.1 (`sam2_hiera_*`, `sam2.1_hiera_*`; `SAM2_SPECS`) and SAM 3 (`sam3`, a gated hub file;
`SAM3_SPECS`). Each family builds itself in its own package (`sam.sam1.build`, `sam.sam2.build`,
`sam.sam3.build`); this module only looks a name up and dispatches. `build_sam` builds any type, or reads the family and size off a
checkpoint (`"auto"`). `sam_model_registry` keeps segment-anything's calling convention:
`sam_model_registry["vit_b"](checkpoint=None)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointSpec, load_state_dict_file
from .sam1 import Sam
from .sam1.build import SAM1_KEY, SamSpec, assemble_sam, infer_encoder_config
from .sam2 import Sam2
from .sam2.build import HIERA_SIZES, SAM2_KEY, Sam2Spec, assemble_sam2
from .sam2.build import infer_sam2_config as _read_sam2_config

logger = logging.getLogger(__name__)

_SAM1_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"


def _sam2(name: str, folder: str, sha256: str, size_bytes: int) -> Sam2Spec:
    """A SAM 2 row: the Hiera size and version follow from the name (`sam2.1_hiera_tiny`)."""
    version = "2.1" if name.startswith("sam2.1_") else "2.0"
    return Sam2Spec(
        name, version, **HIERA_SIZES[name.split("_hiera_")[1]],
        url=f"{_SAM2_URL}{folder}/{name}.pt", sha256=sha256, size_bytes=size_bytes,
    )


# Keys only a SAM 3 checkpoint has: Meta's sam3.pt, a transformers Sam3Model directory, the hub's
# combined file (sam.sam3.build reads all three).
SAM3_KEYS = (
    "detector.backbone.vision_backbone.trunk.pos_embed",
    "vision_encoder.backbone.embeddings.position_embeddings",
    "detector_model.vision_encoder.backbone.embeddings.position_embeddings",
)


@dataclass(frozen=True, kw_only=True)
class Sam3Spec(CheckpointSpec):
    """A SAM 3 row: the file is on the Hugging Face hub, gated (access is granted per account on
    the model page). `build_sam(name)` builds the image model (`sam.sam3.Sam3Image`)."""

    name: str
    hf_repo: str
    hf_filename: str
    gated: bool = True
    family: str = "sam3"


def _sam3(name: str, repo: str, filename: str) -> Sam3Spec:
    # No SHA-256 or size: neither is published anywhere we could check (Meta's README, the hub
    # page, the repositories that pin SAM 1/2 hashes), and we do not invent one. langsam.weights
    # checks a download against the SHA-256 the hub itself records for the file (its LFS object
    # id) and refuses a file it cannot verify.
    return Sam3Spec(name=name, hf_repo=repo, hf_filename=filename,
                    url=f"https://huggingface.co/{repo}/resolve/main/{filename}")


# THE registry: every model type of every family, one row each. Official files
# (dl.fbaipublicfiles.com; the SAM 2 ones are identical to the Hugging Face facebook/sam2*-hiera-*
# copies): SHA-256 and byte size, each checked against several independent public manifests.
MODEL_SPECS: dict[str, Union[SamSpec, Sam2Spec, Sam3Spec]] = {spec.name: spec for spec in [
    # SAM 1: name, ViT width, depth, heads, global-attention blocks
    SamSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31), url=_SAM1_URL + "sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", size_bytes=2564550879),
    SamSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23), url=_SAM1_URL + "sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", size_bytes=1249524607),
    SamSpec("vit_b", 768, 12, 12, (2, 5, 8, 11), url=_SAM1_URL + "sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", size_bytes=375042383),
    # SAM 2.1 and 2.0: name (the Hiera size of HIERA_SIZES), release folder, SHA-256, bytes
    _sam2("sam2.1_hiera_tiny", "092824", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156008466),
    _sam2("sam2.1_hiera_small", "092824", "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184416285),
    _sam2("sam2.1_hiera_base_plus", "092824", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323606802),
    _sam2("sam2.1_hiera_large", "092824", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898083611),
    _sam2("sam2_hiera_tiny", "072824", "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", 155906050),
    _sam2("sam2_hiera_small", "072824", "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", 184309650),
    _sam2("sam2_hiera_base_plus", "072824", "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", 323493298),
    _sam2("sam2_hiera_large", "072824", "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", 897952466),
    # SAM 3 (Nov 2025): Meta's image + video checkpoint (detector.* and tracker.*; 848M parameters).
    _sam3("sam3", "facebook/sam3", "sam3.pt"),
]}
SAM_SPECS: dict[str, SamSpec] = {name: spec for name, spec in MODEL_SPECS.items() if spec.family == "sam1"}
SAM2_SPECS: dict[str, Sam2Spec] = {name: spec for name, spec in MODEL_SPECS.items() if spec.family == "sam2"}
SAM3_SPECS: dict[str, Sam3Spec] = {name: spec for name, spec in MODEL_SPECS.items() if spec.family == "sam3"}
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


def valid_model_types() -> list[str]:
    """The names a SAM box / point predictor builds from (SAM 3's concept model, `sam3`, is not one
    of them: `build_sam("sam3")` and `sam.sam3` build it)."""
    return [*SAM_SPECS, "default", *SAM2_SPECS, *(a for a in MODEL_ALIASES if a != "default"), "auto"]


def resolve_model_type(model_type: str) -> str:
    """Map an alias to its canonical name; raise ValueError listing the valid names."""
    name = MODEL_ALIASES.get(model_type, model_type) if isinstance(model_type, str) else None
    if name not in MODEL_SPECS and name != "auto":
        raise ValueError(
            f"unknown SAM model type {model_type!r}; valid types: {', '.join([*valid_model_types(), *SAM3_SPECS])}"
        )
    return name


def model_family(model_type: str) -> str:
    """The family of a (canonical or alias) model type other than "auto": "sam1", "sam2" or "sam3"."""
    name = resolve_model_type(model_type)
    if name == "auto":
        raise ValueError("'auto' has no family until a checkpoint is read")
    return MODEL_SPECS[name].family


# --------------------------------------------------------------------------- checkpoints
def checkpoint_family(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The family a state dict belongs to: "sam1", "sam2" (2.0 or 2.1), "sam3", or None."""
    if any(key in state_dict for key in SAM3_KEYS):
        return "sam3"
    if SAM2_KEY in state_dict:
        return "sam2"
    if SAM1_KEY in state_dict:
        return "sam1"
    return None


def infer_sam2_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights of a SAM 2 state dict tell (`sam.sam2.build.infer_sam2_config`), with
    "name" the registry size of the same shapes, or None for a custom trunk."""
    return _read_sam2_config(state_dict, SAM2_SPECS)


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
    if family == "sam3":
        return "a SAM 3 model (build it with model_type='sam3' or sam.sam3.load_sam3)"
    if family == "sam1":
        described = _describe_sam1(infer_encoder_config(state_dict))
        if described.startswith("a custom encoder"):
            return described.replace("a custom encoder", "a custom SAM 1 encoder", 1)
        return f"{described} (SAM 1)"
    raise CheckpointError("not a SAM checkpoint")


def _what_to_pass(looks_like: str) -> str:
    if looks_like.startswith("a SAM 3"):
        return "SAM 3 is its own model, not a SAM 1 / SAM 2 size."
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
    "sam2_hiera_*") | "auto" (family and size read off `checkpoint`) | "sam3" (SAM 3's concept
    model, `sam.sam3.Sam3Image`, from Meta's sam3.pt or a transformers directory; no overrides).

    overrides (e.g. small models for tests; the input resolution stays 1024):
    - SAM 1: encoder_embed_dim, encoder_depth, encoder_num_heads, encoder_global_attn_indexes;
    - SAM 2: trunk_embed_dim, trunk_num_heads, trunk_stages (blocks per stage),
      trunk_global_att_blocks (indices of global-attention blocks), trunk_window_spec (window
      per stage), trunk_pos_embed_size (background position-embedding grid (h, w)).
    """
    name = resolve_model_type(model_type)
    if name in SAM3_SPECS:
        if overrides:
            raise ValueError(f"build_sam({name!r}) takes no overrides; pass a sam.sam3.Sam3Config to sam.sam3.build_sam3")
        from .sam3.build import build_sam3

        return build_sam3(checkpoint)
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
        if family == "sam3":
            from .sam3.build import build_sam3

            return build_sam3(checkpoint)
        if family is None:
            raise CheckpointError(
                f"not a SAM checkpoint: neither {SAM1_KEY!r} (SAM 1) nor {SAM2_KEY!r} (SAM 2) is in "
                f"{checkpoint}"
            )
        if family == "sam2":
            if set(overrides) & ENCODER_OVERRIDES:
                raise ValueError(f"{checkpoint} is a SAM 2 checkpoint; SAM 1 overrides do not apply")
            version, config = _sam2_config_from_checkpoint(state_dict, overrides, checkpoint)
            model: Union[Sam, Sam2] = assemble_sam2(version, **config)
            model.model_type = infer_sam2_config(state_dict)["name"] if not overrides else None
        else:
            if set(overrides) & SAM2_OVERRIDES:
                raise ValueError(f"{checkpoint} is a SAM 1 checkpoint; SAM 2 overrides do not apply")
            config = infer_encoder_config(state_dict)
            logger.info("inferred SAM encoder from %s: %s", checkpoint, _describe_sam1(config))
            config.update(overrides)
            model = assemble_sam(**config)
    elif name in SAM2_SPECS:
        spec = SAM2_SPECS[name]
        config = {**spec.trunk_config(), **overrides}
        model = assemble_sam2(spec.version, **config)
        model.model_type = name if not overrides else None
    else:
        config = SAM_SPECS[name].encoder_config()
        config.update(overrides)
        model = assemble_sam(**config)
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
