"""The one result object every langsam entry point returns."""

from __future__ import annotations

import colorsys
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from langsam.io import atomic_save_image, atomic_write_json, safe_join, sanitize_name

logger = logging.getLogger(__name__)

__all__ = ["Segmentation", "clip_boxes"]

MODES = ("grounded", "clip", "hybrid")


def clip_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(N, 4) xyxy boxes -> float32 boxes inside the image: ``0 <= x0 <= x1 <= W`` and
    ``0 <= y0 <= y1 <= H`` (original-image pixels; W and H are the right and bottom edges).

    Raises:
        ValueError: a box with NaN or infinite coordinates, or with x1 < x0 or y1 < y0.
    """
    import torch
    from torchvision.ops import clip_boxes_to_image

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    return clip_boxes_to_image(torch.from_numpy(boxes), tuple(image_size)).numpy()


@dataclass(repr=False, eq=False)
class Segmentation:
    """Objects found in one image: parallel per-object arrays plus the image size.

    Attributes:
        masks: ``(N, H, W)`` bool, in original-image pixels.
        boxes: ``(N, 4)`` float32 ``x0, y0, x1, y1`` in original-image pixels.
        scores: ``(N,)`` float32 detector confidence (grounded/hybrid) or CLIP
            probability (clip mode).
        mask_scores: ``(N,)`` float32 SAM predicted IoU of each mask.
        labels: ``N`` strings, each one of the queries the user wrote.
        image_size: ``(H, W)`` of the original image.
        clip_scores: ``(N,)`` float32 CLIP probability of each object's label, or None.
        mode: ``"grounded"``, ``"clip"`` or ``"hybrid"``.
        image: the ``(H, W, 3)`` uint8 RGB image the result refers to, or None (used by
            :meth:`overlay` and :meth:`save`).

    ``len(seg)``, ``for obj in seg`` (per-object dicts) and ``seg[i]`` (the i-th dict) work;
    ``seg[1:3]``, ``seg[seg.scores > 0.5]`` and ``seg[[2, 0]]`` return a new Segmentation.
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    mask_scores: np.ndarray
    labels: list[str]
    image_size: tuple[int, int]
    clip_scores: np.ndarray | None = None
    mode: str = "grounded"
    image: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(int(s) for s in self.image_size) <= 0:
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {self.image_size!r}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        height, width = self.image_size
        self.masks = np.asarray(self.masks).astype(bool, copy=False)
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        if self.boxes.size == 0:
            self.boxes = self.boxes.reshape(0, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.mask_scores = np.asarray(self.mask_scores, dtype=np.float32).reshape(-1)
        self.labels = [str(label) for label in self.labels]
        if self.masks.size == 0:  # e.g. np.zeros((0,)) from a caller with no objects
            self.masks = self.masks.reshape(0, height, width)
        if self.masks.ndim != 3 or self.masks.shape[1:] != (height, width):
            raise ValueError(f"masks must have shape (N, {height}, {width}), got {self.masks.shape}")
        count = self.masks.shape[0]
        if self.boxes.shape != (count, 4):
            raise ValueError(f"boxes must have shape ({count}, 4) to match {count} masks, got {self.boxes.shape}")
        self.boxes = clip_boxes(self.boxes, self.image_size)
        for name in ("scores", "mask_scores"):
            if getattr(self, name).shape != (count,):
                raise ValueError(f"{name} must have {count} entries, got {getattr(self, name).shape[0]}")
        if len(self.labels) != count:
            raise ValueError(f"labels must have {count} entries, got {len(self.labels)}")
        if self.clip_scores is not None:
            self.clip_scores = np.asarray(self.clip_scores, dtype=np.float32).reshape(-1)
            if self.clip_scores.shape != (count,):
                raise ValueError(f"clip_scores must have {count} entries, got {self.clip_scores.shape[0]}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.image is not None:
            self.image = np.asarray(self.image)
            if self.image.shape != (height, width, 3) or self.image.dtype != np.uint8:
                raise ValueError(
                    f"image must be ({height}, {width}, 3) uint8, got {self.image.shape} {self.image.dtype}"
                )

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, image_size: tuple[int, int], mode: str = "grounded", image: np.ndarray | None = None,
              with_clip_scores: bool = False) -> "Segmentation":
        """A result with no objects: ``masks`` has shape ``(0, H, W)``."""
        height, width = int(image_size[0]), int(image_size[1])
        return cls(
            masks=np.zeros((0, height, width), dtype=bool),
            boxes=np.zeros((0, 4), dtype=np.float32),
            scores=np.zeros(0, dtype=np.float32),
            mask_scores=np.zeros(0, dtype=np.float32),
            labels=[],
            image_size=(height, width),
            clip_scores=np.zeros(0, dtype=np.float32) if with_clip_scores else None,
            mode=mode,
            image=image,
        )

    # ---------------------------------------------------------------- container protocol
    def __len__(self) -> int:
        return self.masks.shape[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self._record(index)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            index = int(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"object index {index} out of range for {len(self)} objects")
            return self._record(index % len(self))
        if isinstance(key, slice):
            indices = np.arange(len(self))[key]
        else:
            selector = np.asarray(key)
            if selector.dtype == bool:
                if selector.shape != (len(self),):
                    raise IndexError(f"boolean index must have shape ({len(self)},), got {selector.shape}")
                indices = np.flatnonzero(selector)
            elif selector.size == 0:
                indices = np.zeros(0, dtype=np.int64)
            elif np.issubdtype(selector.dtype, np.integer) and selector.ndim == 1:
                indices = selector
                if indices.max() >= len(self) or indices.min() < -len(self):
                    raise IndexError(f"object index out of range for {len(self)} objects")
            else:
                raise IndexError(f"cannot index a Segmentation with {type(key).__name__}")
        return Segmentation(
            masks=self.masks[indices],
            boxes=self.boxes[indices],
            scores=self.scores[indices],
            mask_scores=self.mask_scores[indices],
            labels=[self.labels[i] for i in indices],
            image_size=self.image_size,
            clip_scores=None if self.clip_scores is None else self.clip_scores[indices],
            mode=self.mode,
            image=self.image,
        )

    def _record(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "label": self.labels[index],
            "box": self.boxes[index].tolist(),
            "score": float(self.scores[index]),
            "mask_score": float(self.mask_scores[index]),
            "clip_score": None if self.clip_scores is None else float(self.clip_scores[index]),
            "area": int(self.masks[index].sum()),
            "mask": self.masks[index],
        }

    def __repr__(self) -> str:
        height, width = self.image_size
        shown = ", ".join(f"{label}:{score:.2f}" for label, score in zip(self.labels[:5], self.scores[:5]))
        more = ", ..." if len(self) > 5 else ""
        return f"Segmentation(mode={self.mode!r}, n={len(self)}, image_size=({height}, {width}), objects=[{shown}{more}])"

    # ---------------------------------------------------------------- converters
    def category_ids(self) -> dict[str, int]:
        """Labels in order of first appearance, numbered from 1 (the default for :meth:`to_coco`)."""
        ids: dict[str, int] = {}
        for label in self.labels:
            ids.setdefault(label, len(ids) + 1)
        return ids

    def to_coco(self, image_id: int = 1, category_ids: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """COCO result annotations, one per object, masks as compressed RLE.

        Each dict has ``image_id``, ``category_id``, ``segmentation`` (``{"size": [H, W],
        "counts": str}``), ``area`` (mask pixels), ``bbox`` (``[x, y, w, h]`` of the box),
        ``score`` and ``label``; the list loads with ``pycocotools.coco.COCO.loadRes``.

        Raises:
            ValueError: a label is missing from ``category_ids``.
        """
        from pycocotools import mask as mask_utils

        ids = self.category_ids() if category_ids is None else dict(category_ids)
        missing = sorted(set(self.labels) - set(ids))
        if missing:
            raise ValueError(f"category_ids has no id for label(s): {', '.join(map(repr, missing))}")
        if len(self) == 0:
            return []
        rles = mask_utils.encode(np.asfortranarray(self.masks.transpose(1, 2, 0).astype(np.uint8)))
        areas = mask_utils.area(rles)
        annotations = []
        for index, rle in enumerate(rles):
            x0, y0, x1, y1 = (float(v) for v in self.boxes[index])
            annotations.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(ids[self.labels[index]]),
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": float(areas[index]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(self.scores[index]),
                    "label": self.labels[index],
                }
            )
        return annotations

    def to_records(self) -> list[dict[str, Any]]:
        """Per-object dicts without the mask arrays (JSON-ready)."""
        records = []
        for record in self:
            record = dict(record)
            del record["mask"]
            records.append(record)
        return records

    # ---------------------------------------------------------------- drawing and saving
    def overlay(self, image: Any = None, alpha: float = 0.5, draw_boxes: bool = True,
                draw_labels: bool = True) -> Image.Image:
        """The image with each mask tinted (one colour per label), boxes and ``label score`` text.

        Args:
            image: the image to draw on (anything :func:`langsam.io.load_image` accepts) or
                None to use ``self.image``. Must have size ``image_size``.
        Returns:
            An RGB ``PIL.Image`` of the same size as the image.
        """
        import torch
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        from langsam.io import load_image

        if image is None:
            if self.image is None:
                raise ValueError("this Segmentation holds no image; pass overlay(image=...)")
            pixels = self.image
        else:
            pixels = load_image(image)
        if pixels.shape[:2] != self.image_size:
            raise ValueError(f"image is {pixels.shape[0]}x{pixels.shape[1]} (HxW) but the result is for {self.image_size[0]}x{self.image_size[1]}")
        canvas = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        if len(self) == 0:
            return Image.fromarray(pixels.copy())
        colors = [label_color(label) for label in self.labels]
        canvas = draw_segmentation_masks(canvas, torch.from_numpy(self.masks), alpha=alpha, colors=colors)
        if draw_boxes:
            texts = [f"{label} {score:.2f}" for label, score in zip(self.labels, self.scores)] if draw_labels else None
            line = max(1, round(max(self.image_size) / 400))
            canvas = draw_bounding_boxes(canvas, torch.from_numpy(self.boxes), labels=texts, colors=colors, width=line)
        return Image.fromarray(canvas.permute(1, 2, 0).numpy())

    def save(self, directory: str | os.PathLike, image: Any = None) -> Path:
        """Write the result into ``directory`` (created if needed), atomically, file by file.

        Files: ``mask_{i:03d}_{label}.png`` (one 0/255 PNG per object), ``overlay.jpg`` (when
        an image is known) and ``result.json`` (image size, mode, per-object records with the
        mask file names, and COCO RLE). Nothing is written outside ``directory``.

        Returns:
            The resolved directory.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
        records = self.to_records()
        coco = self.to_coco()
        for index, record in enumerate(records):
            name = f"mask_{index:03d}_{sanitize_name(record['label'], max_len=40)}.png"
            atomic_save_image(safe_join(root, name), Image.fromarray(self.masks[index].astype(np.uint8) * 255))
            record["mask_file"] = name
            record["rle"] = coco[index]["segmentation"]
        has_image = image is not None or self.image is not None
        if has_image:
            atomic_save_image(safe_join(root, "overlay.jpg"), self.overlay(image), quality=90)
        atomic_write_json(
            safe_join(root, "result.json"),
            {
                "image_size": list(self.image_size),
                "mode": self.mode,
                "count": len(self),
                "overlay_file": "overlay.jpg" if has_image else None,
                "objects": records,
            },
        )
        return root


def label_color(label: str) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for ``label`` (same label -> same colour, every run)."""
    digest = hashlib.sha1(label.encode("utf-8")).digest()
    hue = digest[0] / 255.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (round(red * 255), round(green * 255), round(blue * 255))

