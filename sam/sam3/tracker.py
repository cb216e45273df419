"""SAM 3's video tracker: SAM 2.1's memory tracker on SAM 3's Perception Encoder ViT.

Meta's `sam3.pt` (`tracker.*`, with the ViT trunk and the second neck `sam2_convs` under
`detector.backbone.vision_backbone.`) and transformers' `Sam3TrackerVideoModel` hold the same
model: the ViT output goes through the second FPN neck, whose three finest levels (strides 14/4,
14/2 and 14) replace Hiera's; memory attention, the memory encoder, object pointers and the SAM
heads are SAM 2.1's at SAM 3's sizes (a 72x72 grid at 1008 px, masks resized to 1152 = 16 x 72
before the memory encoder). So `Sam3Tracker` is a `sam.Sam2` whose frame encoder is SAM 3's, and
`sam.video.SamVideoPredictor` tracks with it unchanged:

    predictor = SamVideoPredictor.from_sam3("sam3.pt")   # or a transformers directory
    state = predictor.init_state("clip.mp4")
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[210, 350]], labels=[1])
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(state):
        ...

The SAM 3 tracker differs from SAM 2.1's in its settings: memory attention reads at most the 4
conditioning frames closest in time (`max_cond_frames_in_attn=4`), and frames are normalised
with mean = std = 0.5.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..modeling.transformer import TwoWayTransformer
from ..sam2.decoder import Sam2MaskDecoder, Sam2PromptEncoder
from ..sam2.memory import MemoryAttention, MemoryAttentionLayer, MemoryEncoder, RoPEAttention
from ..sam2.model import FrameFeatures, Sam2, Sam2TrackingConfig
from .backbone import ViT
from .interactive import neck_convs
from .layers import sine_grid

logger = logging.getLogger(__name__)

# The SAM 3 tracker's settings that differ from SAM 2.1's (Meta's build_tracker, transformers'
# Sam3TrackerVideoConfig defaults).
SAM3_MAX_COND_FRAMES = 4


class Sam3TrackerImageEncoder(nn.Module):
    """The ViT trunk (shared with the detector in Meta's model) and the tracker's own FPN neck
    (`sam2_convs`, one branch per scale factor; the coarsest, 0.5x, is in the checkpoints but unused)."""

    used_levels: int = 3

    def __init__(self, trunk: ViT, vit_dim: int, d_model: int, scale_factors) -> None:
        super().__init__()
        self.trunk = trunk
        self.sam2_convs = neck_convs(vit_dim, d_model, scale_factors)
        self.d_model = d_model

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, 3, S, S) normalised to [-1, 1] -> [(B, d, 4g, 4g), (B, d, 2g, 2g), (B, d, g, g)]."""
        trunk_map = self.trunk(pixels)
        return [conv(trunk_map) for conv in self.sam2_convs[: self.used_levels]]

    def decoder_levels(self, trunk_map: torch.Tensor, decoder) -> list[torch.Tensor]:
        """What the tracking steps read from a trunk output: [conv_s0(level 0) (B, d/8, 4g, 4g),
        conv_s1(level 1) (B, d/4, 2g, 2g), level 2 (B, d, g, g)]; the decoder's 1x1 convs are folded
        into the neck's (`NeckBranch`), the two finer levels are never needed at full width."""
        convs = self.sam2_convs
        return [convs[0](trunk_map, decoder.conv_s0), convs[1](trunk_map, decoder.conv_s1), convs[2](trunk_map)]


class Sam3Tracker(Sam2):
    """SAM 3's tracker as a `Sam2`: every tracking step (`condition_on_memory`, `track_heads`,
    `encode_memory`, ...) is SAM 2.1's; only the frame encoder and the preprocessing differ.

    `state_dict()` keys: `image_encoder.trunk.*` (Meta: `detector.backbone.vision_backbone.trunk.*`),
    `image_encoder.sam2_convs.*` (`detector.backbone.vision_backbone.sam2_convs.*`),
    `memory_attention.*` (`tracker.transformer.encoder.*`), `memory_encoder.*`
    (`tracker.maskmem_backbone.*`), the rest as `tracker.*`."""

    def __init__(
        self,
        trunk: ViT,
        *,
        image_size: int = 1008,
        patch_size: int = 14,
        vit_dim: int = 1024,
        d_model: int = 256,
        mem_dim: int = 64,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_heads: int = 8,
        mlp_dim: int = 2048,
        iou_head_hidden_dim: int = 256,
        memory_layers: int = 4,
        memory_heads: int = 1,
        memory_mlp_dim: int = 2048,
        fuser_layers: int = 2,
        tracking: Sam2TrackingConfig | None = None,
    ) -> None:
        grid = image_size // patch_size

        def memory_layer() -> MemoryAttentionLayer:
            return MemoryAttentionLayer(
                d_model=d_model, dim_feedforward=memory_mlp_dim, dropout=0.1,
                self_attention=RoPEAttention(d_model, memory_heads, dropout=0.1, feat_sizes=(grid, grid)),
                cross_attention=RoPEAttention(d_model, memory_heads, dropout=0.1, kv_in_dim=mem_dim, rope_k_repeat=True,
                                              feat_sizes=(grid, grid)),
                pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
            )

        prompt_encoder = Sam2PromptEncoder(
            embed_dim=d_model, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
        )
        super().__init__(
            Sam3TrackerImageEncoder(trunk, vit_dim, d_model, scale_factors),
            MemoryAttention(d_model, [memory_layer() for _ in range(memory_layers)], pos_enc_at_input=True),
            # Masks enter the memory encoder at 4x the low-res mask size (1152 px at 1008 px input).
            MemoryEncoder(out_dim=mem_dim, in_dim=d_model, fuser_layers=fuser_layers, mask_size=4 * prompt_encoder.mask_input_size[0]),
            prompt_encoder,
            # Meta's tracker uses SAM 1's two-way transformer (MLP `lin1`/`lin2`) under SAM 2.1's decoder.
            Sam2MaskDecoder(
                transformer_dim=d_model,
                transformer=TwoWayTransformer(depth=2, embedding_dim=d_model, num_heads=num_heads, mlp_dim=mlp_dim),
                iou_head_hidden_dim=iou_head_hidden_dim,
            ),
            version="2.1",
            image_size=image_size,
            backbone_stride=patch_size,
            tracking=tracking or Sam2TrackingConfig(max_cond_frames_in_attn=SAM3_MAX_COND_FRAMES),
        )
        self.model_type = "sam3"

    # Where a frame's mask is brought to the memory encoder's input size (16 x the grid), which the
    # two references do in a different order: "mask" (Meta's: the mask is binarised or put through
    # the sigmoid, scaled to +-10, then resized by the mask downsampler) or "logits" (transformers':
    # the logits are resized first). Same weights; the masks agree at IoU ~0.98, not exactly.
    memory_mask_resize: str = "mask"

    def encode_memory(
        self, features: FrameFeatures, high_res_masks: torch.Tensor, object_score_logits: torch.Tensor, binarize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sam2.encode_memory, with the mask resize where `memory_mask_resize` puts it."""
        if self.memory_mask_resize not in ("mask", "logits"):
            raise ValueError(f"memory_mask_resize must be 'mask' or 'logits', got {self.memory_mask_resize!r}")
        size = self.memory_encoder.mask_downsampler.mask_size
        if self.memory_mask_resize == "logits" and tuple(high_res_masks.shape[-2:]) != (size, size):
            high_res_masks = F.interpolate(high_res_masks.float(), (size, size), mode="bilinear", align_corners=False,
                                           antialias=True)
        return super().encode_memory(features, high_res_masks, object_score_logits, binarize)

    def set_fused_kernels(self, enabled: bool) -> None:
        self.fused_kernels = enabled  # the ViT has one path

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> [-1, 1] (SAM 3 normalises with mean = std = 0.5)."""
        return (pixels - 0.5) / 0.5

    def _decoder_levels(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        trunk_map = self.image_encoder.trunk(self.preprocess(pixels.to(self.no_mem_embed.dtype)))
        return self.image_encoder.decoder_levels(trunk_map, self.sam_mask_decoder)

    def encode_image(self, pixels: torch.Tensor) -> dict:
        """Single-image features as `Sam2.encode_image` (no_mem_embed added to the stride-14 level)."""
        high_res_0, high_res_1, embed = self._decoder_levels(pixels)
        return {"image_embed": embed + self.no_mem_embed.view(1, -1, 1, 1), "high_res_feats": [high_res_0, high_res_1]}

    def encode_frame(self, pixels: torch.Tensor) -> FrameFeatures:
        """pixels (1, 3, S, S) RGB in [0, 1] -> the raw stride-14 features, their sine positions and
        the two finer levels through conv_s0 / conv_s1 (see Sam2.encode_frame)."""
        high_res_0, high_res_1, embed = self._decoder_levels(pixels)
        position = sine_grid(embed.shape[-2], embed.shape[-1], embed.shape[1], embed.device, embed.dtype)
        return FrameFeatures(embed, position[None].expand(embed.shape[0], -1, -1, -1), [high_res_0, high_res_1])


# --------------------------------------------------------------------------- checkpoint layouts
# Our key (after the `image_encoder.` / SAM-head keys Sam3Interactive shares) -> transformers'
# `Sam3TrackerVideoModel` key; the first matching rule applies.
_MEMORY_RENAMES = [
    (r"maskmem_tpos_enc$", "memory_temporal_positional_encoding"),
    (r"no_mem_pos_enc$", "no_memory_positional_encoding"),
    (r"no_obj_ptr$", "no_object_pointer"),
    (r"no_obj_embed_spatial$", "occlusion_spatial_embedding_parameter"),
    (r"obj_ptr_tpos_proj\.", "temporal_positional_encoding_projection_layer."),
    (r"obj_ptr_proj\.layers\.0\.", "object_pointer_proj.proj_in."),
    (r"obj_ptr_proj\.layers\.1\.", "object_pointer_proj.layers.0."),
    (r"obj_ptr_proj\.layers\.2\.", "object_pointer_proj.proj_out."),
    (r"mask_downsample\.", "mask_downsample."),
    (r"memory_attention\.layers\.(\d+)\.norm(\d)\.", r"memory_attention.layers.\1.layer_norm\2."),
    (r"memory_attention\.layers\.(\d+)\.(self_attn|cross_attn_image)\.out_proj\.", r"memory_attention.layers.\1.\2.o_proj."),
    (r"memory_attention\.norm\.", "memory_attention.layer_norm."),
    (r"memory_attention\.", "memory_attention."),
    (r"memory_encoder\.pix_feat_proj\.", "memory_encoder.feature_projection."),
    (r"memory_encoder\.fuser\.layers\.(\d+)\.gamma$", r"memory_encoder.memory_fuser.layers.\1.scale"),
    (r"memory_encoder\.fuser\.layers\.(\d+)\.dwconv\.", r"memory_encoder.memory_fuser.layers.\1.depthwise_conv."),
    (r"memory_encoder\.fuser\.layers\.(\d+)\.norm\.", r"memory_encoder.memory_fuser.layers.\1.layer_norm."),
    (r"memory_encoder\.fuser\.layers\.(\d+)\.pwconv([12])\.", r"memory_encoder.memory_fuser.layers.\1.pointwise_conv\2."),
    (r"memory_encoder\.out_proj\.", "memory_encoder.projection."),
]
_MASK_DOWNSAMPLER = re.compile(r"memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(.*)$")
# transformers keys a tracker checkpoint may hold that ours has no counterpart of.
_TRANSFORMERS_IGNORED = re.compile(r"^prompt_encoder\.shared_embedding\.")


def tracker_video_transformers_key(native_key: str, final_downsampler_conv: int = 12) -> str | list[str]:
    """The transformers `Sam3TrackerVideoModel` key(s) of a Sam3Tracker parameter (a list for the
    ViT's fused q/k/v). final_downsampler_conv: index of the mask downsampler's last 1x1 conv."""
    from .build import tracker_transformers_key

    if native_key.startswith("image_encoder."):
        return tracker_transformers_key(native_key[len("image_encoder."):])
    if native_key == "no_mem_embed" or native_key.startswith(("sam_prompt_encoder.", "sam_mask_decoder.")):
        return tracker_transformers_key(native_key)
    downsampler = _MASK_DOWNSAMPLER.match(native_key)
    if downsampler:
        index, rest = int(downsampler[1]), downsampler[2]
        if index == final_downsampler_conv:
            return f"memory_encoder.mask_downsampler.final_conv.{rest}"
        part = {0: "conv", 1: "layer_norm"}[index % 3]
        return f"memory_encoder.mask_downsampler.layers.{index // 3}.{part}.{rest}"
    for pattern, replacement in _MEMORY_RENAMES:
        if re.match(pattern, native_key):
            return re.sub(pattern, replacement, native_key, count=1)
    raise KeyError(f"no transformers name for SAM 3 tracker parameter {native_key!r}")


def _final_conv(model: Sam3Tracker) -> int:
    return len(model.memory_encoder.mask_downsampler.encoder) - 1


def tracker_video_from_transformers(hf_state: Mapping[str, torch.Tensor], model: Sam3Tracker) -> dict[str, torch.Tensor]:
    """A transformers `Sam3TrackerVideoModel` state dict -> Sam3Tracker's. Strict: a missing or
    unexpected key raises CheckpointError."""
    from .build import _POINT_EMBEDDING

    native, used = {}, set()
    final = _final_conv(model)
    for key, reference in model.state_dict().items():
        names = tracker_video_transformers_key(key, final)
        names = names if isinstance(names, list) else [names]
        missing = [name for name in names if name not in hf_state]
        if missing:
            raise CheckpointError(f"transformers SAM 3 tracker checkpoint lacks {missing[0]!r} (for {key!r})")
        used.update(names)
        value = torch.cat([hf_state[name] for name in names]) if len(names) > 1 else hf_state[names[0]]
        if (point := _POINT_EMBEDDING.match(key)):
            value = value[int(point[1])][None]
        elif key == "image_encoder.trunk.pos_embed":
            value = torch.cat((value.new_zeros(1, 1, value.shape[-1]), value), dim=1)
        native[key] = value
    extra = [k for k in hf_state if k not in used and not _TRANSFORMERS_IGNORED.match(k)]
    if extra:
        raise CheckpointError(f"transformers SAM 3 tracker checkpoint has {len(extra)} unexpected keys, e.g. {extra[:3]}")
    return native


def tracker_video_to_transformers(model: Sam3Tracker) -> dict[str, torch.Tensor]:
    """Sam3Tracker's weights under transformers' `Sam3TrackerVideoModel` names (for tests and export)."""
    from .build import _POINT_EMBEDDING

    out: dict[str, torch.Tensor] = {}
    points = {}
    final = _final_conv(model)
    for key, value in model.state_dict().items():
        names = tracker_video_transformers_key(key, final)
        if (point := _POINT_EMBEDDING.match(key)):
            points[int(point[1])] = value[0]
            continue
        if key == "image_encoder.trunk.pos_embed":
            value = value[:, 1:]
        names = names if isinstance(names, list) else [names]
        for name, part in zip(names, value.chunk(len(names)) if len(names) > 1 else [value]):
            out[name] = part.detach().clone().contiguous()
    out["prompt_encoder.point_embed.weight"] = torch.stack([points[i] for i in sorted(points)])
    out["prompt_encoder.shared_embedding.positional_embedding"] = out["shared_image_embedding.positional_embedding"]
    return out


def meta_tracker_key(native_key: str) -> str:
    """A Sam3Tracker key under its name in Meta's `sam3.pt`."""
    for ours, meta in (("image_encoder.trunk.", "detector.backbone.vision_backbone.trunk."),
                       ("image_encoder.sam2_convs.", "detector.backbone.vision_backbone.sam2_convs."),
                       ("memory_attention.", "tracker.transformer.encoder."),
                       ("memory_encoder.", "tracker.maskmem_backbone.")):
        if native_key.startswith(ours):
            return meta + native_key[len(ours):]
    return "tracker." + native_key


def tracker_video_meta_state(model: Sam3Tracker) -> dict[str, torch.Tensor]:
    """Sam3Tracker's weights under their `sam3.pt` names, the ViT's RoPE tables included."""
    state = {meta_tracker_key(k): v.detach().clone() for k, v in model.state_dict().items()}
    for name, buffer in model.image_encoder.trunk.named_buffers():
        if name.endswith("attn.freqs_cis"):
            state[f"detector.backbone.vision_backbone.trunk.{name}"] = buffer.clone()
    return state


def _count(state: Mapping, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _tracker_options(raw: Mapping | None) -> dict[str, Any]:
    """The settings a transformers tracker config records and the weights do not (defaults: the
    released model's)."""
    raw = raw or {}
    decoder = raw.get("mask_decoder_config") or {}
    return dict(
        num_heads=decoder.get("num_attention_heads", 8),
        memory_heads=raw.get("memory_attention_num_attention_heads", 1),
        max_cond_frames=raw.get("max_cond_frame_num", SAM3_MAX_COND_FRAMES),
        max_pointers=raw.get("max_object_pointers_in_encoder", 16),
    )


def _build(trunk: ViT, vit: Mapping, d_model: int, scale_factors, sizes: Mapping, options: Mapping) -> Sam3Tracker:
    tracking = Sam2TrackingConfig(
        num_maskmem=sizes["num_maskmem"], max_obj_ptrs_in_encoder=options["max_pointers"],
        max_cond_frames_in_attn=options["max_cond_frames"],
    )
    return Sam3Tracker(
        trunk, image_size=vit["image_size"], patch_size=vit["patch_size"], vit_dim=vit["hidden_size"], d_model=d_model,
        mem_dim=sizes["mem_dim"], scale_factors=tuple(scale_factors), num_heads=options["num_heads"],
        mlp_dim=sizes["mlp_dim"], iou_head_hidden_dim=sizes["iou_head_hidden_dim"], memory_layers=sizes["memory_layers"],
        memory_heads=options["memory_heads"], memory_mlp_dim=sizes["memory_mlp_dim"], fuser_layers=sizes["fuser_layers"],
        tracking=tracking,
    )


def _vit(vit: Mapping) -> ViT:
    return ViT(vit["image_size"], vit["patch_size"], vit["pretrain_image_size"], vit["hidden_size"], vit["num_hidden_layers"],
               vit["num_attention_heads"], vit["intermediate_size"], vit["window_size"], vit["global_attn_indexes"],
               (vit.get("rope_parameters") or {}).get("rope_theta", 10000.0), vit.get("layer_norm_eps", 1e-6))


def _sizes_from_meta(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The tracker's sizes read off `tracker.*` weights."""
    tpos = state["tracker.maskmem_tpos_enc"]
    return dict(
        num_maskmem=tpos.shape[0], mem_dim=tpos.shape[-1],
        mlp_dim=state["tracker.sam_mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        iou_head_hidden_dim=state["tracker.sam_mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        memory_layers=_count(state, r"tracker\.transformer\.encoder\.layers\.(\d+)\."),
        memory_mlp_dim=state["tracker.transformer.encoder.layers.0.linear1.weight"].shape[0],
        fuser_layers=_count(state, r"tracker\.maskmem_backbone\.fuser\.layers\.(\d+)\."),
    )


def _sizes_from_transformers(raw: Mapping, d_model: int) -> dict[str, int]:
    decoder = raw.get("mask_decoder_config") or {}
    intermediate = raw.get("memory_fuser_intermediate_dim", 4 * d_model)
    if intermediate != 4 * d_model or raw.get("memory_encoder_hidden_size", d_model) != d_model:
        raise CheckpointError("SAM 3 tracker config: the memory fuser must be d_model wide with a 4x MLP, as released "
                              f"(got memory_encoder_hidden_size={raw.get('memory_encoder_hidden_size')}, "
                              f"memory_fuser_intermediate_dim={intermediate}, d_model={d_model})")
    return dict(
        num_maskmem=raw.get("num_maskmem", 7), mem_dim=raw.get("memory_encoder_output_channels", 64),
        mlp_dim=decoder.get("mlp_dim", 2048), iou_head_hidden_dim=decoder.get("iou_head_hidden_dim", 256),
        memory_layers=raw.get("memory_attention_num_layers", 4),
        memory_mlp_dim=raw.get("memory_attention_feed_forward_hidden_size", 2048),
        fuser_layers=raw.get("memory_fuser_num_layers", 2),
    )


def load_sam3_tracker(checkpoint: str | Path, memory_mask_resize: str = "mask", trunk: ViT | None = None) -> Sam3Tracker:
    """SAM 3's video tracker from Meta's `sam3.pt` (`tracker.*` with the detector's ViT trunk and
    `sam2_convs`), a transformers `Sam3TrackerVideoModel` `save_pretrained` directory, or the hub's
    combined file (`detector_model.*`, `tracker_model.*`, `tracker_neck.*`). memory_mask_resize:
    "mask" (Meta's order) or "logits" (transformers'), see Sam3Tracker. trunk: run on this ViT (a
    loaded SAM 3 image model's, `backbone.vision_backbone.trunk`) instead of a copy; the checkpoint's
    ViT weights must equal it. Raises CheckpointError for
    a checkpoint of another family, one without the tracker, a missing or unexpected key or a shape
    that does not fit."""
    if memory_mask_resize not in ("mask", "logits"):
        raise ValueError(f"memory_mask_resize must be 'mask' (Meta's order) or 'logits' (transformers'), got {memory_mask_resize!r}")
    from .build import _read_config, _read_weights, _tracker_state_from_hub, _wrong_family, vit_sizes_from_meta_weights

    path = Path(checkpoint)
    file, state = _read_weights(path)
    full = _read_config(path) or {}
    # A tracker's own config (Sam3TrackerVideoConfig), or the hub's combined one holding it; a
    # config.json of the image model alone (beside a Meta file) says nothing about the tracker.
    raw = full.get("tracker_config") or (full if "memory_attention_num_layers" in full
                                         or str(full.get("model_type", "")).startswith("sam3_tracker") else {})
    if any(key.startswith(("tracker_model.", "tracker_neck.")) for key in state):
        state = _tracker_state_from_hub(state)
    if "memory_temporal_positional_encoding" in state:
        vision = raw.get("vision_config") or (full.get("detector_config") or {}).get("vision_config")
        if not vision:
            raise CheckpointError(f"{file} is a transformers SAM 3 tracker checkpoint but has no config.json beside it")
        vit, d_model = vision["backbone_config"], vision.get("fpn_hidden_size", 256)
        model = _build(trunk or _vit(vit), vit, d_model, vision.get("scale_factors", (4.0, 2.0, 1.0, 0.5)),
                       _sizes_from_transformers(raw, d_model), _tracker_options(raw))
        native, tables = tracker_video_from_transformers(state, model), {}
    elif "tracker.maskmem_tpos_enc" in state and any(key.startswith("tracker.maskmem_backbone.") for key in state):
        prefix = "detector.backbone.vision_backbone."
        detector = {k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")}
        vision = (raw.get("vision_config") or (full.get("detector_config") or {}).get("vision_config")
                  or full.get("vision_config"))
        if vision:
            vit = dict(vision["backbone_config"])
        else:
            try:
                sizes = vit_sizes_from_meta_weights(detector)
            except (KeyError, IndexError) as error:
                raise CheckpointError(f"{file}: SAM 3 checkpoint lacks {error} needed to read its sizes "
                                      "(put the hub's config.json beside it)") from error
            vit = dict(image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                       pretrain_image_size=sizes["pretrain_image_size"], hidden_size=sizes["vit_dim"],
                       num_hidden_layers=sizes["vit_depth"], num_attention_heads=sizes["vit_heads"],
                       intermediate_size=sizes["vit_mlp_dim"], window_size=sizes["window_size"],
                       global_attn_indexes=list(sizes["global_blocks"]))
        vit.setdefault("layer_norm_eps", 1e-5)
        convs = _count(state, r"detector\.backbone\.vision_backbone\.sam2_convs\.(\d+)\.")
        if convs == 0:
            raise CheckpointError(f"{file}: SAM 3 checkpoint lacks the tracker's neck ('{prefix}sam2_convs.*')")
        scale_factors = (4.0, 2.0, 1.0, 0.5)[:convs]
        model = _build(trunk or _vit(vit), vit, state["tracker.no_mem_embed"].shape[-1], scale_factors, _sizes_from_meta(state),
                       _tracker_options(raw))
        native, tables = {}, {}
        for key in model.state_dict():
            meta_key = meta_tracker_key(key)
            if meta_key not in state:
                raise CheckpointError(f"{file}: SAM 3 checkpoint lacks {meta_key!r} (the video tracker's weights)")
            native[key] = state[meta_key]
        tables = {k: v for k, v in state.items() if k.startswith(prefix + "trunk.") and k.endswith("attn.freqs_cis")}
    elif "detector.backbone.vision_backbone.trunk.pos_embed" in state or "vision_encoder.backbone.embeddings.position_embeddings" in state:
        raise CheckpointError(f"{file} holds SAM 3's image model without the video tracker (Meta's sam3.pt has it under "
                              "'tracker.maskmem_backbone.*'; transformers' Sam3TrackerVideoModel under 'memory_encoder.*')")
    else:
        raise _wrong_family(state, file)
    for key, table in tables.items():
        ours = model.image_encoder.trunk.get_buffer(key[len("detector.backbone.vision_backbone.trunk."):])
        if table.shape != ours.shape or not torch.allclose(torch.view_as_real(table.to(torch.complex64)),
                                                           torch.view_as_real(ours), atol=1e-4):
            raise CheckpointError(f"{file}: RoPE table {key!r} {tuple(table.shape)} does not match the config (window/grid/heads)")
    if trunk is not None:
        shared = trunk.state_dict()
        if any(native[f"image_encoder.trunk.{k}"].shape != v.shape or not torch.equal(native[f"image_encoder.trunk.{k}"], v)
               for k, v in shared.items()):
            raise CheckpointError(f"{file}: its ViT weights differ from the given trunk's; the tracker must run on "
                                  "the same backbone")
    try:
        model.load_state_dict(native, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{file} does not fit a SAM 3 tracker of these sizes: {str(error).splitlines()[0]} ...") from error
    model.memory_mask_resize = memory_mask_resize
    logger.info("loaded SAM 3 video tracker from %s", file)
    return model.eval()


