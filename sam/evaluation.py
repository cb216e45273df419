"""Prompted-segmentation quality: the SAM paper's point (click) and box protocols, and mIoU.

Point prompts (interactive segmentation, as in the SAM paper and RITM):

* click 1 goes on the object's interior point farthest from its boundary (Euclidean distance
  transform; the image edge counts as boundary); SAM answers with 3 masks and the one with the
  highest predicted IoU is kept (the "oracle" score takes the best of the 3 against the truth);
* each next click goes on the largest error region (4-connected; false negatives and false
  positives are separate regions; ties go to the false negative, then to the first region in
  raster order), at its point farthest from that region's boundary: positive (label 1) for a
  false negative, negative (label 0) for a false positive. The previous low-res logits go in
  as ``mask_input`` and SAM gives one mask. An object already segmented exactly gets no more
  clicks and keeps its IoU.

Box prompts: the ground-truth box (first and last object column and row), one mask.

Everything decodes through ``SamPredictor`` (``set_image`` / ``set_embedding``, then
``predict_torch``), so SAM 1 and SAM 2 are measured by the same code. Coordinates handed to a
decoder are (x, y) pixel indices in the original image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .training.data import SegmentationDataset, boxes_from_masks

logger = logging.getLogger(__name__)

#: decode(points (B, K, 2) xy, labels (B, K), boxes (B, 4) xyxy or None, mask_input (B, 1, h, w)
#: low-res logits or None, multimask) -> masks (B, C, H, W) bool, scores (B, C), low-res logits
#: (B, C, h, w). Points and boxes are in original-image pixels.
DecodeFn = Callable[[Any, Any, Any, Any, bool], tuple[np.ndarray, np.ndarray, Any]]


@dataclass(frozen=True)
class Click:
    """A simulated click: (x, y) pixel indices in the original image; label 1 = foreground
    (on a false negative), 0 = background (on a false positive)."""

    x: int
    y: int
    label: int


# ================================================================================ metrics
def mask_iou(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    """IoU of boolean masks (..., H, W) (broadcast); two empty masks count as 1.0 (they agree)."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    intersection = np.logical_and(prediction, truth).sum(axis=(-2, -1))
    union = np.logical_or(prediction, truth).sum(axis=(-2, -1))
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    return float(iou) if iou.ndim == 0 else iou


def _scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError as error:  # pragma: no cover - scipy ships with scikit-image / scikit-learn
        raise ImportError("the click protocol needs scipy (distance transform, connected regions): "
                          "pip install scipy") from error
    return ndimage


def farthest_from_boundary(region: np.ndarray) -> tuple[int, int, float]:
    """(row, col, distance) of the pixel of `region` (H, W) bool farthest from its boundary.

    The distance is Euclidean, to the nearest pixel outside the region, and the image edge
    counts as outside. Ties go to the first pixel in raster order.
    """
    ndimage = _scipy_ndimage()
    padded = np.pad(np.asarray(region, dtype=bool), 1)
    distance = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    index = int(np.argmax(distance))
    row, col = divmod(index, distance.shape[1])
    return row, col, float(distance[row, col])


def first_click(truth: np.ndarray) -> Click:
    """The first click on an object (H, W) bool: its interior point farthest from its boundary."""
    if not np.any(truth):
        raise ValueError("cannot click on an empty mask")
    row, col, _ = farthest_from_boundary(truth)
    return Click(x=col, y=row, label=1)


def next_click(prediction: np.ndarray, truth: np.ndarray) -> Click | None:
    """The corrective click for `prediction` against `truth` (both (H, W) bool), or None when
    they agree: on the largest error region, at its point farthest from its boundary."""
    ndimage = _scipy_ndimage()
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    best: tuple[int, np.ndarray, int] | None = None  # (area, region, label)
    for error, label in ((truth & ~prediction, 1), (prediction & ~truth, 0)):
        if not error.any():
            continue
        components, count = ndimage.label(error)
        areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
        largest = int(np.argmax(areas))
        if best is None or areas[largest] > best[0]:
            best = (int(areas[largest]), components == largest + 1, label)
    if best is None:
        return None
    row, col, _ = farthest_from_boundary(best[1])
    return Click(x=col, y=row, label=best[2])


# ================================================================================ protocols
@dataclass
class ClickSessionResult:
    """IoUs of B objects after each click: `ious` (B, num_clicks); `oracle` (B,) the best of the
    3 first-click masks; `clicks` the clicks given to each object."""

    ious: np.ndarray
    oracle: np.ndarray
    clicks: list[list[Click]]


def click_session(decode: DecodeFn, truths: np.ndarray, num_clicks: int) -> ClickSessionResult:
    """Run the click protocol on B objects of one image together.

    decode: see `DecodeFn`. truths: (B, H, W) bool, non-empty. num_clicks >= 1.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be at least 1, got {num_clicks}")
    truths = np.asarray(truths, dtype=bool)
    count = len(truths)
    clicks = [[first_click(truth)] for truth in truths]
    points = np.array([[[c.x, c.y] for c in object_clicks] for object_clicks in clicks], dtype=np.float64)
    labels = np.ones((count, 1), dtype=np.int64)
    masks, scores, low_res = decode(points, labels, None, None, True)
    candidate_ious = mask_iou(masks, truths[:, None])  # (B, 3)
    chosen = np.argmax(scores, axis=1)
    predictions = masks[np.arange(count), chosen]
    logits = _select_logits(low_res, chosen)
    ious = np.zeros((count, num_clicks))
    ious[:, 0] = candidate_ious[np.arange(count), chosen]
    oracle = candidate_ious.max(axis=1)
    for step in range(1, num_clicks):
        active = np.zeros(count, dtype=bool)
        new_points, new_labels = [], []
        for index in range(count):
            click = next_click(predictions[index], truths[index])
            if click is None:  # already exact: a padding point, ignored by SAM and by us
                new_points.append([0.0, 0.0])
                new_labels.append(-1)
            else:
                active[index] = True
                clicks[index].append(click)
                new_points.append([click.x, click.y])
                new_labels.append(click.label)
        if not active.any():
            ious[:, step:] = ious[:, step - 1 : step]
            break
        points = np.concatenate([points, np.array(new_points, dtype=np.float64)[:, None]], axis=1)
        labels = np.concatenate([labels, np.array(new_labels, dtype=np.int64)[:, None]], axis=1)
        masks, _, low_res = decode(points, labels, None, logits, False)
        updated = masks[:, 0]
        predictions = np.where(active[:, None, None], updated, predictions)
        logits = _keep_where(active, low_res[:, :1], logits)
        ious[:, step] = np.where(active, mask_iou(predictions, truths), ious[:, step - 1])
    return ClickSessionResult(ious=ious, oracle=oracle, clicks=clicks)


def _select_logits(low_res: Any, chosen: np.ndarray) -> Any:
    """(B, C, h, w) logits (tensor or array) -> (B, 1, h, w), mask `chosen[b]` of each."""
    if isinstance(low_res, torch.Tensor):
        index = torch.as_tensor(chosen, device=low_res.device)
        return low_res[torch.arange(len(chosen), device=low_res.device), index][:, None]
    return np.asarray(low_res)[np.arange(len(chosen)), chosen][:, None]


def _keep_where(active: np.ndarray, new: Any, old: Any) -> Any:
    """`new` for active objects, `old` for the others ((B, 1, h, w) tensors or arrays)."""
    if isinstance(new, torch.Tensor):
        return torch.where(torch.as_tensor(active, device=new.device)[:, None, None, None], new, old)
    return np.where(active[:, None, None, None], new, old)


def box_prompt_ious(decode: DecodeFn, truths: np.ndarray) -> np.ndarray:
    """IoU (B,) of the single mask SAM gives for each object's ground-truth box."""
    truths = np.asarray(truths, dtype=bool)
    masks, _, _ = decode(None, None, boxes_from_masks(truths), None, False)
    return mask_iou(masks[:, 0], truths)


def predictor_decoder(predictor: Any) -> DecodeFn:
    """A `DecodeFn` for a ``SamPredictor`` that holds an image (``set_image`` or
    ``set_embedding``): prompts go to the model-input frame, masks come back at the original
    size, and the low-res logits stay on the predictor's device."""

    def decode(points, labels, boxes, mask_input, multimask):
        size = predictor.original_size
        device = predictor.device
        coords = point_labels = box_tensor = None
        if points is not None:
            coords = predictor.transform.apply_coords_torch(torch.as_tensor(points, dtype=torch.float64), size)
            coords = coords.to(device)
            point_labels = torch.as_tensor(labels, dtype=torch.int, device=device)
        if boxes is not None:
            box_tensor = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float64), size)
            box_tensor = box_tensor.to(device)
        masks, scores, low_res = predictor.predict_torch(coords, point_labels, box_tensor, mask_input, multimask)
        return masks.cpu().numpy(), scores.cpu().numpy(), low_res

    return decode


# ================================================================================ datasets
@dataclass
class ObjectScore:
    """The scores of one object: IoU after each click, the oracle first click, the box."""

    image: str
    annotation_id: Any
    category: str
    click_ious: list[float]
    oracle_iou: float | None = None
    box_iou: float | None = None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass
class PromptEvaluation:
    """Per-object scores of a prompt evaluation and their means (mIoU)."""

    objects: list[ObjectScore] = field(default_factory=list)
    num_clicks: int = 1
    box: bool = True

    def summary(self, objects: Sequence[ObjectScore] | None = None) -> dict[str, Any]:
        """{"objects", "miou_click_1", "miou_click_1_oracle", "miou_click_N", "miou_box",
        "miou_by_click"} over `objects` (default: all)."""
        objects = self.objects if objects is None else objects
        result: dict[str, Any] = {"objects": len(objects)}
        if self.num_clicks:
            by_click = [_mean([obj.click_ious[k] for obj in objects]) for k in range(self.num_clicks)]
            result["miou_click_1"] = by_click[0]
            result["miou_click_1_oracle"] = _mean([obj.oracle_iou for obj in objects])
            if self.num_clicks > 1:
                result[f"miou_click_{self.num_clicks}"] = by_click[-1]
            result["miou_by_click"] = by_click
        if self.box:
            result["miou_box"] = _mean([obj.box_iou for obj in objects])
        return result

    def per_category(self) -> dict[str, dict[str, Any]]:
        categories: dict[str, list[ObjectScore]] = {}
        for obj in self.objects:
            categories.setdefault(obj.category, []).append(obj)
        return {name: self.summary(objects) for name, objects in sorted(categories.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": {"num_clicks": self.num_clicks, "box": self.box},
            "overall": self.summary(),
            "per_category": self.per_category(),
            "objects": [vars(obj) for obj in self.objects],
        }

    def columns(self) -> list[tuple[str, str]]:
        """(summary key, column title) of the mIoU columns."""
        columns = []
        if self.num_clicks:
            columns += [("miou_click_1", "1 click"), ("miou_click_1_oracle", "1 click (oracle)")]
            if self.num_clicks > 1:
                columns.append((f"miou_click_{self.num_clicks}", f"{self.num_clicks} clicks"))
        if self.box:
            columns.append(("miou_box", "box"))
        return columns

    def table(self) -> str:
        """A plain-text table: mIoU overall and per category."""
        columns = self.columns()
        rows = [("all", self.summary())] + list(self.per_category().items())
        return format_table(["category", "objects", *(title for _, title in columns)],
                            [[name, summary["objects"], *(summary.get(key) for key, _ in columns)] for name, summary in rows])


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others; floats with 3 decimals, None as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    text_rows = [list(header)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in text_rows) for i in range(len(header))]
    lines = []
    for number, row in enumerate(text_rows):
        lines.append("  ".join(value.ljust(widths[i]) if i == 0 else value.rjust(widths[i]) for i, value in enumerate(row)))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def evaluate_prompts(
    predictor: Any,
    dataset: SegmentationDataset,
    num_clicks: int = 5,
    box: bool = True,
    embeddings: Any = None,
    objects_per_batch: int = 16,
    progress: bool = False,
) -> PromptEvaluation:
    """mIoU of `predictor` (a ``SamPredictor``, SAM 1 or SAM 2) on `dataset` with the click
    protocol (1..num_clicks clicks; 0 skips it) and, if `box`, with ground-truth boxes.

    embeddings: optional cache with ``get(index) -> (features, original_size, input_size)``
    for the dataset's images (e.g. `sam.training.embedding_cache.EmbeddingCache`), so the
    encoder does not run again. Crowd regions are not prompted.
    """
    from tqdm.auto import tqdm

    if num_clicks < 0:
        raise ValueError(f"num_clicks must be >= 0, got {num_clicks}")
    if not num_clicks and not box:
        raise ValueError("nothing to evaluate: num_clicks is 0 and box is False")
    if objects_per_batch < 1:
        raise ValueError(f"objects_per_batch must be at least 1, got {objects_per_batch}")
    evaluation = PromptEvaluation(num_clicks=num_clicks, box=box)
    decode = predictor_decoder(predictor)
    bar = tqdm(total=len(dataset), desc="prompts", unit="image", disable=not progress, leave=False)
    first_click_sum = 0.0
    try:
        for index, record in enumerate(dataset):
            objects, truths = dataset.object_masks(index)
            bar.update(1)
            if not objects:
                continue
            if embeddings is not None:
                predictor.set_embedding(*embeddings.get(index))
            else:
                predictor.set_image(dataset.load_image(index))
            for start in range(0, len(objects), objects_per_batch):
                chunk = slice(start, start + objects_per_batch)
                batch_truths = truths[chunk]
                click_ious = np.zeros((len(batch_truths), 0))
                oracle = [None] * len(batch_truths)
                if num_clicks:
                    session = click_session(decode, batch_truths, num_clicks)
                    click_ious, oracle = session.ious, session.oracle.tolist()
                box_ious = box_prompt_ious(decode, batch_truths).tolist() if box else [None] * len(batch_truths)
                first_click_sum += float(np.sum(click_ious[:, 0])) if num_clicks else 0.0
                for position, obj in enumerate(objects[chunk]):
                    evaluation.objects.append(ObjectScore(
                        image=record.file_name, annotation_id=obj.annotation_id, category=obj.category,
                        click_ious=[float(v) for v in click_ious[position]], oracle_iou=oracle[position],
                        box_iou=box_ious[position],
                    ))
            if num_clicks:
                bar.set_postfix(miou_1_click=f"{first_click_sum / len(evaluation.objects):.3f}", refresh=False)
    finally:
        bar.close()
        predictor.reset_image()
    return evaluation


__all__ = [
    "Click",
    "ClickSessionResult",
    "ObjectScore",
    "PromptEvaluation",
    "box_prompt_ious",
    "click_session",
    "evaluate_prompts",
    "farthest_from_boundary",
    "first_click",
    "format_table",
    "mask_iou",
    "next_click",
    "predictor_decoder",
]
