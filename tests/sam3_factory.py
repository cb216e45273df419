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
