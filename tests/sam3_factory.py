"""Tiny random SAM 3 image models in both checkpoint layouts, built with transformers' `Sam3Model`.

Every parameter is redrawn (LayerNorm/GroupNorm weights around 1, everything else at 1/sqrt(fan-in)),
so no part of the model keeps a default that could hide a wrong mapping. A few output layers are
then rescaled (see tiny_transformers_sam3) so scores spread instead of saturating and masks are
textured: with plain random weights every score sits at the same value and the thresholds mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CONFIG = dict(
    vision_config=dict(
        backbone_config=dict(
            model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, image_size=168, patch_size=14, window_size=6, global_attn_indexes=[1, 2],
            pretrain_image_size=84, layer_norm_eps=1e-5,
        ),
        fpn_hidden_size=32, backbone_feature_sizes=[[48, 48], [24, 24], [12, 12]],
    ),
    text_config=dict(
        model_type="clip_text_model", vocab_size=49408, hidden_size=32, intermediate_size=64, projection_dim=16,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, hidden_act="gelu",
    ),
    geometry_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, roi_size=3),
    detr_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64),
    detr_decoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, num_queries=16),
    mask_decoder_config=dict(hidden_size=32, num_attention_heads=4),
)


def tiny_transformers_sam3(seed: int = 0):
    """A transformers `Sam3Model` at TINY_CONFIG with every parameter randomised (eval mode)."""
    from transformers import Sam3Config, Sam3Model

    torch.manual_seed(seed)
    model = Sam3Model(Sam3Config(**TINY_CONFIG)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel() if param.ndim > 1 else 1
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        # Presence near 0.9 (not at the +-10 clamp), query logits spread over a few units, and
        # instance features with zero-mean channel mixing so masks are neither all-on nor all-off.
        model.detr_decoder.presence_head.layer3.weight.mul_(0.25)
        model.detr_decoder.presence_head.layer3.bias.fill_(2.5)
        model.dot_product_scoring.query_proj.weight.mul_(4)
        model.dot_product_scoring.query_proj.bias.zero_()
        weight = model.mask_decoder.instance_projection.weight
        weight.sub_(weight.mean(dim=1, keepdim=True))
        model.mask_decoder.instance_projection.bias.zero_()
    return model


def save_tiny_sam3(root: Path, seed: int = 0) -> dict[str, Path]:
    """Save one tiny random model as a transformers `save_pretrained` directory ("transformers") and as
    Meta's `sam3.pt` layout with a transformers-style config.json beside it ("meta"), plus a stray
    tracker tensor the loader must ignore. Returns both paths."""
    from sam.sam3.build import config_from_transformers, from_transformers, meta_checkpoint
    from sam.sam3.model import Sam3Image

    model = tiny_transformers_sam3(seed)
    hf_dir = Path(root) / "transformers"
    model.save_pretrained(hf_dir)
    meta_dir = Path(root) / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    config = config_from_transformers(json.loads((hf_dir / "config.json").read_text()))
    native = Sam3Image(config)
    native.load_state_dict(from_transformers(model.state_dict(), native))
    checkpoint = meta_checkpoint(native)
    checkpoint["model"]["tracker.maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    torch.save(checkpoint, meta_dir / "sam3.pt")
    (meta_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    return {"transformers": hf_dir, "meta": meta_dir / "sam3.pt", "model": model}


# --------------------------------------------------------------------------- interactive predictor
# 8 heads, as released: Meta's sam3.pt does not record the count (its loader assumes 8).
TINY_TRACKER_HEADS = dict(hidden_size=32, mlp_dim=64, num_attention_heads=8, iou_head_hidden_dim=32)


def tiny_transformers_tracker(detector, seed: int = 1):
    """A transformers `Sam3TrackerModel` on `detector`'s ViT (a tiny `Sam3Model`), its neck and SAM
    heads randomised like the detector. The mask-embedding MLPs are scaled so the low-res logits
    cross zero inside the image (masks neither empty nor full)."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    # Three FPN levels, not the detector's four: standalone `Sam3TrackerModel.forward` adds
    # no_memory_embedding to the last level it gets and then keeps only the first three, so with
    # the 0.5x level present the embedding would go to a dropped level (Meta, and transformers'
    # own Sam3VideoModel, drop that level first). The three shared levels are the same convs.
    vision = dict(TINY_CONFIG["vision_config"], scale_factors=[4.0, 2.0, 1.0])
    image_size = vision["backbone_config"]["image_size"]
    config = Sam3TrackerConfig(
        vision_config=dict(model_type="sam3_vision_model", **vision),
        prompt_encoder_config=dict(hidden_size=32, image_size=image_size, patch_size=vision["backbone_config"]["patch_size"]),
        mask_decoder_config=TINY_TRACKER_HEADS,
    )
    torch.manual_seed(seed)
    tracker = Sam3TrackerModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tracker.named_parameters():
            if name.startswith("vision_encoder.backbone."):
                continue
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel() if param.ndim > 1 else 1
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        tracker.prompt_encoder.shared_embedding.positional_embedding.copy_(tracker.shared_image_embedding.positional_embedding)
        tracker.vision_encoder.backbone.load_state_dict(detector.vision_encoder.backbone.state_dict())
    return tracker


def save_tiny_sam3_interactive(root: Path, seed: int = 0) -> dict:
    """The tiny detector of save_tiny_sam3 plus a tracker on its ViT, saved three ways: Meta's
    `sam3.pt` (detector + `tracker.*` + `sam2_convs`) with config.json ("meta"), a transformers
    `Sam3TrackerModel` directory ("transformers"), and the hub's combined file ("hub":
    `detector_model.*`, `tracker_model.*`, `tracker_neck.*`). Returns the paths and both
    transformers models."""
    from sam.sam3.build import interactive_from_transformers, interactive_meta_state
    from sam.sam3.interactive import Sam3Interactive
    from sam.sam3.backbone import ViT

    saved = save_tiny_sam3(Path(root) / "detector", seed)
    detector = saved["model"]
    tracker = tiny_transformers_tracker(detector, seed + 1)
    hf_dir = Path(root) / "tracker"
    tracker.save_pretrained(hf_dir)
    vit = TINY_CONFIG["vision_config"]["backbone_config"]
    native = Sam3Interactive(
        ViT(vit["image_size"], vit["patch_size"], vit["pretrain_image_size"], vit["hidden_size"], vit["num_hidden_layers"],
            vit["num_attention_heads"], vit["intermediate_size"], vit["window_size"], vit["global_attn_indexes"], 10000.0, 1e-5),
        image_size=vit["image_size"], patch_size=vit["patch_size"], vit_dim=vit["hidden_size"], d_model=32,
        scale_factors=(4.0, 2.0, 1.0), num_heads=TINY_TRACKER_HEADS["num_attention_heads"], mlp_dim=64, iou_head_hidden_dim=32,
    )
    native.load_state_dict(interactive_from_transformers(tracker.state_dict(), native))
    checkpoint = torch.load(saved["meta"], weights_only=True)
    checkpoint["model"].update(interactive_meta_state(native))
    # Meta's second neck is a full copy of the first, 0.5x level included (unused: scalp 1).
    for key, value in list(checkpoint["model"].items()):
        if key.startswith("detector.backbone.vision_backbone.convs.3."):
            checkpoint["model"][key.replace(".convs.3.", ".sam2_convs.3.")] = value.clone() + 0.1
    meta_dir = Path(root) / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, meta_dir / "sam3.pt")
    (meta_dir / "config.json").write_text((saved["meta"].parent / "config.json").read_text())

    from safetensors.torch import save_file

    hub_dir = Path(root) / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    hub = {f"detector_model.{k}": v for k, v in detector.state_dict().items()}
    for key, value in tracker.state_dict().items():
        if key.startswith("vision_encoder.neck."):
            hub["tracker_neck." + key[len("vision_encoder.neck."):]] = value
        elif not key.startswith("vision_encoder."):
            hub["tracker_model." + key] = value
    save_file({k: v.contiguous() for k, v in hub.items()}, str(hub_dir / "model.safetensors"))
    # As the hub's Sam3VideoConfig: the detector's config and the tracker's, side by side.
    hub_config = {"detector_config": json.loads((saved["transformers"] / "config.json").read_text()),
                  "tracker_config": json.loads((hf_dir / "config.json").read_text())}
    (hub_dir / "config.json").write_text(json.dumps(hub_config))
    return {"meta": meta_dir / "sam3.pt", "transformers": hf_dir, "hub": hub_dir, "tracker": tracker, "detector": detector,
            "detector_only": saved["meta"]}


# --------------------------------------------------------------------------- LiteText
TINY_LITE_TEXT = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=3, num_attention_heads=2,
                      max_position_embeddings=77, repmixer_kernel_size=5, layer_scale_init_value=0.5)


def save_tiny_sam3_lite_text(root: Path, seed: int = 0) -> dict:
    """A transformers `Sam3LiteTextModel` at TINY_CONFIG sizes, saved with save_pretrained: the image
    model and heads of tiny_transformers_sam3 (so scores and masks spread), a MobileCLIP text encoder
    with every parameter and batch-norm statistic randomised, and a fresh text projection."""
    from transformers import Sam3LiteTextConfig, Sam3LiteTextModel

    detector = tiny_transformers_sam3(seed)
    config = {key: value for key, value in TINY_CONFIG.items() if key != "text_config"}
    config["vision_config"] = dict(model_type="sam3_vision_model", **config["vision_config"])
    model = Sam3LiteTextModel(Sam3LiteTextConfig(text_config=TINY_LITE_TEXT, **config)).eval()
    shared = {k: v for k, v in detector.state_dict().items() if not k.startswith(("text_encoder.", "text_projection."))}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    assert not unexpected and all(k.startswith(("text_encoder.", "text_projection.")) for k in missing)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, tensor in [*model.text_encoder.named_parameters(), *model.text_encoder.named_buffers(),
                             *model.text_projection.named_parameters()]:
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1 or name.endswith("layer_scale"):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
    directory = Path(root) / "lite_text"
    model.save_pretrained(directory)
    return {"transformers": directory, "model": model}
