"""Text-prompted quality: COCO mask AP of a `LangSAM` pipeline on a dataset.

Every image is segmented with all category names of the dataset as queries (one detector
caption per image), in each requested mode (grounded, hybrid, clip) and with the pipeline's concept
model (Grounding DINO + SAM, or SAM 3 with ``model="sam3"``); the objects found become COCO results
(score = the mode's confidence: detector score, SAM 3's score, or CLIP probability in clip mode)
and pycocotools' ``COCOeval`` (``iouType="segm"``) scores them against the dataset's masks:
AP (IoU 0.50:0.95), AP50 and AP75, overall and per category.

Point and box prompts (SAM alone, no text) are measured by `sam.evaluation`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sam.evaluation import format_table
from sam.training.data import SegmentationDataset

logger = logging.getLogger(__name__)

MODES = ("grounded", "hybrid", "clip")


@dataclass
class CocoScores:
    """COCO mask AP of one set of results. None where no ground truth makes a score defined."""

    ap: float | None
    ap50: float | None
    ap75: float | None
    per_category: dict[str, dict[str, Any]]
    detections: int
    stats: list[float] = field(default_factory=list)  # COCOeval.stats, the 12 standard numbers

    def to_dict(self) -> dict[str, Any]:
        return {"ap": self.ap, "ap50": self.ap50, "ap75": self.ap75, "detections": self.detections,
                "coco_stats": self.stats, "per_category": self.per_category}


def _defined(value: float) -> float | None:
    return None if value is None or value < 0 or np.isnan(value) else float(value)


def _mean_precision(precision: np.ndarray) -> float | None:
    """Mean of the defined (> -1) entries of a COCOeval precision slice."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else None


def coco_mask_ap(ground_truth: dict[str, Any], results: Sequence[dict[str, Any]]) -> CocoScores:
    """Score `results` (COCO result dicts with RLE ``segmentation`` and ``score``) against
    `ground_truth` (a COCO instances dict) with pycocotools' ``COCOeval(iouType="segm")``.

    Per category: AP (mean precision over IoU 0.50:0.95 and recall, all areas, 100 detections
    per image) and AP50, read from ``COCOeval.eval["precision"]`` exactly as ``summarize`` reads
    the overall numbers, and the number of ground-truth objects.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {category["id"]: category["name"] for category in ground_truth["categories"]}
    counts = {name: 0 for name in names.values()}
    for annotation in ground_truth["annotations"]:
        if not annotation.get("iscrowd", 0):
            counts[names[annotation["category_id"]]] += 1
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        if not results:
            # COCO.loadRes cannot take an empty list; nothing found scores 0 where objects exist.
            per_category = {name: {"ap": 0.0 if counts[name] else None, "ap50": 0.0 if counts[name] else None,
                                   "objects": counts[name]} for name in names.values()}
            zero = 0.0 if any(counts.values()) else None
            return CocoScores(ap=zero, ap50=zero, ap75=zero, per_category=per_category, detections=0)
        dt = gt.loadRes(copy.deepcopy(list(results)))
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall, categories, areas, max dets)
    iou_thresholds = evaluator.params.iouThrs
    at_50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    per_category = {}
    for position, category_id in enumerate(evaluator.params.catIds):
        name = names[category_id]
        per_category[name] = {
            "ap": _mean_precision(precision[:, :, position, 0, -1]),
            "ap50": _mean_precision(precision[at_50, :, position, 0, -1]),
            "objects": counts[name],
        }
    stats = [float(value) for value in evaluator.stats]
    return CocoScores(ap=_defined(stats[0]), ap50=_defined(stats[1]), ap75=_defined(stats[2]),
                      per_category=per_category, detections=len(results), stats=stats)


@dataclass
class TextEvaluation:
    """COCO mask AP per mode, for the queries (category names) used."""

    queries: list[str]
    modes: dict[str, CocoScores]
    model: str | None = None  # the concept model of modes grounded and hybrid

    def to_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "model": self.model,
                "modes": {mode: scores.to_dict() for mode, scores in self.modes.items()}}

    def table(self) -> str:
        """Overall AP / AP50 / AP75 per mode, then AP per category and mode."""
        overall = format_table(["mode", "AP", "AP50", "AP75", "detections"],
                               [[mode, s.ap, s.ap50, s.ap75, s.detections] for mode, s in self.modes.items()])
        modes = list(self.modes)
        names = list(next(iter(self.modes.values())).per_category) if self.modes else []
        rows = []
        for name in names:
            first = self.modes[modes[0]].per_category[name]
            rows.append([name, first["objects"], *(self.modes[m].per_category[name]["ap"] for m in modes)])
        per_category = format_table(["category", "objects", *(f"AP {m}" for m in modes)], rows)
        return overall + "\n\n" + per_category


def evaluate_text(
    pipeline: Any,
    dataset: SegmentationDataset,
    modes: Sequence[str] = ("grounded",),
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    clip_threshold: float | None = None,
    progress: bool = False,
    model: str | None = None,
) -> TextEvaluation:
    """COCO mask AP of `pipeline` (a `LangSAM`) on `dataset` with its category names as text
    queries, for each mode in `modes`; `model` is the concept model of modes grounded and hybrid
    (None: the pipeline's own, e.g. ``"sam3"``). Each image is read once; its SAM (or SAM 3)
    image pass is reused across modes by the pipeline's cache."""
    from tqdm.auto import tqdm

    modes = list(dict.fromkeys(modes))
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be some of {', '.join(MODES)}, got {list(modes)}")
    queries = list(dataset.categories)
    category_ids = {name: index for index, name in enumerate(queries, start=1)}
    ground_truth = dataset.to_coco()
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    bar = tqdm(total=len(dataset), desc="text prompts", unit="image", disable=not progress, leave=False)
    try:
        for index, record in enumerate(dataset):
            image = dataset.load_image(index)
            for mode in modes:
                options = {} if mode == "grounded" else {"clip_threshold": clip_threshold}
                if model is not None and mode != "clip":
                    options["model"] = model
                segmentation = pipeline.segment(image, queries, box_threshold=box_threshold,
                                                text_threshold=text_threshold, mode=mode, **options)
                results[mode] += segmentation.to_coco(image_id=record.image_id, category_ids=category_ids)
            bar.update(1)
    finally:
        bar.close()
    concept = model if model is not None else getattr(pipeline, "model", None)
    return TextEvaluation(queries=queries, modes={mode: coco_mask_ap(ground_truth, results[mode]) for mode in modes},
                          model=concept)


__all__ = ["MODES", "CocoScores", "TextEvaluation", "coco_mask_ap", "evaluate_text"]
