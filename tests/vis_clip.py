"""A test clip with known instance masks: two objects cut from real photos (the cat's face from
"chelsea", the astronaut's face from "astronaut") move over a real background ("coffee"), the
second passing in front of the first, so each frame's ground truth is known to the pixel.

`moving_objects_clip` returns the frames and the ground truth as a YouTube-VIS document (the
layout ``langsam track`` writes); `results_from_masks` turns per-frame masks into a results
document of the same layout, so tests can build perfect, swapped or broken trackers.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from skimage import data as skdata


def _ellipse(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((yy - (height - 1) / 2) / (height / 2)) ** 2 + ((xx - (width - 1) / 2) / (width / 2)) ** 2 <= 1.0


def _patch(photo: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.asarray(Image.fromarray(photo[y0:y1, x0:x1]).resize(size[::-1], Image.BILINEAR))


def moving_objects_clip(num_frames: int = 8, height: int = 72, width: int = 96):
    """(frames (T, H, W, 3) uint8, masks {obj_id: (T, H, W) bool}, ground-truth document)."""
    background = np.asarray(Image.fromarray(skdata.coffee()).resize((width, height), Image.BILINEAR))
    cat = _patch(skdata.chelsea(), (150, 30, 290, 180), (26, 30))        # the cat's face
    face = _patch(skdata.astronaut(), (160, 20, 330, 220), (22, 20))     # the astronaut's face
    shapes = {1: (cat, _ellipse(26, 30)), 2: (face, _ellipse(22, 20))}
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = {obj_id: np.zeros((num_frames, height, width), bool) for obj_id in shapes}
    for t in range(num_frames):
        frame = background.copy()
        placements = {1: (14 + t, 4 + 7 * t), 2: (30 - 2 * t, 70 - 6 * t)}  # (top, left); 2 moves over 1
        for obj_id in (1, 2):  # later objects are in front
            patch, shape = shapes[obj_id]
            top, left = placements[obj_id]
            ph, pw = shape.shape
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + ph, height), min(left + pw, width)
            sub = shape[y0 - top:y1 - top, x0 - left:x1 - left]
            frame[y0:y1, x0:x1][sub] = patch[y0 - top:y1 - top, x0 - left:x1 - left][sub]
            for other in masks:  # what is in front hides what is behind
                masks[other][t, y0:y1, x0:x1][sub] = False
            masks[obj_id][t, y0:y1, x0:x1] |= sub
        frames[t] = frame
    categories = [{"id": 1, "name": "a cat"}, {"id": 2, "name": "a face"}]
    document = results_from_masks(masks, {1: 1, 2: 2}, name="clip.mp4")
    document["categories"] = categories
    for annotation in document["annotations"]:
        annotation.pop("score")
    return frames, masks, document


def results_from_masks(masks: Mapping[int, np.ndarray], categories: Mapping[int, int],
                       scores: Mapping[int, float] | None = None, name: str = "clip.mp4") -> dict:
    """A YouTube-VIS document of one video from {obj_id: (T, H, W) bool masks} (empty frames
    become null, as ``langsam track`` writes them)."""
    from pycocotools import mask as mask_utils

    first = next(iter(masks.values()))
    length, height, width = first.shape
    annotations = []
    for obj_id, stack in masks.items():
        segmentations: list = []
        for frame in stack:
            if not frame.any():
                segmentations.append(None)
                continue
            rle = mask_utils.encode(np.asfortranarray(frame.astype(np.uint8)))
            segmentations.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
        annotations.append({"id": int(obj_id), "video_id": 1, "category_id": int(categories[obj_id]),
                            "score": float((scores or {}).get(obj_id, 1.0)), "segmentations": segmentations})
    return {"videos": [{"id": 1, "file_name": name, "height": height, "width": width, "length": length}],
            "categories": [{"id": c, "name": str(c)} for c in sorted(set(categories.values()))],
            "annotations": annotations}


def split_track(stack: np.ndarray, at: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first `at` frames of a mask stack, the rest), each padded with empty frames."""
    first, rest = stack.copy(), stack.copy()
    first[at:] = False
    rest[:at] = False
    return first, rest


__all__: Sequence[str] = ["moving_objects_clip", "results_from_masks", "split_track"]
