"""A tiny random SAM 3 video concept model (transformers' `Sam3VideoModel`: detector, tracker and
the tracker's neck on one ViT), saved with `save_pretrained`, and the reference driven the way its
docs drive it (an inference session, a text prompt, `propagate_in_video_iterator`, the processor's
`postprocess_outputs`).

Sizes: sam3_factory's tiny ViT (168 px, a 12x12 grid) under 64-wide heads everywhere: the tracker's
neck is built from the detector's vision config, so the tracker is as wide as the detector, and
transformers fixes the memory width at 64 (a pointer narrower than that cannot be split into memory
tokens). Every parameter is redrawn (sam3_factory's recipe) and the same output layers rescaled, so
detection scores spread across the 0.5 / 0.7 / 0.8 thresholds and masks are textured; the tracker's
object-score head is biased so tracked objects stay present.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from sam3_factory import TINY_CONFIG
from sam3_video_support import randomise_parameters

WIDTH = 128
IMAGE_SIZE = TINY_CONFIG["vision_config"]["backbone_config"]["image_size"]  # 168
PATCH = TINY_CONFIG["vision_config"]["backbone_config"]["patch_size"]  # 14
LOW_RES = 4 * IMAGE_SIZE // PATCH  # 48: the detector's and the tracker's mask size


def tiny_video_config(**options):
    """A `Sam3VideoConfig` at the tiny sizes; `options` override its association settings."""
    from transformers import Sam3Config, Sam3TrackerVideoConfig, Sam3VideoConfig

    detector = copy.deepcopy(TINY_CONFIG)
    detector["vision_config"]["fpn_hidden_size"] = WIDTH
    for part in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"):
        detector[part]["hidden_size"] = WIDTH
    tracker = Sam3TrackerVideoConfig(
        vision_config=dict(model_type="sam3_vision_model", **detector["vision_config"]),
        prompt_encoder_config=dict(hidden_size=WIDTH, image_size=IMAGE_SIZE, patch_size=PATCH),
        mask_decoder_config=dict(hidden_size=WIDTH, mlp_dim=64, num_attention_heads=8, iou_head_hidden_dim=32),
        memory_attention_hidden_size=WIDTH, memory_attention_feed_forward_hidden_size=64, memory_attention_num_layers=2,
        memory_encoder_hidden_size=WIDTH, memory_encoder_output_channels=64, mask_downsampler_embed_dim=WIDTH,
        memory_fuser_embed_dim=WIDTH, memory_fuser_intermediate_dim=4 * WIDTH, image_size=IMAGE_SIZE,
    )
    settings = dict(low_res_mask_size=LOW_RES)
    settings.update(options)
    return Sam3VideoConfig(detector_config=Sam3Config(**detector), tracker_config=tracker, **settings)


def tiny_video_model(seed: int = 0, calibration=None, config=None, **options):
    """A transformers `Sam3VideoModel` at the tiny sizes (or at `config`, a `Sam3VideoConfig`), every
    parameter randomised (eval mode). calibration: (pixels (T, 3, S, S), token ids (1, L)) to spread
    the detector's queries on (see `spread_queries`)."""
    from transformers import Sam3VideoModel

    torch.manual_seed(seed)
    model = Sam3VideoModel(config if config is not None else tiny_video_config(**options)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomise_parameters(model, generator)
        detector, tracker = model.detector_model, model.tracker_model
        detector.detr_decoder.presence_head.layer3.weight.mul_(0.25)
        detector.detr_decoder.presence_head.layer3.bias.fill_(2.5)
        detector.dot_product_scoring.query_proj.weight.mul_(4)
        detector.dot_product_scoring.query_proj.bias.zero_()
        weight = detector.mask_decoder.instance_projection.weight
        weight.sub_(weight.mean(dim=1, keepdim=True))
        detector.mask_decoder.instance_projection.bias.zero_()
        tracker.prompt_encoder.shared_embedding.positional_embedding.copy_(tracker.shared_image_embedding.positional_embedding)
        tracker.mask_decoder.pred_obj_score_head.proj_out.weight.mul_(0.6)
        tracker.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(3.0)
        for mlp in tracker.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(1.5)
    if calibration is not None:
        spread_queries(detector, *calibration)
    return model


def spread_queries(detector, pixels: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Random DETR queries come out nearly equal (3% apart), so every detection has the same mask and
    score and no association rule could tell them apart. Project the queries' mean (over these
    frames) out of the mask embedder's input and the score projection, and scale both up: masks of
    different queries then overlap at IoU 0.4-0.9 and scores spread over 0.05-0.95."""
    captured = []
    hook = detector.mask_decoder.mask_embedder.register_forward_pre_hook(lambda module, args: captured.append(args[0][0]))
    with torch.no_grad():
        for frame in pixels:
            vision = detector.get_vision_features(pixel_values=frame[None])
            detector(vision_embeds=vision, input_ids=token_ids, attention_mask=(token_ids != 0).long())
    hook.remove()
    mean = torch.cat(captured).mean(dim=0)
    direction = mean / mean.norm()
    projection = torch.eye(len(mean)) - torch.outer(direction, direction)
    with torch.no_grad():
        embedder = detector.mask_decoder.mask_embedder.layers
        for layer in embedder:
            layer.bias.zero_()
        embedder[0].weight.copy_(embedder[0].weight @ projection * 30.0)
        scoring = detector.dot_product_scoring.query_proj
        scoring.bias.sub_(scoring.weight @ mean)
        scoring.weight.mul_(8.0)
        scoring.bias.mul_(8.0)


def save_tiny_video_model(root: Path, seed: int = 0, calibration=None, **options) -> dict:
    """Save one tiny model with `save_pretrained`; returns {"transformers": directory, "model": model}."""
    model = tiny_video_model(seed, calibration, **options)
    directory = Path(root) / "sam3_video"
    model.save_pretrained(directory)
    return {"transformers": directory, "model": model}


def reference_pixels(frames: np.ndarray, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """(T, 3, S, S) in [-1, 1]: each frame stretched to S x S with PIL bicubic (what our predictor
    does), then normalised with mean = std = 0.5."""
    from PIL import Image

    resized = [np.asarray(Image.fromarray(frame).resize((image_size, image_size), Image.BICUBIC)) for frame in frames]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - 0.5) / 0.5


class Reference:
    """transformers' concept video inference on the same pixels our predictor makes: a session over
    the whole clip, text prompts tokenised as ours are, `propagate_in_video_iterator`, then
    `Sam3VideoProcessor.postprocess_outputs` on each yielded frame (masks at the video size)."""

    def __init__(self, model, frames: np.ndarray, image_size: int = IMAGE_SIZE):
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        self.model = model
        height, width = frames.shape[1:3]
        self.session = Sam3VideoInferenceSession(video=reference_pixels(frames, image_size), video_height=height, video_width=width,
                                                 dtype=torch.float32)

    def add_text(self, text: str) -> int:
        from sam.sam3.text import tokenize

        prompt_id = self.session.add_prompt(text)
        ids = tokenize([text])
        self.session.prompt_input_ids[prompt_id] = ids
        self.session.prompt_attention_masks[prompt_id] = (ids != 0).long()
        return prompt_id

    def propagate(self, non_overlap: bool = True, **kwargs) -> list[dict]:
        """Every yielded frame post-processed; non_overlap=False leaves out the processor's last step
        (each pixel to the object of highest tracker score)."""
        from transformers import Sam3VideoProcessor

        processor = object.__new__(Sam3VideoProcessor)  # postprocess_outputs needs none of its parts
        if not non_overlap:
            processor._apply_object_wise_non_overlapping_constraints = lambda masks, *args, **kwargs: masks
        frames = []
        with torch.no_grad():
            for output in self.model.propagate_in_video_iterator(self.session, **kwargs):
                post = processor.postprocess_outputs(self.session, output)
                frames.append(dict(frame_idx=output.frame_idx, obj_ids=post["object_ids"].tolist(),
                                   masks=post["masks"], scores=post["scores"], boxes=post["boxes"]))
        return frames


def text_reference(saved: dict, frames: np.ndarray, text: str, **settings) -> "Reference":
    """The transformers reference of a saved tiny model, text-prompted with `text`, under the
    released rules (hole filling and mask NMS off: transformers skips both on a CPU) and `settings`."""
    from sam.video.concept import ConceptTrackingConfig

    model = saved["model"]
    for name, value in {**ConceptTrackingConfig(fill_hole_area=0, det_nms_thresh=0.0).__dict__, **settings}.items():
        setattr(model, name, value)  # Sam3VideoModel reads its settings from attributes
    reference = Reference(model, frames)
    reference.add_text(text)
    return reference


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


class ClickReference:
    """Meta's refinement of a text-prompted session (`Sam3VideoInferenceWithInstanceInteractivity` at
    its defaults: add_tracker_new_points, then partial propagation), executed step by step with
    transformers' parts on `Reference`'s session, after its text-prompted propagation. transformers'
    `Sam3VideoModel` takes no clicks; its `Sam3TrackerVideoModel` (the session's tracker) does the
    decoding and tracking, driven as Meta drives its tracker:

    - a click on frame f decodes on f's features plus `no_memory_embedding` (Meta's
      use_prev_mem_frame=False), the object's current logits there clamped to +-32 as the mask
      prompt (iter_use_prev_mask_pred), and becomes a conditioning frame whose memory is encoded
      from the 0/1 mask (the low-res logits upsampled to the input size, as Meta's preflight);
      its tracked results within stride x num_maskmem frames are dropped (Meta's SAM 3 tracker has
      clear_non_cond_mem_around_input on), then its detector-made conditioning frames within 16
      frames become tracked frames;
    - a new obj_id starts an object from the clicks alone (no mask prompt);
    - propagation re-tracks the clicked objects alone (the tracker's forward with memory encoding;
      passing a conditioning frame drops the tracked results around it again),
      and every other object keeps its cached (post-processed) mask.
    Masks come back as {obj_id: (H, W) bool} at the video size."""

    def __init__(self, reference: Reference, frames: list[dict]):
        self.model, self.session = reference.model, reference.session
        self.height, self.width = self.session.video_height, self.session.video_width
        self.cache = {frame["frame_idx"]: dict(zip(frame["obj_ids"], frame["masks"])) for frame in frames}

    def _features(self, frame_idx: int) -> None:
        model, session = self.model, self.session
        vision = model.detector_model.get_vision_features(pixel_values=session.get_frame(frame_idx).unsqueeze(0))
        feats, positions = model.get_vision_features_for_tracker(vision)
        session.cache.cache_vision_features(frame_idx, {"vision_feats": feats, "vision_pos_embeds": positions})

    def _video_mask(self, low_res: torch.Tensor) -> torch.Tensor:
        size = (self.height, self.width)
        return torch.nn.functional.interpolate(low_res.reshape(1, 1, *low_res.shape[-2:]).float(), size,
                                               mode="bilinear", align_corners=False)[0, 0] > 0

    def click(self, frame_idx: int, obj_id: int, points, labels) -> dict:
        session, tracker = self.session, self.model.tracker_model
        with torch.no_grad():
            self._features(frame_idx)
            obj_idx = session.obj_id_to_idx(obj_id)
            outputs = session.output_dict_per_obj[obj_idx]
            previous = outputs["cond_frame_outputs"].get(frame_idx) or outputs["non_cond_frame_outputs"].get(frame_idx)
            prev_logits = None if previous is None else torch.clamp(previous["pred_masks"], -32.0, 32.0)
            scale = torch.tensor([IMAGE_SIZE / self.width, IMAGE_SIZE / self.height])
            point_inputs = {"point_coords": (torch.tensor(points, dtype=torch.float32) * scale)[None, None],
                            "point_labels": torch.tensor(labels, dtype=torch.int32)[None, None]}
            out = tracker._run_single_frame_inference(
                inference_session=session, frame_idx=frame_idx, obj_idx=obj_idx, batch_size=1, is_init_cond_frame=True,
                point_inputs=point_inputs, mask_inputs=None, reverse=False,
                prev_sam_mask_logits=prev_logits)
            outputs["non_cond_frame_outputs"].pop(frame_idx, None)
            session.store_output(obj_idx, frame_idx, output_value=out, is_conditioning_frame=True)
            high_res = torch.nn.functional.interpolate(out["pred_masks"], (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                                       align_corners=False)
            tracker._batch_encode_memories(session, frame_idx, [obj_idx], [high_res], [out["object_score_logits"]], [True])
            self._clear_around(obj_idx, frame_idx)
            for other in list(outputs["cond_frame_outputs"]):
                if other != frame_idx and abs(other - frame_idx) <= 16:
                    outputs["non_cond_frame_outputs"][other] = outputs["cond_frame_outputs"].pop(other)
                    session.mask_inputs_per_obj[obj_idx].pop(other, None)
            session.obj_with_new_inputs = []
        self.cache.setdefault(frame_idx, {})[obj_id] = self._video_mask(out["pred_masks"])
        return dict(self.cache[frame_idx])

    def _clear_around(self, obj_idx: int, frame_idx: int) -> None:
        """Meta's clear_non_cond_mem_around_input: tracked results within stride x num_maskmem frames go."""
        config = self.model.tracker_model.config
        reach = getattr(config, "memory_temporal_stride_for_eval", 1) * config.num_maskmem  # stride 1: not in its config
        outputs = self.session.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"]
        for t in [t for t in outputs if abs(t - frame_idx) <= reach]:
            del outputs[t]

    def propagate(self, order, obj_ids: list[int]) -> list[dict]:
        """The clicked objects `obj_ids` re-tracked over `order` (frame indices), the others from the cache."""
        session, tracker = self.session, self.model.tracker_model
        reverse = len(order) > 1 and order[1] < order[0]
        frames = []
        with torch.no_grad():
            for frame_idx in order:
                self._features(frame_idx)
                for obj_id in obj_ids:  # Meta's tracker clears again when it passes a conditioning frame
                    obj_idx = session.obj_id_to_idx(obj_id)
                    if frame_idx in session.output_dict_per_obj[obj_idx]["cond_frame_outputs"]:
                        self._clear_around(obj_idx, frame_idx)
                out = tracker(inference_session=session, frame_idx=frame_idx, reverse=reverse, run_mem_encoder=True)
                for obj_id in obj_ids:
                    mask = out.pred_masks[out.object_ids.index(obj_id)]
                    self.cache.setdefault(frame_idx, {})[obj_id] = self._video_mask(mask)
                frames.append(dict(self.cache.get(frame_idx, {}), frame_idx=frame_idx))
        return frames
