"""A tiny random SAM 3 video tracker (transformers' `Sam3TrackerVideoModel`) saved in the three
checkpoint layouts `sam.sam3.tracker.load_sam3_tracker` reads, and the transformers reference
driven the way its docs drive it (`Sam3TrackerVideoProcessor` + an inference session).

Sizes: the tiny ViT of sam3_factory (168 px, a 12x12 grid) under a 128-wide neck and heads.
transformers fixes the memory width at 64 (the cross-attention's key width), and SAM 3 splits a
pointer wider than the memory into several memory tokens, so 128 gives two tokens per pointer, as
the released 256 gives four. Every parameter is redrawn (sam3_factory's recipe); the object-score
head is biased so tracked objects stay present, and the mask hypernetworks scaled so masks are
textured rather than empty or full.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sam3_factory import TINY_CONFIG

D_MODEL = 128
IMAGE_SIZE = TINY_CONFIG["vision_config"]["backbone_config"]["image_size"]  # 168
PATCH = TINY_CONFIG["vision_config"]["backbone_config"]["patch_size"]  # 14


def tiny_tracker_config(image_size: int = IMAGE_SIZE):
    """The tiny tracker's transformers config, at another input size when asked (a multiple of the
    14-px patch, e.g. 84: a 6x6 grid)."""
    from transformers import Sam3TrackerVideoConfig

    grid = image_size // PATCH
    backbone = dict(TINY_CONFIG["vision_config"]["backbone_config"], image_size=image_size)
    vision = dict(TINY_CONFIG["vision_config"], backbone_config=backbone, fpn_hidden_size=D_MODEL,
                  backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2])
    return Sam3TrackerVideoConfig(
        vision_config=dict(model_type="sam3_vision_model", **vision),
        prompt_encoder_config=dict(hidden_size=D_MODEL, image_size=image_size, patch_size=PATCH),
        mask_decoder_config=dict(hidden_size=D_MODEL, mlp_dim=64, num_attention_heads=8, iou_head_hidden_dim=32),
        memory_attention_hidden_size=D_MODEL, memory_attention_feed_forward_hidden_size=64, memory_attention_num_layers=2,
        memory_encoder_hidden_size=D_MODEL, memory_encoder_output_channels=64, mask_downsampler_embed_dim=D_MODEL,
        memory_fuser_embed_dim=D_MODEL, memory_fuser_intermediate_dim=4 * D_MODEL, image_size=image_size,
    )


def randomise_parameters(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter of a tiny random model so its outputs are not degenerate: norm
    weights around 1, biases and scales small, other weights at 1/sqrt(fan-in). Call under
    torch.no_grad()."""
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
        elif param.ndim == 1 or name.endswith("scale"):
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        else:
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def tiny_transformers_tracker_video(seed: int = 3, detector=None, image_size: int = IMAGE_SIZE):
    """A transformers `Sam3TrackerVideoModel` at the tiny sizes (or another input size:
    tiny_tracker_config), every parameter randomised (eval mode); on `detector`'s ViT (a tiny
    transformers `Sam3Model`) when given."""
    from transformers import Sam3TrackerVideoModel

    torch.manual_seed(seed)
    model = Sam3TrackerVideoModel(tiny_tracker_config(image_size)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomise_parameters(model, generator)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
        if detector is not None:
            model.vision_encoder.backbone.load_state_dict(detector.vision_encoder.backbone.state_dict())
        # Objects stay present (object-score logits around +3), so tracked masks are not all -1024.
        model.mask_decoder.pred_obj_score_head.proj_out.weight.mul_(0.1)
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(3.0)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(1.5)
    return model


def save_tiny_sam3_tracker_video(root: Path, seed: int = 3) -> dict:
    """Save one tiny tracker as a transformers `save_pretrained` directory ("transformers"), as Meta's
    `sam3.pt` layout ("meta": `detector.backbone.vision_backbone.{trunk,sam2_convs}.*` + `tracker.*`, no
    config.json: sizes are read off the weights) and as the hub's combined file ("hub")."""
    from safetensors.torch import save_file

    from sam.sam3.tracker import load_sam3_tracker, tracker_video_meta_state

    root = Path(root)
    model = tiny_transformers_tracker_video(seed)
    hf_dir = root / "transformers"
    model.save_pretrained(hf_dir)
    ours = load_sam3_tracker(hf_dir)
    meta_dir = root / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": tracker_video_meta_state(ours)}, meta_dir / "sam3.pt")
    hub_dir = root / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    hub = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_encoder.backbone."):
            hub["detector_model." + key] = value
        elif key.startswith("vision_encoder.neck."):
            hub["tracker_neck." + key[len("vision_encoder.neck."):]] = value
        else:
            hub["tracker_model." + key] = value
    save_file({k: v.contiguous() for k, v in hub.items()}, str(hub_dir / "model.safetensors"))
    tracker_config = json.loads((hf_dir / "config.json").read_text())
    (hub_dir / "config.json").write_text(json.dumps({"tracker_config": tracker_config,
                                                     "detector_config": {"vision_config": tracker_config["vision_config"]}}))
    return {"transformers": hf_dir, "meta": meta_dir / "sam3.pt", "hub": hub_dir, "model": model}


def reference_processor():
    """transformers' `Sam3TrackerVideoProcessor` at the tiny input size."""
    from transformers import Sam2ImageProcessor, Sam3TrackerVideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return Sam3TrackerVideoProcessor(
        image_processor=Sam2ImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Sam2VideoVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    )


def reference_session(pixels: torch.Tensor, height: int, width: int):
    """A transformers inference session over (T, 3, S, S) pixels already normalised to [-1, 1]."""
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    return Sam3TrackerVideoInferenceSession(video=pixels, video_height=height, video_width=width, dtype=torch.float32)


def reference_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, 3, S, S) model input in [-1, 1]: each frame stretched to S x S with PIL bicubic (what our
    predictor and Meta's frame loader do), then normalised with mean = std = 0.5."""
    from PIL import Image

    resized = [np.asarray(Image.fromarray(frame).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for frame in frames]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - 0.5) / 0.5


def save_tiny_sam3_with_tracker(root: Path, seed: int = 0) -> Path:
    """Meta's `sam3.pt` layout holding both SAM 3 models on one ViT, as the released file does: the
    tiny detector of sam3_factory (`detector.*`, with its config.json beside the file) and a tiny
    tracker on the same trunk (`tracker.*`, `detector.backbone.vision_backbone.sam2_convs.*`)."""
    from sam3_factory import save_tiny_sam3

    from sam.sam3.tracker import load_sam3_tracker, tracker_video_meta_state

    root = Path(root)
    saved = save_tiny_sam3(root / "detector", seed)
    tracker = tiny_transformers_tracker_video(seed + 3, detector=saved["model"])
    tracker.save_pretrained(root / "tracker")
    checkpoint = torch.load(saved["meta"], weights_only=True)
    checkpoint["model"].update(tracker_video_meta_state(load_sam3_tracker(root / "tracker")))
    combined = root / "combined"
    combined.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, combined / "sam3.pt")
    (combined / "config.json").write_text((saved["meta"].parent / "config.json").read_text())
    return combined / "sam3.pt"
