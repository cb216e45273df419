"""Export a project's reviewed objects (accepted, corrected, added; never proposed or rejected)
as COCO, YOLO segmentation or SA-1B, split into train / val.

Which images: every image with a kept object, and every fully reviewed image (proposed, nothing
left to review) even if all its proposals were rejected: a reviewed empty image is a true
negative. Images still waiting for their first review are left out.

Formats (under ``out``):

* ``coco``: ``<split>.json``, COCO instances (RLE masks, ``bbox`` xywh of the mask, categories
  = the project's classes, ids 1..K in that order), ``file_name`` relative to the images folder;
* ``sa1b``: ``<split>/<image>.json`` per image, ``{"image": {image_id, file_name, height, width},
  "annotations": [{id, segmentation (RLE), bbox, area, category}]}`` (``langsam auto-masks``'
  layout, plus the category);
* ``yolo``: Ultralytics' segmentation layout, ``images/<split>/<image>`` (a symlink to the
  original, copied where links are not allowed), ``labels/<split>/<image>.txt`` with one line per
  object, ``class x1 y1 x2 y2 ...`` (class index from 0 in the project's class order, polygon
  vertices normalised by the image width and height), and ``data.yaml``. A polygon is each
  object's outer boundary along pixel edges; holes are filled, and an object in several parts
  becomes one polygon whose parts are joined by zero-width bridges (as Ultralytics' own COCO
  converter joins them).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from langsam.label.project import REVIEWED_KEEP, ImageRow, Project, ProjectError, rle_decode

logger = logging.getLogger(__name__)

FORMATS = ("coco", "yolo", "sa1b")


def parse_split(text: str) -> str | float:
    """``--split`` values: ``project`` (the held-out images chosen at init), ``none`` (one set,
    ``all``), or ``val=F`` (a fresh random fraction F of the exported images)."""
    text = text.strip().lower()
    if text in ("project", "none"):
        return text
    if text.startswith("val="):
        try:
            fraction = float(text[4:])
        except ValueError:
            fraction = -1.0
        if 0.0 <= fraction < 1.0:
            return fraction
    raise ValueError(f"--split must be project, none or val=F with 0 <= F < 1, got {text!r}")


def exported_images(project: Project) -> list[ImageRow]:
    """The images an export holds (see the module docstring), by id."""
    progress = project.progress()["per_image"]
    kept_on = {obj.image_id for obj in project.objects(statuses=REVIEWED_KEEP)}
    return [image for image in project.images()
            if image.id in kept_on or (image.proposed_round is not None and progress[image.id][0] == progress[image.id][1])]


def split_images(project: Project, images: list[ImageRow], split: str | float = "project",
                 seed: int = 0) -> dict[str, list[ImageRow]]:
    """``{"train": [...], "val": [...]}`` (``{"all": [...]}`` for ``none``), each by id."""
    if split == "none":
        return {"all": list(images)}
    if split == "project":
        held_out = {image.id for image in images if image.split == "val"}
    else:
        count = int(round(len(images) * float(split)))
        held_out = set(random.Random(seed).sample([image.id for image in images], count))
    return {"train": [image for image in images if image.id not in held_out],
            "val": [image for image in images if image.id in held_out]}


def reviewed_dataset(project: Project, images: list[ImageRow], name: str = "reviewed") -> Any:
    """The kept objects of ``images`` as a ``sam.training.SegmentationDataset`` (what
    ``langsam finetune`` and ``langsam eval`` read), categories = the project's classes."""
    from sam.training.data import ImageRecord, ObjectRecord, SegmentationDataset

    records = []
    for image in images:
        if image.width is None:
            raise ProjectError(f"{image.path}: the image size is unknown (propose it first)")
        objects = tuple(
            ObjectRecord(annotation_id=obj.id, category=obj.label, source=f"object {obj.id}", height=image.height,
                         width=image.width, segmentation=obj.mask_rle)
            for obj in project.objects(image.id, statuses=REVIEWED_KEEP))
        records.append(ImageRecord(image_id=image.id, path=project.image_path(image.id), file_name=image.path,
                                   height=image.height, width=image.width, objects=objects, source=image.path))
    return SegmentationDataset(records, project.classes, name)


def export(project: Project, out: str | os.PathLike, format: str = "coco", split: str | float = "project",
           seed: int = 0) -> dict[str, Any]:
    """Write the export; returns ``{"files": [paths], "images": {split: n}, "objects": {split: n}}``."""
    if format not in FORMATS:
        raise ProjectError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProjectError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    images = exported_images(project)
    splits = split_images(project, images, split, seed)
    writer = {"coco": _write_coco, "sa1b": _write_sa1b, "yolo": _write_yolo}[format]
    summary: dict[str, Any] = {"files": [], "images": {}, "objects": {}}
    for name, rows in splits.items():
        coco = reviewed_dataset(project, rows, name).to_coco()
        summary["images"][name] = len(coco["images"])
        summary["objects"][name] = len(coco["annotations"])
        summary["files"] += writer(project, out, name, coco)
    if format == "yolo":
        summary["files"].append(_write_yolo_yaml(project, out, list(splits)))
    return summary


def _write_coco(project: Project, out: Path, split: str, coco: dict[str, Any]) -> list[Path]:
    from langsam.io import atomic_write_json, safe_join

    coco = {"info": {"description": f"langsam label export of {project.path.name}", "split": split,
                     "images_dir": str(project.images_dir)}, **coco}
    return [atomic_write_json(safe_join(out, f"{split}.json"), coco, indent=None)]


def _grouped(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    return by_image


def _write_sa1b(project: Project, out: Path, split: str, coco: dict[str, Any]) -> list[Path]:
    from langsam.io import atomic_write_json, safe_join, unique_stem

    names = {category["id"]: category["name"] for category in coco["categories"]}
    by_image = _grouped(coco)
    seen: set[str] = set()
    files = []
    for image in coco["images"]:
        stem = unique_stem(project.images_dir / image["file_name"], seen, root=project.images_dir)
        annotations = [{"id": a["id"], "segmentation": a["segmentation"], "bbox": a["bbox"], "area": a["area"],
                        "category": names[a["category_id"]]} for a in by_image[image["id"]]]
        document = {"image": {"image_id": image["id"], "file_name": image["file_name"], "height": image["height"],
                              "width": image["width"]}, "annotations": annotations}
        files.append(atomic_write_json(safe_join(out, split, f"{stem}.json"), document))
    return files


def _write_yolo(project: Project, out: Path, split: str, coco: dict[str, Any]) -> list[Path]:
    from langsam.io import atomic_write_text, safe_join, unique_stem

    by_image = _grouped(coco)
    seen: set[str] = set()
    files = []
    for image in coco["images"]:
        source = project.image_path(image["id"])
        stem = unique_stem(source, seen, root=project.images_dir)
        lines = []
        for annotation in by_image[image["id"]]:
            polygon = mask_polygon(rle_decode(annotation["segmentation"]))
            coords = polygon / np.array([image["width"], image["height"]], dtype=np.float64)
            lines.append(" ".join([str(annotation["category_id"] - 1), *(f"{v:.6f}" for v in coords.ravel())]))
        files.append(atomic_write_text(safe_join(out, "labels", split, f"{stem}.txt"),
                                       "".join(line + "\n" for line in lines)))
        link = safe_join(out, "images", split, stem + source.suffix.lower())
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(source)
        except OSError:  # no symlinks here (Windows without developer mode, some mounts)
            shutil.copy2(source, link)
        files.append(link)
    return files


def _write_yolo_yaml(project: Project, out: Path, splits: list[str]) -> Path:
    from langsam.io import atomic_write_text, safe_join

    train = "images/all" if splits == ["all"] else "images/train"
    val = "images/all" if splits == ["all"] else "images/val"
    # JSON strings are valid YAML scalars, so class names need no YAML escaping of their own.
    lines = [f"path: {json.dumps(str(out.resolve()))}", f"train: {train}", f"val: {val}", "names:"]
    lines += [f"  {index}: {json.dumps(name)}" for index, name in enumerate(project.classes)]
    return atomic_write_text(safe_join(out, "data.yaml"), "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# Mask -> polygon
# --------------------------------------------------------------------------------------------

#: Unit steps along pixel edges, clockwise in image coordinates (y down): right, down, left, up.
_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def _boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Every closed boundary of ``mask`` along pixel edges, vertices at pixel corners ((K, 2)
    x, y). Outer boundaries run clockwise on screen (positive shoelace area in y-down
    coordinates), holes the other way. Where two pixels touch only at a corner the trace turns
    left, so they count as joined (8-connected objects have one outer boundary)."""
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[int]] = {}

    def add(rows: np.ndarray, cols: np.ndarray, direction: int, dx: int, dy: int) -> None:
        for row, col in zip(rows.tolist(), cols.tolist()):
            edges.setdefault((col + dx, row + dy), []).append(direction)

    top = inside & ~padded[:-2, 1:-1]
    right = inside & ~padded[1:-1, 2:]
    bottom = inside & ~padded[2:, 1:-1]
    left = inside & ~padded[1:-1, :-2]
    add(*np.nonzero(top), 0, 0, 0)  # (c, r) -> (c + 1, r)
    add(*np.nonzero(right), 1, 1, 0)  # (c + 1, r) -> (c + 1, r + 1)
    add(*np.nonzero(bottom), 2, 1, 1)  # (c + 1, r + 1) -> (c, r + 1)
    add(*np.nonzero(left), 3, 0, 1)  # (c, r + 1) -> (c, r)
    loops = []
    while edges:
        start = next(iter(edges))
        vertex, direction = start, None
        points = []
        while True:
            outgoing = edges.get(vertex)
            if not outgoing:
                break
            if direction is None or len(outgoing) == 1:
                choice = outgoing[0]
            else:  # a corner shared by two diagonal pixels: turn left
                choice = (direction + 3) % 4 if (direction + 3) % 4 in outgoing else outgoing[0]
            outgoing.remove(choice)
            if not outgoing:
                del edges[vertex]
            if choice != direction:
                points.append(vertex)  # only corners where the direction changes
            direction = choice
            vertex = (vertex[0] + _STEPS[choice][0], vertex[1] + _STEPS[choice][1])
            if vertex == start and start not in edges:
                break
        loops.append(np.array(points, dtype=np.float64))
    return loops


def _area(loop: np.ndarray) -> float:
    x, y = loop[:, 0], loop[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """One polygon ((K, 2) x, y in pixels, corners of pixels) tracing ``mask``'s outer
    boundaries; several parts are joined, largest first, by zero-width bridges."""
    outer = sorted((loop for loop in _boundary_loops(mask) if len(loop) >= 3 and _area(loop) > 0),
                   key=_area, reverse=True)
    if not outer:
        raise ProjectError("cannot trace an empty mask")
    polygon = [outer[0]]
    for part in outer[1:]:  # out to the part and back along the same segment
        polygon += [outer[0][:1], part, part[:1]]
    return np.concatenate(polygon + ([outer[0][:1]] if len(outer) > 1 else []))
