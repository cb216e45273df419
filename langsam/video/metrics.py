"""Tracking quality: score a tracked video against ground-truth masks per frame.

Both sides are YouTube-VIS-style JSON, the layout ``langsam track`` writes: ``videos`` (``id``,
``file_name``, ``length``) and ``annotations``, one per object, each with ``segmentations``, a
list of ``length`` COCO RLEs (or null where the object is not visible), a ``category_id`` and,
for results, a ``score``. A results file may also be the official YouTube-VIS results list (one
dict per predicted object, with ``video_id``). Videos are matched by ``file_name`` where both
sides name them, else by ``id``.

Three families of numbers:

* **J&F** (DAVIS / SA-V style), for prompted tracking (first-frame mask or box): objects are
  matched by id. J is the region similarity (mask IoU, 1 where both masks are empty), F the
  boundary F-measure (boundaries within ``ceil(0.008 x image diagonal)`` pixels count as
  matched, DAVIS' default tolerance; 1 where both boundaries are empty). Both are averaged over
  the evaluated frames of an object (DAVIS leaves out the first frame, the prompt, and the last;
  see ``skip_first`` / ``skip_last``), then over objects; J&F is their mean.
* **Identity** (text tracking), with ``motmetrics``: per frame the visible ground-truth and
  predicted objects are matched at mask IoU >= ``iou_threshold`` (0.5), class-agnostic, and
  motmetrics' CLEAR-MOT and ID measures follow: IDF1, IDP, IDR, ID switches, fragmentations,
  MOTA.
* **Video mask AP** (YouTube-VIS): pycocotools' ``COCOeval`` with the IoU of two objects taken
  over the whole video (the sum of per-frame intersections over the sum of per-frame unions),
  per category, AP at IoU 0.50:0.95, AP50, AP75.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

BOUNDARY_TOLERANCE = 0.008  # DAVIS: a fraction of the image diagonal (>= 1 means pixels)
IDENTITY_IOU = 0.5


class VideoEvaluationError(ValueError):
    """A ground-truth or results file that cannot be scored (said in words)."""


# ============================================================================================
# Reading YouTube-VIS JSON
# ============================================================================================


@dataclass
class VideoObject:
    """One object of one video: per-frame RLEs (None where absent), its category and score."""

    obj_id: int
    category_id: int
    rles: list[dict[str, Any] | None]
    score: float = 1.0


@dataclass
class VideoAnnotations:
    """The objects of one video, by id, and the video's size and length."""

    video_id: int
    name: str | None
    length: int
    height: int
    width: int
    objects: dict[int, VideoObject] = field(default_factory=dict)

    def mask(self, obj_id: int, frame: int) -> np.ndarray:
        """The (H, W) bool mask of `obj_id` at `frame` (all False where it is absent)."""
        obj = self.objects.get(obj_id)
        rle = None if obj is None or frame >= len(obj.rles) else obj.rles[frame]
        if rle is None:
            return np.zeros((self.height, self.width), dtype=bool)
        return _decode(rle)


def _decode(rle: Mapping[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(dict(rle), *rle["size"])
    else:
        rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def _encoded(rle: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A pycocotools-ready compressed RLE (bytes counts), or None."""
    if rle is None:
        return None
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(dict(rle), *rle["size"])
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def load_vis(source: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
             what: str = "file", videos: Mapping[int, VideoAnnotations] | None = None) -> dict[int, VideoAnnotations]:
    """Read a YouTube-VIS document (a path, a dict, or a results list) into videos by id.

    A results list carries no ``videos``; pass the ground truth's `videos` to size them."""
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as handle:
                document: Any = json.load(handle)
        except OSError as error:
            raise VideoEvaluationError(f"cannot read the {what} {os.fspath(source)!r}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise VideoEvaluationError(f"the {what} {os.fspath(source)!r} is not JSON: {error}") from None
    else:
        document = source
    if isinstance(document, list):
        annotations, video_rows = document, None
    elif isinstance(document, Mapping) and isinstance(document.get("annotations"), list):
        annotations, video_rows = document["annotations"], document.get("videos")
    else:
        raise VideoEvaluationError(f"the {what} is not YouTube-VIS JSON (need 'videos' and 'annotations', "
                                   "or a results list)")
    out: dict[int, VideoAnnotations] = {}
    if video_rows is not None:
        for row in video_rows:
            try:
                out[int(row["id"])] = VideoAnnotations(
                    video_id=int(row["id"]), name=row.get("file_name"), length=int(row["length"]),
                    height=int(row["height"]), width=int(row["width"]))
            except (KeyError, TypeError, ValueError):
                raise VideoEvaluationError(f"the {what} has a video without id, length, height and width: "
                                           f"{str(row)[:200]}") from None
    elif videos is not None:
        out = {vid: VideoAnnotations(vid, v.name, v.length, v.height, v.width) for vid, v in videos.items()}
    else:
        raise VideoEvaluationError(f"the {what} lists no videos")
    for index, annotation in enumerate(annotations):
        try:
            video_id = int(annotation.get("video_id", 1))
            segmentations = annotation["segmentations"]
            obj_id = int(annotation.get("id", index + 1))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise VideoEvaluationError(f"the {what}'s annotation {index} has no 'segmentations'") from None
        video = out.get(video_id)
        if video is None:
            raise VideoEvaluationError(f"the {what}'s annotation {index} names video {video_id}, which it does not list")
        if len(segmentations) != video.length:
            raise VideoEvaluationError(f"the {what}'s object {obj_id} has {len(segmentations)} frames, "
                                       f"its video {video.length}")
        for frame, rle in enumerate(segmentations):
            if rle is not None and [int(s) for s in rle.get("size", ())] != [video.height, video.width]:
                raise VideoEvaluationError(
                    f"the {what}'s object {obj_id} has a {rle.get('size')} mask at frame {frame}; "
                    f"the video is {video.height}x{video.width} (frames that change size are not supported)")
        if obj_id in video.objects:
            raise VideoEvaluationError(f"the {what} has object id {obj_id} twice in video {video_id}")
        video.objects[obj_id] = VideoObject(obj_id=obj_id, category_id=int(annotation.get("category_id", 1)),
                                            rles=list(segmentations), score=float(annotation.get("score", 1.0)))
    return out


def match_videos(ground_truth: Mapping[int, VideoAnnotations],
                 results: Mapping[int, VideoAnnotations]) -> list[tuple[VideoAnnotations, VideoAnnotations]]:
    """Pairs (ground truth, result) by file name where both sides have names, else by id. Every
    ground-truth video needs a result; a result of the wrong size or length is an error."""
    by_name = {video.name: video for video in results.values() if video.name}
    pairs = []
    for gt in ground_truth.values():
        if gt.name and by_name:  # named on both sides: the name decides, never the id
            result = by_name.get(gt.name)
        else:
            result = results.get(gt.video_id)
        if result is None:
            raise VideoEvaluationError(f"no result for video {gt.name or gt.video_id!r}")
        if (result.height, result.width) != (gt.height, gt.width):
            raise VideoEvaluationError(f"video {gt.name or gt.video_id!r}: results are {result.height}x{result.width}, "
                                       f"the ground truth {gt.height}x{gt.width}")
        if result.length != gt.length:
            raise VideoEvaluationError(f"video {gt.name or gt.video_id!r}: results have {result.length} frames, "
                                       f"the ground truth {gt.length}")
        pairs.append((gt, result))
    return pairs


# ============================================================================================
# J&F
# ============================================================================================


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    """J: the IoU of two (H, W) bool masks; 1.0 where both are empty."""
    union = np.logical_or(gt, pred).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(gt, pred).sum() / union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's inner boundary: its pixels with a 4-neighbour outside it (or at the border)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_tolerance_pixels(height: int, width: int, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """The matching distance in pixels: `tolerance` itself if >= 1, else ceil(tolerance x diagonal)."""
    if tolerance >= 1 or tolerance == 0:
        return float(tolerance)
    return float(math.ceil(tolerance * math.hypot(height, width)))


def boundary_f_measure(gt: np.ndarray, pred: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F: the boundary F-measure of two (H, W) bool masks. A boundary pixel of one counts as
    matched if a boundary pixel of the other lies within the tolerance (Euclidean distance,
    as dilating by a disk). 1.0 where both boundaries are empty, 0.0 where one is."""
    from scipy import ndimage

    gt_boundary, pred_boundary = _boundary(gt), _boundary(pred)
    n_gt, n_pred = int(gt_boundary.sum()), int(pred_boundary.sum())
    if n_gt == 0 and n_pred == 0:
        return 1.0
    if n_gt == 0 or n_pred == 0:
        return 0.0
    radius = boundary_tolerance_pixels(*gt.shape, tolerance)
    near_gt = ndimage.distance_transform_edt(~gt_boundary) <= radius
    near_pred = ndimage.distance_transform_edt(~pred_boundary) <= radius
    precision = float((pred_boundary & near_gt).sum() / n_pred)
    recall = float((gt_boundary & near_pred).sum() / n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


@dataclass
class JFScores:
    """J&F per object (``"video/obj_id"`` keys) and their means."""

    per_object: dict[str, dict[str, float]]
    j: float
    f: float

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"J&F": self.jf, "J": self.j, "F": self.f, "per_object": self.per_object}


def evaluated_frames(length: int, skip_first: bool = True, skip_last: bool = True) -> list[int]:
    """The frames J&F averages over: DAVIS leaves out the first (the prompt) and the last,
    unless that would leave none."""
    frames = list(range(length))
    if skip_first and len(frames) > 1:
        frames = frames[1:]
    if skip_last and len(frames) > 1:
        frames = frames[:-1]
    return frames


def j_and_f(pairs: Sequence[tuple[VideoAnnotations, VideoAnnotations]], *, tolerance: float = BOUNDARY_TOLERANCE,
            skip_first: bool = True, skip_last: bool = True) -> JFScores:
    """J&F of prompted tracking: every ground-truth object against the result object of the
    same id (a missing one scores its frames as empty masks). Means are over objects."""
    per_object: dict[str, dict[str, float]] = {}
    for gt, result in pairs:
        frames = evaluated_frames(gt.length, skip_first, skip_last)
        for obj_id in sorted(gt.objects):
            js, fs = [], []
            for frame in frames:
                g, p = gt.mask(obj_id, frame), result.mask(obj_id, frame)
                js.append(region_similarity(g, p))
                fs.append(boundary_f_measure(g, p, tolerance))
            j, f = float(np.mean(js)), float(np.mean(fs))
            per_object[f"{gt.name or gt.video_id}/{obj_id}"] = {"J": j, "F": f, "J&F": (j + f) / 2,
                                                                "found": obj_id in result.objects}
    if not per_object:
        raise VideoEvaluationError("the ground truth has no objects")
    return JFScores(per_object=per_object, j=float(np.mean([s["J"] for s in per_object.values()])),
                    f=float(np.mean([s["F"] for s in per_object.values()])))


# ============================================================================================
# Identity (motmetrics)
# ============================================================================================

IDENTITY_METRICS = ("idf1", "idp", "idr", "num_switches", "num_fragmentations", "mota", "num_misses",
                    "num_false_positives", "num_objects", "num_predictions")


def _frame_rles(video: VideoAnnotations, frame: int) -> tuple[list[int], list[dict[str, Any]]]:
    ids, rles = [], []
    for obj_id, obj in sorted(video.objects.items()):
        rle = _encoded(obj.rles[frame]) if frame < len(obj.rles) else None
        if rle is not None and _rle_area(rle) > 0:
            ids.append(obj_id)
            rles.append(rle)
    return ids, rles


def _rle_area(rle: dict[str, Any]) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(rle))


def identity_metrics(pairs: Sequence[tuple[VideoAnnotations, VideoAnnotations]], *,
                     iou_threshold: float = IDENTITY_IOU) -> dict[str, Any]:
    """IDF1, IDP, IDR, ID switches, fragmentations and MOTA over all videos (motmetrics), with
    visible objects matched per frame at mask IoU >= `iou_threshold`, class-agnostic. Also per video."""
    try:
        import motmetrics
    except ImportError:
        raise VideoEvaluationError("identity metrics need motmetrics: pip install 'langsam[eval]'") from None
    from pycocotools import mask as mask_utils

    accumulators, names = [], []
    for gt, result in pairs:
        accumulator = motmetrics.MOTAccumulator(auto_id=True)
        for frame in range(gt.length):
            gt_ids, gt_rles = _frame_rles(gt, frame)
            pred_ids, pred_rles = _frame_rles(result, frame)
            if gt_rles and pred_rles:
                iou = mask_utils.iou(pred_rles, gt_rles, [0] * len(gt_rles)).T  # (gt, pred)
                distances = np.where(iou >= iou_threshold, 1.0 - iou, np.nan)
            else:
                distances = np.empty((len(gt_ids), len(pred_ids)))
            accumulator.update(gt_ids, pred_ids, distances)
        accumulators.append(accumulator)
        names.append(str(gt.name or gt.video_id))
    host = motmetrics.metrics.create()
    table = host.compute_many(accumulators, metrics=list(IDENTITY_METRICS), names=names, generate_overall=True)

    def row(name: str) -> dict[str, Any]:
        values = table.loc[name]
        return {key: (int(values[key]) if key.startswith("num_") else _finite(values[key])) for key in IDENTITY_METRICS}

    return {"overall": row("OVERALL"), "per_video": {name: row(name) for name in names}}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ============================================================================================
# Video mask AP (COCOeval with spatio-temporal IoU)
# ============================================================================================


def _video_iou(dts: Sequence[VideoObject], gts: Sequence[VideoObject]) -> np.ndarray:
    """(len(dts), len(gts)) IoU over the video: sum of intersections / sum of unions."""
    from pycocotools import mask as mask_utils

    ious = np.zeros((len(dts), len(gts)))
    for i, dt in enumerate(dts):
        for j, gt in enumerate(gts):
            inter = union = 0
            for d, g in zip(dt.rles, gt.rles):
                d, g = _encoded(d), _encoded(g)
                if d is None and g is None:
                    continue
                if d is None or g is None:
                    union += _rle_area(d if d is not None else g)
                    continue
                inter += int(mask_utils.area(mask_utils.merge([d, g], intersect=True)))
                union += int(mask_utils.area(mask_utils.merge([d, g], intersect=False)))
            ious[i, j] = inter / union if union else 0.0
    return ious


def video_mask_ap(pairs: Sequence[tuple[VideoAnnotations, VideoAnnotations]],
                  categories: Mapping[int, str] | None = None) -> dict[str, Any]:
    """YouTube-VIS mask AP: COCOeval over videos, objects as detections, IoU over the video."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def document(side: int) -> dict[str, Any]:
        images, annotations, next_id = [], [], 1
        for video_number, pair in enumerate(pairs, start=1):
            video = pair[side]
            images.append({"id": video_number})
            for obj in video.objects.values():
                areas = [_rle_area(_encoded(r)) for r in obj.rles if r is not None]
                annotations.append({"id": next_id, "image_id": video_number, "category_id": obj.category_id,
                                    "iscrowd": 0, "area": float(np.mean(areas)) if areas else 0.0,
                                    "score": obj.score, "bbox": [0, 0, 0, 0], "_object": obj})
                next_id += 1
        category_ids = sorted({a["category_id"] for a in annotations} | set(categories or {}))
        return {"images": images, "annotations": annotations,
                "categories": [{"id": c, "name": (categories or {}).get(c, str(c))} for c in category_ids]}

    class _VideoEval(COCOeval):
        def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
            gts = self._gts[imgId, catId] if self.params.useCats else \
                [g for c in self.params.catIds for g in self._gts[imgId, c]]
            dts = self._dts[imgId, catId] if self.params.useCats else \
                [d for c in self.params.catIds for d in self._dts[imgId, c]]
            if not gts or not dts:
                return []
            order = np.argsort([-d["score"] for d in dts], kind="mergesort")[: self.params.maxDets[-1]]
            return _video_iou([dts[i]["_object"] for i in order], [g["_object"] for g in gts])

    gt_doc, dt_doc = document(0), document(1)
    if not gt_doc["annotations"]:
        raise VideoEvaluationError("the ground truth has no objects")
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco, dt_coco = COCO(), COCO()
        gt_coco.dataset, dt_coco.dataset = gt_doc, {**dt_doc, "categories": copy.copy(gt_doc["categories"])}
        gt_coco.createIndex()
        dt_coco.createIndex()
        evaluator = _VideoEval(gt_coco, dt_coco, iouType="bbox")  # the IoU is ours (computeIoU above)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]

    def defined(value: float) -> float | None:
        return None if value < 0 else value

    return {"ap": defined(stats[0]), "ap50": defined(stats[1]), "ap75": defined(stats[2]),
            "detections": len(dt_doc["annotations"]), "coco_stats": stats}


# ============================================================================================
# Everything at once
# ============================================================================================


def evaluate_video(ground_truth: Any, results: Any, *, metrics: Sequence[str] = ("jf", "identity", "ap"),
                   tolerance: float = BOUNDARY_TOLERANCE, iou_threshold: float = IDENTITY_IOU,
                   skip_first: bool = True, skip_last: bool = True) -> dict[str, Any]:
    """Score `results` against `ground_truth` (YouTube-VIS paths or documents): J&F
    (``"jf"``), identity metrics (``"identity"``) and video mask AP (``"ap"``)."""
    unknown = [m for m in metrics if m not in ("jf", "identity", "ap")]
    if unknown or not metrics:
        raise VideoEvaluationError(f"metrics must be some of jf, identity, ap; got {list(metrics)}")
    gt_videos = load_vis(ground_truth, what="ground truth")
    result_videos = load_vis(results, what="results", videos=gt_videos)
    pairs = match_videos(gt_videos, result_videos)
    categories = None
    if isinstance(ground_truth, Mapping):
        categories = {int(c["id"]): str(c.get("name", c["id"])) for c in ground_truth.get("categories", [])}
    report: dict[str, Any] = {"videos": len(pairs), "objects": sum(len(gt.objects) for gt, _ in pairs)}
    if "jf" in metrics:
        report["jf"] = j_and_f(pairs, tolerance=tolerance, skip_first=skip_first, skip_last=skip_last).to_dict()
    if "identity" in metrics:
        report["identity"] = identity_metrics(pairs, iou_threshold=iou_threshold)
    if "ap" in metrics:
        report["ap"] = video_mask_ap(pairs, categories)
    return report


__all__ = [
    "BOUNDARY_TOLERANCE",
    "IDENTITY_IOU",
    "JFScores",
    "VideoAnnotations",
    "VideoEvaluationError",
    "VideoObject",
    "boundary_f_measure",
    "evaluate_video",
    "evaluated_frames",
    "identity_metrics",
    "j_and_f",
    "load_vis",
    "match_videos",
    "region_similarity",
    "video_mask_ap",
]
