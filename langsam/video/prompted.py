"""Prompted tracking from the ground truth: each labelled object is given to SAM 2.1's video
predictor on the first frame it is visible (as its mask, or as that mask's box), the video is
propagated forward, and the result comes back as YouTube-VIS JSON (the layout ``langsam track``
writes), ready for :func:`langsam.video.metrics.evaluate_video`'s J&F. The DAVIS / SA-V
semi-supervised protocol; ``langsam eval DATA --track VIDEO`` runs it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from langsam.video.metrics import VideoAnnotations, VideoEvaluationError

logger = logging.getLogger(__name__)

PROMPTS = ("mask", "box")


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def track_prompted(video_predictor: Any, video: Any, ground_truth: VideoAnnotations, *, prompt: str = "mask",
                   progress: bool = False) -> dict[str, Any]:
    """Track every object of `ground_truth` (one video's labels) through `video` (a file, a
    frame folder or frames) from its first visible frame, prompted with its mask or box.
    Returns a one-video YouTube-VIS results document (frames before an object's prompt frame
    are null; a mask is the logits > 0)."""
    from pycocotools import mask as mask_utils
    from tqdm.auto import tqdm

    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    state = video_predictor.init_state(video)
    if (state.video_height, state.video_width) != (ground_truth.height, ground_truth.width) \
            or state.num_frames != ground_truth.length:
        raise VideoEvaluationError(
            f"video {ground_truth.name or ground_truth.video_id!r}: the file is {state.num_frames} frames of "
            f"{state.video_height}x{state.video_width}, the labels {ground_truth.length} of "
            f"{ground_truth.height}x{ground_truth.width}")
    starts: dict[int, int] = {}
    for obj_id in sorted(ground_truth.objects):
        frame = next((t for t, rle in enumerate(ground_truth.objects[obj_id].rles)
                      if rle is not None and ground_truth.mask(obj_id, t).any()), None)
        if frame is None:
            logger.warning("object %s is never visible in the labels; not tracked", obj_id)
            continue
        mask = ground_truth.mask(obj_id, frame)
        if prompt == "mask":
            video_predictor.add_new_mask(state, frame, obj_id, mask)
        else:
            video_predictor.add_new_points_or_box(state, frame, obj_id, box=_box(mask))
        starts[obj_id] = frame
    if not starts:
        raise VideoEvaluationError(f"video {ground_truth.name or ground_truth.video_id!r}: no labelled object to track")
    segmentations: dict[int, list] = {obj_id: [None] * ground_truth.length for obj_id in starts}
    bar = tqdm(total=ground_truth.length - min(starts.values()), desc=str(ground_truth.name or "video"),
               unit="frame", disable=not progress, leave=False)
    try:
        for frame_idx, obj_ids, logits in video_predictor.propagate_in_video(state):
            masks = (logits[:, 0] > 0).cpu().numpy()
            for row, obj_id in enumerate(obj_ids):
                if obj_id in starts and frame_idx >= starts[obj_id] and masks[row].any():
                    rle = mask_utils.encode(np.asfortranarray(masks[row].astype(np.uint8)))
                    segmentations[obj_id][frame_idx] = {"size": [ground_truth.height, ground_truth.width],
                                                        "counts": rle["counts"].decode("ascii")}
            bar.update(1)
    finally:
        bar.close()
    return {
        "info": {"description": f"prompted tracking from the labels ({prompt} on each object's first visible frame)"},
        "videos": [{"id": 1, "file_name": ground_truth.name, "height": ground_truth.height,
                    "width": ground_truth.width, "length": ground_truth.length}],
        "annotations": [{"id": obj_id, "video_id": 1, "category_id": ground_truth.objects[obj_id].category_id,
                         "score": 1.0, "prompt_frame": starts[obj_id], "segmentations": segmentations[obj_id]}
                        for obj_id in starts],
    }


__all__ = ["PROMPTS", "track_prompted"]
