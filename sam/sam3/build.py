"""Building SAM 3 and loading its two checkpoint layouts, strictly and safely.

- Meta's `sam3.pt`: `{"model": {"detector.<native key>": ..., "tracker.*": ...}}`, read with
  `torch.load(weights_only=True)`. The native keys are this package's `Sam3Image.state_dict()`
  keys. `pos_embed` keeps a cls slot; `attn.freqs_cis` are complex64 RoPE tables, checked against
  ours and dropped; the tracker is not loaded (the image model does not use it).
- transformers' `save_pretrained` directory (`config.json` + `model.safetensors`, `Sam3Model`),
  converted by name: split q/k/v are fused, the cls slot is restored as zeros, CLIP's
  `text_projection` is transposed.

The sizes come from a `config.json` (transformers' `Sam3Config` format, as the hub repo ships it)
next to the weights, or are read off the weights of a Meta checkpoint (heads: 64 channels per head
in the text encoder, 32 in the detector, as in the released model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, assign_state_dict, load_state_dict_file, meta_parameters, release_freed_memory
from .backbone import ViT
from .interactive import Sam3Interactive, Sam3InteractivePredictor
from .lite_text import LiteTextEncoder, lite_text_options
from .model import Sam3Config, Sam3Image
from .predictor import Sam3Predictor

logger = logging.getLogger(__name__)

# Native (Meta) key -> transformers key; the first matching rule applies.
_RENAMES = [
    (r"backbone\.vision_backbone\.trunk\.patch_embed\.proj\.", "vision_encoder.backbone.embeddings.patch_embeddings.projection."),
    (r"backbone\.vision_backbone\.trunk\.pos_embed$", "vision_encoder.backbone.embeddings.position_embeddings"),
    (r"backbone\.vision_backbone\.trunk\.ln_pre\.", "vision_encoder.backbone.layer_norm."),
    (r"backbone\.vision_backbone\.trunk\.blocks\.(\d+)\.norm([12])\.", r"vision_encoder.backbone.layers.\1.layer_norm\2."),
    (r"backbone\.vision_backbone\.trunk\.blocks\.(\d+)\.attn\.qkv\.", r"vision_encoder.backbone.layers.\1.attention.in_proj_"),
    (r"backbone\.vision_backbone\.trunk\.blocks\.(\d+)\.attn\.proj\.", r"vision_encoder.backbone.layers.\1.attention.o_proj."),
    (r"backbone\.vision_backbone\.trunk\.blocks\.(\d+)\.mlp\.", r"vision_encoder.backbone.layers.\1.mlp."),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.(dconv_2x2_0|dconv_2x2)\.", r"vision_encoder.neck.fpn_layers.\1.scale_layers.0."),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.dconv_2x2_1\.", r"vision_encoder.neck.fpn_layers.\1.scale_layers.2."),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.conv_1x1\.", r"vision_encoder.neck.fpn_layers.\1.proj1."),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.conv_3x3\.", r"vision_encoder.neck.fpn_layers.\1.proj2."),
    (r"backbone\.language_backbone\.encoder\.token_embedding\.", "text_encoder.text_model.embeddings.token_embedding."),
    (r"backbone\.language_backbone\.encoder\.positional_embedding$", "text_encoder.text_model.embeddings.position_embedding.weight"),
    (r"backbone\.language_backbone\.encoder\.ln_final\.", "text_encoder.text_model.final_layer_norm."),
    (r"backbone\.language_backbone\.encoder\.text_projection$", "text_encoder.text_projection.weight"),
    (r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\.attn\.", r"text_encoder.text_model.encoder.layers.\1.self_attn."),
    (r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\.ln_([12])\.", r"text_encoder.text_model.encoder.layers.\1.layer_norm\2."),
    (r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"text_encoder.text_model.encoder.layers.\1.mlp.fc1."),
    (r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"text_encoder.text_model.encoder.layers.\1.mlp.fc2."),
    (r"backbone\.language_backbone\.resizer\.", "text_projection."),
    # SAM 3 LiteText's MobileCLIP encoder (sam.sam3.lite_text) keeps transformers' names.
    (r"backbone\.language_backbone\.encoder\.", "text_encoder."),
    (r"geometry_encoder\.encode\.(\d+)\.cross_attn_image\.", r"geometry_encoder.layers.\1.cross_attn."),
    (r"geometry_encoder\.encode\.(\d+)\.self_attn\.", r"geometry_encoder.layers.\1.self_attn."),
    (r"geometry_encoder\.encode\.(\d+)\.linear([12])\.", r"geometry_encoder.layers.\1.mlp.fc\2."),
    (r"geometry_encoder\.encode\.(\d+)\.norm([123])\.", r"geometry_encoder.layers.\1.layer_norm\2."),
    (r"geometry_encoder\.img_pre_norm\.", "geometry_encoder.vision_layer_norm."),
    (r"geometry_encoder\.norm\.", "geometry_encoder.prompt_layer_norm."),
    (r"geometry_encoder\.encode_norm\.", "geometry_encoder.output_layer_norm."),
    (r"geometry_encoder\.points_", None),  # Meta only: transformers has no point prompts
    (r"transformer\.encoder\.layers\.(\d+)\.cross_attn_image\.", r"detr_encoder.layers.\1.cross_attn."),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"detr_encoder.layers.\1.self_attn."),
    (r"transformer\.encoder\.layers\.(\d+)\.linear([12])\.", r"detr_encoder.layers.\1.mlp.fc\2."),
    (r"transformer\.encoder\.layers\.(\d+)\.norm([123])\.", r"detr_encoder.layers.\1.layer_norm\2."),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.", r"detr_decoder.layers.\1.self_attn."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_text\.", r"detr_decoder.layers.\1.text_cross_attn."),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.", r"detr_decoder.layers.\1.vision_cross_attn."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.", r"detr_decoder.layers.\1.vision_cross_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.catext_norm\.", r"detr_decoder.layers.\1.text_cross_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.", r"detr_decoder.layers.\1.self_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.", r"detr_decoder.layers.\1.mlp_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.linear([12])\.", r"detr_decoder.layers.\1.mlp.fc\2."),
    (r"transformer\.decoder\.norm\.", "detr_decoder.output_layer_norm."),
    (r"transformer\.decoder\.bbox_embed\.", "detr_decoder.box_head."),
    (r"transformer\.decoder\.presence_token_head\.", "detr_decoder.presence_head."),
    (r"transformer\.decoder\.presence_token_out_norm\.", "detr_decoder.presence_layer_norm."),
    (r"transformer\.decoder\.boxRPB_embed_([xy])\.", r"detr_decoder.box_rpb_embed_\1."),
    (r"transformer\.decoder\.", "detr_decoder."),
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.", "dot_product_scoring.text_mlp_out_norm."),
    (r"dot_prod_scoring\.prompt_mlp\.", "dot_product_scoring.text_mlp."),
    (r"dot_prod_scoring\.prompt_proj\.", "dot_product_scoring.text_proj."),
    (r"dot_prod_scoring\.hs_proj\.", "dot_product_scoring.query_proj."),
    (r"segmentation_head\.pixel_decoder\.", "mask_decoder.pixel_decoder."),
    (r"segmentation_head\.mask_predictor\.mask_embed\.", "mask_decoder.mask_embedder."),
    (r"segmentation_head\.instance_seg_head\.", "mask_decoder.instance_projection."),
    (r"segmentation_head\.semantic_seg_head\.", "mask_decoder.semantic_projection."),
    (r"segmentation_head\.cross_attend_prompt\.", "mask_decoder.prompt_cross_attn."),
    (r"segmentation_head\.cross_attn_norm\.", "mask_decoder.prompt_cross_attn_norm."),
]
_NUMBERED_MLPS = re.compile(r"\.(box_head|presence_head|ref_point_head|box_rpb_embed_[xy]|text_mlp)\.layers\.(\d+)\.")
_TRANSFORMERS_IGNORED = ("tracker_model.", "tracker_neck.")
_META_IGNORED = re.compile(r"^(tracker\.|detector\.backbone\.vision_backbone\.sam2_convs\.|detector\.inst_interactive_predictor\.)")


def transformers_keys(native_key: str) -> list[str]:
    """The transformers key(s) holding a native parameter: three for a fused q/k/v projection,
    none for a parameter transformers lacks (the point projections)."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, native_key):
            if replacement is None:
                return []
            key = re.sub(pattern, replacement, native_key, count=1)
            break
    else:
        key = native_key
    key = _NUMBERED_MLPS.sub(lambda m: f".{m[1]}.layer{int(m[2]) + 1}.", key)
    if not key.startswith("text_encoder."):
        key = key.replace(".out_proj.", ".o_proj.")
    fused = re.match(r"(.*)\.in_proj_(weight|bias)$", key)
    if fused:
        return [f"{fused[1]}.{name}_proj.{fused[2]}" for name in "qkv"]
    return [key]


def from_transformers(hf_state: Mapping[str, torch.Tensor], model: Sam3Image) -> dict[str, torch.Tensor]:
    """A transformers `Sam3Model` state dict -> this model's (Meta's) state dict. Strict: a missing or
    unexpected key raises CheckpointError."""
    native, used = {}, set()
    for key, reference in model.state_dict().items():
        names = transformers_keys(key)
        if not names:
            native[key] = torch.zeros(reference.shape, dtype=reference.dtype)  # point projections: unused without points (the model may be on meta)
            continue
        missing = [name for name in names if name not in hf_state]
        if missing:
            raise CheckpointError(f"transformers SAM 3 checkpoint lacks {missing[0]!r} (for {key!r})")
        used.update(names)
        value = torch.cat([hf_state[name] for name in names]) if len(names) > 1 else hf_state[names[0]]
        if key.endswith("trunk.pos_embed"):
            value = torch.cat((value.new_zeros(1, 1, value.shape[-1]), value), dim=1)
        elif key.endswith("encoder.text_projection"):
            value = value.t()
        native[key] = value
    extra = [k for k in hf_state if k not in used and not k.startswith(_TRANSFORMERS_IGNORED)]
    if extra:
        raise CheckpointError(f"transformers SAM 3 checkpoint has {len(extra)} unexpected keys, e.g. {extra[:3]}")
    return native


def to_transformers(native_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's state dict -> transformers `Sam3Model` names (the inverse of from_transformers)."""
    out = {}
    for key, value in native_state.items():
        names = transformers_keys(key)
        if key.endswith("trunk.pos_embed"):
            value = value[:, 1:]
        elif key.endswith("encoder.text_projection"):
            value = value.t()
        for name, part in zip(names, value.chunk(len(names)) if len(names) > 1 else [value]):
            out[name] = part.contiguous()
    return out


def meta_checkpoint(model: Sam3Image) -> dict:
    """The model in Meta's `sam3.pt` layout: `{"model": {"detector.*": ...}}` with the RoPE buffers."""
    state = {f"detector.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for name, buffer in model.named_buffers():
        if name.endswith("attn.freqs_cis"):
            state[f"detector.{name}"] = buffer.clone()
    return {"model": state}


def config_from_transformers(config: Mapping) -> Sam3Config:
    """A transformers `Sam3Config` dict (its `config.json`) -> Sam3Config."""
    config = config.get("detector_config") or config
    vision, vit = config["vision_config"], config["vision_config"]["backbone_config"]
    text, geo = config["text_config"], config["geometry_encoder_config"]
    enc, dec, mask = config["detr_encoder_config"], config["detr_decoder_config"], config["mask_decoder_config"]
    if text.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"SAM 3's text encoder uses exact GELU; this config says {text['hidden_act']!r}")
    heads = {geo["num_attention_heads"], enc["num_attention_heads"], dec["num_attention_heads"], mask["num_attention_heads"]}
    ffn = {geo["intermediate_size"], enc["intermediate_size"], dec["intermediate_size"]}
    if len(heads) > 1 or len(ffn) > 1:
        raise CheckpointError(f"SAM 3 detector parts must share heads and MLP width; config has {heads} and {ffn}")
    eps = vit.get("layer_norm_eps", 1e-6)
    if eps != 1e-5:
        logger.warning("config.json sets the ViT LayerNorm eps to %g; Meta's SAM 3 uses 1e-5 (following the config)", eps)
    return Sam3Config(
        image_size=vit["image_size"], patch_size=vit["patch_size"], pretrain_image_size=vit["pretrain_image_size"],
        vit_dim=vit["hidden_size"], vit_depth=vit["num_hidden_layers"], vit_heads=vit["num_attention_heads"],
        vit_mlp_dim=vit["intermediate_size"], window_size=vit["window_size"], global_blocks=vit["global_attn_indexes"],
        vit_eps=eps, rope_theta=(vit.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        scale_factors=vision["scale_factors"], d_model=vision["fpn_hidden_size"], num_heads=heads.pop(),
        ffn_dim=ffn.pop(), vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
        text_width=text["hidden_size"], text_layers=text["num_hidden_layers"], text_heads=text["num_attention_heads"],
        text_mlp_dim=text["intermediate_size"], text_output_dim=text["projection_dim"], geometry_layers=geo["num_layers"],
        roi_size=geo["roi_size"], point_projections=False, encoder_layers=enc["num_layers"],
        decoder_layers=dec["num_layers"], num_queries=dec["num_queries"], pixel_decoder_stages=mask["num_upsampling_stages"],
    )


# Key of the MobileCLIP text encoder in a transformers `Sam3LiteTextModel` checkpoint.
LITE_TEXT_KEY = "text_encoder.embeddings.token_embedding.weight"
# SAM 3 prompts are padded to 32 tokens (Meta's and transformers' processors), whatever the text
# encoder's position table holds (LiteText's has 77 slots and is resized).
PROMPT_TOKENS = 32


def build_lite_text_sam3(config: Sam3Config, text_options: dict) -> Sam3Image:
    """A SAM 3 image model whose text encoder is LiteText's (`LiteTextEncoder(**text_options)`);
    `config.extra["lite_text"]` records the options."""
    # Sam3Image builds a CLIP text encoder from the config; a minimal one, replaced at once.
    placeholder = dataclasses.replace(config, vocab_size=1, text_width=8, text_layers=0, text_heads=1,
                                      text_mlp_dim=8, text_output_dim=8)
    model = Sam3Image(placeholder)
    model.backbone.language_backbone = LiteTextEncoder(config.d_model, config.context_length, **text_options)
    model.config = dataclasses.replace(config, extra={**config.extra, "lite_text": dict(text_options)})
    return model


def _count(state: Mapping, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def config_from_meta_weights(state: Mapping[str, torch.Tensor]) -> Sam3Config:
    """Sizes read off native (Meta) weights. Heads: the ViT's from its RoPE tables, 64 channels per
    text head and 32 per detector head otherwise (the released model's)."""
    vit = vit_sizes_from_meta_weights(state)
    text = "backbone.language_backbone.encoder."
    d_model = state["backbone.language_backbone.resizer.weight"].shape[0]
    text_width = state[text + "token_embedding.weight"].shape[1]
    return Sam3Config(
        **vit, d_model=d_model, num_heads=max(1, d_model // 32),
        ffn_dim=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
        vocab_size=state[text + "token_embedding.weight"].shape[0], context_length=state[text + "positional_embedding"].shape[0],
        text_width=text_width, text_layers=_count(state, r"backbone\.language_backbone\.encoder\.transformer\.resblocks\.(\d+)\."),
        text_heads=max(1, text_width // 64), text_mlp_dim=state[text + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        text_output_dim=state[text + "text_projection"].shape[1], geometry_layers=_count(state, r"geometry_encoder\.encode\.(\d+)\."),
        roi_size=state["geometry_encoder.boxes_pool_project.weight"].shape[-1],
        point_projections="geometry_encoder.points_direct_project.weight" in state,
        encoder_layers=_count(state, r"transformer\.encoder\.layers\.(\d+)\."),
        decoder_layers=_count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        num_queries=state["transformer.decoder.query_embed.weight"].shape[0],
        pixel_decoder_stages=_count(state, r"segmentation_head\.pixel_decoder\.conv_layers\.(\d+)\."),
    )


def vit_sizes_from_meta_weights(state: Mapping[str, torch.Tensor]) -> dict:
    """The ViT trunk's Sam3Config fields read off native weights (`backbone.vision_backbone.trunk.*`):
    heads, grid, window and global blocks from the RoPE tables when present, else the released model's."""
    trunk = "backbone.vision_backbone.trunk."
    pos = state[trunk + "pos_embed"]
    patch = state[trunk + "patch_embed.proj.weight"].shape[-1]
    depth = _count(state, r"backbone\.vision_backbone\.trunk\.blocks\.(\d+)\.")
    tables = [state.get(f"{trunk}blocks.{i}.attn.freqs_cis") for i in range(depth)]
    vit_dim, vit_heads, window, grid, global_blocks = pos.shape[-1], vit_dim_heads(pos.shape[-1]), 24, 72, (7, 15, 23, 31)
    if all(t is not None for t in tables):
        vit_heads = vit_dim // (2 * tables[0].shape[-1])
        sizes = [t.shape[0] for t in tables]
        grid = int(max(sizes) ** 0.5)
        global_blocks = tuple(i for i, s in enumerate(sizes) if s == max(sizes))
        window = int(min(sizes) ** 0.5) if min(sizes) != max(sizes) else grid
    return dict(
        image_size=grid * patch, patch_size=patch, pretrain_image_size=int((pos.shape[1] - 1) ** 0.5) * patch,
        vit_dim=vit_dim, vit_depth=depth, vit_heads=vit_heads, vit_mlp_dim=state[trunk + "blocks.0.mlp.fc1.weight"].shape[0],
        window_size=window, global_blocks=global_blocks,
    )


def vit_dim_heads(dim: int) -> int:
    return max(1, dim // 64)


def _wrong_family(state: Mapping[str, torch.Tensor], path: Path) -> CheckpointError:
    # The family keys of sam.build.checkpoint_family, read here so sam.build can import this module.
    from ..sam1.build import SAM1_KEY
    from ..sam2.build import SAM2_KEY

    family = "sam2" if SAM2_KEY in state else "sam1" if SAM1_KEY in state else None
    looks = {"sam1": "a SAM 1 checkpoint", "sam2": "a SAM 2 / 2.1 checkpoint"}.get(family, "no SAM 3 checkpoint")
    return CheckpointError(
        f"{path} is not a SAM 3 checkpoint: it looks like {looks} (no SAM 3 image-encoder keys such as "
        f"'detector.backbone.vision_backbone.trunk.pos_embed' or 'vision_encoder.backbone.embeddings.position_embeddings'). "
        f"Load SAM 1 / SAM 2 checkpoints with sam.build_sam."
    )


def _read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file named in messages, the state dict) of a checkpoint file or a transformers
    directory: `model.safetensors`, or the shards its `model.safetensors.index.json` lists."""
    if not path.is_dir():
        return path, load_state_dict_file(path)
    index = path / "model.safetensors.index.json"
    if not (path / "model.safetensors").is_file() and index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            if Path(shard).name != shard:  # the index names files beside it, nothing else
                raise CheckpointError(f"{index} names a shard outside its folder: {shard!r}")
            state.update(load_state_dict_file(path / shard))
        return index, state
    return path / "model.safetensors", load_state_dict_file(path / "model.safetensors")


def _read_config(path: Path) -> dict | None:
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        return None
    return json.loads(config_path.read_text())


def _native_from_meta(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    native, unknown = {}, []
    for key, value in state.items():
        if _META_IGNORED.match(key):
            continue  # the tracker and the interactive predictor's neck: see load_sam3_interactive
        if key.startswith("detector."):
            native[key[len("detector."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys outside 'detector.' and 'tracker.', e.g. {unknown[:3]}")
    return native


def load_sam3(checkpoint: str | Path, config: Sam3Config | None = None) -> Sam3Image:
    """Build a SAM 3 image model from Meta's `sam3.pt` (or any file in its layout), from a
    transformers `save_pretrained` directory / its `model.safetensors` (`Sam3Model`,
    `Sam3LiteTextModel`), or from the hub's combined file (`detector_model.*`). Raises CheckpointError for a
    checkpoint of another family, a missing or unexpected key, a shape mismatch, or RoPE tables
    that disagree with the config."""
    path = Path(checkpoint)
    file, state = _read_weights(path)
    if "detector_model.vision_encoder.backbone.embeddings.position_embeddings" in state:
        # The hub's combined image + video file: the detector under `detector_model.`, the tracker beside it.
        state = {key.removeprefix("detector_model."): value for key, value in state.items()}
    if "vision_encoder.backbone.embeddings.position_embeddings" in state:
        lite = LITE_TEXT_KEY in state
        raw = _read_config(path)
        if raw is None and (config is None or lite):
            raise CheckpointError(f"{file} is in transformers' layout but has no config.json beside it")
        if lite:
            if config is None:
                text = raw.get("text_config") or {}
                # The CLIP fields config_from_transformers reads; LiteText's encoder is built from text_config.
                clip_like = {**raw, "text_config": {**text, "max_position_embeddings": PROMPT_TOKENS}}
                config = config_from_transformers(clip_like)
            with meta_parameters():
                model = build_lite_text_sam3(config, lite_text_options(raw.get("text_config") or {}))
        else:
            config = config or config_from_transformers(raw)
            with meta_parameters():
                model = Sam3Image(config)
        native = from_transformers(state, model)
        tables = {}
    elif "detector.backbone.vision_backbone.trunk.pos_embed" in state or "backbone.vision_backbone.trunk.pos_embed" in state:
        native = _native_from_meta(state, path) if "detector.backbone.vision_backbone.trunk.pos_embed" in state else dict(state)
        tables = {k: native.pop(k) for k in [k for k in native if k.endswith("attn.freqs_cis")]}
        if config is None:
            raw = _read_config(path)
            if raw is not None:
                config = config_from_transformers(raw)
                config.vit_eps, config.point_projections = 1e-5, "geometry_encoder.points_direct_project.weight" in native
            else:
                try:
                    config = config_from_meta_weights({**native, **tables})
                except (KeyError, IndexError) as error:
                    raise CheckpointError(f"{file}: SAM 3 checkpoint lacks {error} needed to read its sizes") from error
        with meta_parameters():  # the weights replace the parameters: no random copy of the model is made
            model = Sam3Image(config)
    else:
        raise _wrong_family(state, file)
    for key, table in tables.items():
        ours = model.get_buffer(key)
        if table.shape != ours.shape or not torch.allclose(torch.view_as_real(table.to(torch.complex64)), torch.view_as_real(ours), atol=1e-4):
            raise CheckpointError(f"{file}: RoPE table {key!r} {tuple(table.shape)} does not match the config (window/grid/heads)")
    del state
    try:
        assign_state_dict(model, native)
    except RuntimeError as error:
        raise CheckpointError(f"{file} does not fit a SAM 3 image model of these sizes: {str(error).splitlines()[0]} ...") from error
    release_freed_memory()
    logger.info("loaded SAM 3 image model from %s", file)
    return model.eval()


def build_sam3(checkpoint: str | Path | None = None, config: Sam3Config | None = None) -> Sam3Image:
    """A SAM 3 image model: loaded from `checkpoint` (see load_sam3), or randomly initialised at the
    given (default: released) sizes when no checkpoint is given."""
    if checkpoint is not None:
        return load_sam3(checkpoint, config)
    return Sam3Image(config or Sam3Config()).eval()


# --------------------------------------------------------------------------- interactive predictor
# Sam3Interactive key (after `sam_prompt_encoder.` / `sam_mask_decoder.`) -> transformers
# `Sam3TrackerModel` key; the first matching rule applies.
_TRACKER_RENAMES = [
    (r"no_mem_embed$", "no_memory_embedding"),
    (r"sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"sam_prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"sam_prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"sam_prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"sam_prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"sam_prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"sam_prompt_encoder\.", "prompt_encoder."),
    (r"sam_mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"sam_mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"sam_mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"sam_mask_decoder\.transformer\.(.*)norm_final_attn\.", r"mask_decoder.transformer.\1layer_norm_final_attn."),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.lin1\.", r"mask_decoder.transformer.layers.\1.mlp.proj_in."),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.lin2\.", r"mask_decoder.transformer.layers.\1.mlp.proj_out."),
    (r"sam_mask_decoder\.", "mask_decoder."),
]
# transformers' 3-layer MLPs: proj_in, layers.0, proj_out (ours: layers.0, 1, 2).
_TRACKER_MLP = re.compile(r"\.(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.(\d)\.")
_POINT_EMBEDDING = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
# Keys of a transformers tracker checkpoint that the image predictor does not use.
_TRACKER_IGNORED = re.compile(r"^(prompt_encoder\.shared_embedding\.|memory_|mask_downsample|object_pointer_proj"
                              r"|temporal_positional_encoding|no_memory_positional_encoding|no_object_pointer"
                              r"|occlusion_spatial_embedding)")


def tracker_transformers_key(native_key: str) -> str | list[str]:
    """The transformers `Sam3TrackerModel` key(s) of a Sam3Interactive parameter (a list for the
    trunk's fused q/k/v); the SAM point embeddings map to rows of `prompt_encoder.point_embed`."""
    if native_key.startswith("trunk."):
        return transformers_keys("backbone.vision_backbone." + native_key)
    if native_key.startswith("sam2_convs."):
        names = transformers_keys("backbone.vision_backbone.convs." + native_key[len("sam2_convs."):])
        return names[0]
    if _POINT_EMBEDDING.match(native_key):
        return "prompt_encoder.point_embed.weight"
    for pattern, replacement in _TRACKER_RENAMES:
        if re.match(pattern, native_key):
            key = re.sub(pattern, replacement, native_key, count=1)
            break
    else:
        key = native_key
    key = key.replace(".out_proj.", ".o_proj.")
    names = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}
    return _TRACKER_MLP.sub(lambda m: f".{m[1]}.{names[m[2]]}.", key)


def _tracker_state_from_hub(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' on-disk tracker names -> `Sam3TrackerModel` names, renamed as transformers
    does on loading: `tracker_model.` dropped, `tracker_neck.` -> `vision_encoder.neck.`,
    `detector_model.vision_encoder.backbone.` -> `vision_encoder.backbone.` (the hub's combined file
    and `Sam3TrackerModel.save_pretrained` both write these); the detector's other keys are left out."""
    out = {}
    for key, value in state.items():
        # transformers' Sam3VideoModel.save_pretrained writes `tracker_model.` twice (the hub file once).
        key = key.removeprefix("tracker_model.").removeprefix("tracker_model.")
        if key.startswith("tracker_neck."):
            out["vision_encoder.neck." + key[len("tracker_neck."):]] = value
        elif key.startswith("detector_model.vision_encoder.backbone."):
            out[key[len("detector_model."):]] = value
        elif not key.startswith("detector_model."):
            out[key] = value
    return out


def interactive_from_transformers(hf_state: Mapping[str, torch.Tensor], model: Sam3Interactive) -> dict[str, torch.Tensor]:
    """A transformers `Sam3TrackerModel` state dict -> Sam3Interactive's. Strict: a missing or
    unexpected key raises CheckpointError."""
    native, used = {}, set()
    for key, reference in model.state_dict().items():
        names = tracker_transformers_key(key)
        names = names if isinstance(names, list) else [names]
        missing = [name for name in names if name not in hf_state]
        if missing:
            raise CheckpointError(f"transformers SAM 3 tracker checkpoint lacks {missing[0]!r} (for {key!r})")
        used.update(names)
        value = torch.cat([hf_state[name] for name in names]) if len(names) > 1 else hf_state[names[0]]
        if (point := _POINT_EMBEDDING.match(key)):
            value = value[int(point[1])][None]
        elif key == "trunk.pos_embed":
            value = torch.cat((value.new_zeros(1, 1, value.shape[-1]), value), dim=1)
        native[key] = value
    extra = [k for k in hf_state if k not in used and not _TRACKER_IGNORED.match(k)]
    if extra:
        raise CheckpointError(f"transformers SAM 3 tracker checkpoint has {len(extra)} unexpected keys, e.g. {extra[:3]}")
    return native


def interactive_to_transformers(native_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sam3Interactive's state dict -> transformers `Sam3TrackerModel` names (for tests and export)."""
    out: dict[str, torch.Tensor] = {}
    points = {}
    for key, value in native_state.items():
        names = tracker_transformers_key(key)
        if (point := _POINT_EMBEDDING.match(key)):
            points[int(point[1])] = value[0]
            continue
        if key == "trunk.pos_embed":
            value = value[:, 1:]
        names = names if isinstance(names, list) else [names]
        for name, part in zip(names, value.chunk(len(names)) if len(names) > 1 else [value]):
            out[name] = part.contiguous()
    out["prompt_encoder.point_embed.weight"] = torch.stack([points[i] for i in sorted(points)])
    out["prompt_encoder.shared_embedding.positional_embedding"] = out["shared_image_embedding.positional_embedding"]
    return out


def interactive_meta_state(model: Sam3Interactive) -> dict[str, torch.Tensor]:
    """Sam3Interactive's own parameters under their `sam3.pt` names (the trunk is the detector's)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("sam2_convs."):
            out["detector.backbone.vision_backbone." + key] = value.detach().clone()
        elif not key.startswith("trunk."):
            out["tracker." + key] = value.detach().clone()
    return out


def _interactive_sizes(state: Mapping[str, torch.Tensor], prefix: str, num_heads: int) -> dict:
    """Decoder sizes read off Meta-named weights (`prefix` + sam_mask_decoder...); the weights do
    not record the head count (the released model's is 8)."""
    decoder = prefix + "sam_mask_decoder."
    return dict(
        d_model=state[prefix + "no_mem_embed"].shape[-1],
        mlp_dim=state[decoder + "transformer.layers.0.mlp.lin1.weight"].shape[0],
        iou_head_hidden_dim=state[decoder + "iou_prediction_head.layers.0.weight"].shape[0],
        num_heads=num_heads,
    )


def load_sam3_interactive(
    checkpoint: str | Path, image_model: Sam3Image | None = None, num_heads: int | None = None
) -> Sam3Interactive:
    """SAM 3's interactive (point / box) model from Meta's `sam3.pt` (`tracker.sam_*`, the detector's
    `sam2_convs`), a transformers `Sam3TrackerModel` `save_pretrained` directory (or the hub's
    combined `model.safetensors`). It shares `image_model`'s ViT trunk; without one, the image model
    is loaded from the same Meta file (a transformers tracker file brings its own ViT). A tracker
    file whose ViT differs from `image_model`'s raises CheckpointError, as does a checkpoint of another
    family or without the tracker's weights."""
    path = Path(checkpoint)
    file, state = _read_weights(path)
    if any(key.startswith(("tracker_model.", "tracker_neck.")) for key in state):
        state = _tracker_state_from_hub(state)
    if "prompt_encoder.point_embed.weight" in state:
        full = _read_config(path) or {}
        raw = full.get("tracker_config") or full
        # The hub's combined config (Sam3VideoConfig) may leave the tracker's vision config to the detector's.
        vision = raw.get("vision_config") or (full.get("detector_config") or {}).get("vision_config")
        if not vision:
            raise CheckpointError(f"{file} is a transformers SAM 3 tracker checkpoint but has no config.json beside it")
        vit, decoder = vision["backbone_config"], raw.get("mask_decoder_config") or {}
        trunk = image_model.backbone.vision_backbone.trunk if image_model is not None else ViT(
            vit["image_size"], vit["patch_size"], vit["pretrain_image_size"], vit["hidden_size"], vit["num_hidden_layers"],
            vit["num_attention_heads"], vit["intermediate_size"], vit["window_size"], vit["global_attn_indexes"],
            (vit.get("rope_parameters") or {}).get("rope_theta", 10000.0), vit.get("layer_norm_eps", 1e-6),
        )
        model = Sam3Interactive(
            trunk, image_size=vit["image_size"], patch_size=vit["patch_size"], vit_dim=vit["hidden_size"],
            d_model=vision["fpn_hidden_size"], scale_factors=vision["scale_factors"],
            num_heads=num_heads or decoder.get("num_attention_heads", 8), mlp_dim=decoder.get("mlp_dim", 2048),
            iou_head_hidden_dim=decoder.get("iou_head_hidden_dim", 256),
        )
        native = interactive_from_transformers(state, model)
        if image_model is not None:
            ours = trunk.state_dict()
            if any(not torch.equal(native[f"trunk.{k}"], v) for k, v in ours.items()):
                raise CheckpointError(f"{file}: its ViT weights differ from the image model's; the interactive "
                                      "predictor must run on the same backbone")
    elif "tracker.sam_mask_decoder.iou_token.weight" in state:
        if image_model is None:
            image_model = load_sam3(checkpoint)
        config = image_model.config
        tracker_config = (_read_config(path) or {}).get("tracker_config") or {}
        num_heads = num_heads or (tracker_config.get("mask_decoder_config") or {}).get("num_attention_heads")
        model = Sam3Interactive(
            image_model.backbone.vision_backbone.trunk, image_size=config.image_size, patch_size=config.patch_size,
            vit_dim=config.vit_dim, scale_factors=config.scale_factors, **_interactive_sizes(state, "tracker.", num_heads or 8),
        )
        native = {}
        for key in model.state_dict():
            if key.startswith("trunk."):
                continue
            meta_key = ("detector.backbone.vision_backbone." if key.startswith("sam2_convs.") else "tracker.") + key
            if meta_key not in state:
                raise CheckpointError(f"{file}: SAM 3 checkpoint lacks {meta_key!r} (the interactive predictor's weights)")
            native[key] = state[meta_key]
        native.update({f"trunk.{k}": v for k, v in model.trunk.state_dict().items()})
    elif "detector.backbone.vision_backbone.trunk.pos_embed" in state or "vision_encoder.backbone.embeddings.position_embeddings" in state:
        raise CheckpointError(f"{file} holds SAM 3's image model only, without the tracker's SAM heads that point and box "
                              "prompts need (Meta's sam3.pt has them under 'tracker.sam_mask_decoder.*')")
    else:
        raise _wrong_family(state, file)
    try:
        model.load_state_dict(native, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{file} does not fit a SAM 3 interactive model of these sizes: {str(error).splitlines()[0]} ...") from error
    logger.info("loaded SAM 3 interactive predictor from %s", file)
    return model.eval()


def load_sam3_interactive_predictor(checkpoint: str | Path, interactive_checkpoint: str | Path | None = None) -> Sam3InteractivePredictor:
    """Concept and point / box predictors on one backbone: both from Meta's `sam3.pt` (it holds the
    image model and the tracker), or the image model from `checkpoint` (any layout load_sam3 reads)
    and the SAM heads from `interactive_checkpoint` (a transformers `Sam3TrackerModel` directory or
    the hub's combined file). Text queries go to `.concept.predict(text=...)`, clicks to `.predict`."""
    image_model = load_sam3(checkpoint)
    interactive = load_sam3_interactive(interactive_checkpoint or checkpoint, image_model=image_model)
    return Sam3InteractivePredictor(Sam3Predictor(image_model), interactive)
