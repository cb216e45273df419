"""Helpers for tests/test_label.py: small image folders, scripted review sessions, and the child
process of the crash test (``python tests/label_support.py crash PROJECT K``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a dog", "a cat"]


def write_images(folder: Path, count: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Path]:
    """``count`` random RGB PNGs of ``size`` (width, height) in ``folder`` (one in a subfolder)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / ("nested" if index == count - 1 else "") / f"img{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def propose_boxes(project, scores_per_image: dict[int, list[float]]) -> None:
    """Two-class box proposals: object j of an image is a (4 + 2j)-pixel square at (2j, 2j)."""
    for image_id, scores in scores_per_image.items():
        image = project.image(image_id)
        objects = []
        for j, score in enumerate(scores):
            side = 4 + 2 * j
            mask = box_mask(image.height, image.width, 2 * j, 2 * j, 2 * j + side, 2 * j + side)
            objects.append({"label": CLASSES[j % 2], "mask": mask, "box": [2 * j, 2 * j, 2 * j + side, 2 * j + side],
                            "score": score})
        project.add_proposals(image_id, objects, round=1)


def scripted_actions(project) -> list:
    """A fixed session of review actions, as callables ``f(project, index)`` (the crash test
    replays them in a child process and in the test)."""
    def action(index: int):
        objects = [o for image in project.images() for o in project.objects(image.id)]
        target = objects[index % len(objects)]
        key = f"k{index}"
        kind = index % 5
        if kind == 0:
            return project.accept(target.id, "ann", key)
        if kind == 1:
            return project.reject(target.id, "ann", key)
        if kind == 2:
            image = project.image(target.image_id)
            return project.correct(target.id, box_mask(image.height, image.width, 1, 1, 9, 7),
                                   [[3, 3, 1], [8, 6, 0]], "ann", key)
        if kind == 3:
            return project.relabel(target.id, CLASSES[(CLASSES.index(target.label) + 1) % 2], "ann", key)
        image = project.image(target.image_id)
        return project.add(image.id, CLASSES[0], box_mask(image.height, image.width, 20, 10, 30, 20), None, "ann", key)

    return action


def crash_child(project_dir: str, k: int) -> None:
    """Do review actions 0..k-1, print the queue after them and block: the parent kills -9."""
    sys.path.insert(0, str(REPO))
    from langsam.label import Project

    project = Project.open(project_dir)
    action = scripted_actions(project)
    for index in range(k):
        action(index)
    print(json.dumps({"done": k, "queue": project.queue()}), flush=True)
    sys.stdin.read()  # blocks until killed


if __name__ == "__main__":
    if sys.argv[1] == "crash":
        crash_child(sys.argv[2], int(sys.argv[3]))


# ----------------------------------------------------------------------------------------------
# The loop test: a detector that finds the ground truth's boxes, and a scripted reviewer
# ----------------------------------------------------------------------------------------------


class GroundTruthDetector:
    """Stands in for Grounding DINO: each image's ground-truth boxes (looked up by its pixels),
    scored from 0.9 down. The loop trains SAM, not the detector, so the boxes may as well be right."""

    def __init__(self, dataset) -> None:
        self.masks = {}
        for index in range(len(dataset)):
            _, masks = dataset.object_masks(index)
            self.masks[dataset.load_image(index).tobytes()] = masks

    def detect(self, pixels, queries, box_threshold=0.3, text_threshold=0.25):
        from langsam.detector import Detections
        from langsam.label.project import mask_box

        masks = self.masks[np.ascontiguousarray(pixels).tobytes()]
        boxes = np.array([mask_box(mask) for mask in masks], np.float32).reshape(-1, 4)
        count = len(boxes)
        return Detections(boxes, np.linspace(0.9, 0.5, count).astype(np.float32), [queries[0]] * count,
                          np.zeros(count, np.int64), [queries[0]] * count, list(queries))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def scripted_review(project, images, truth: dict[str, np.ndarray], accept_iou: float) -> None:
    """Review like an annotator with the ground truth in mind: accept a proposal whose IoU with
    its best-matching true mask is at least ``accept_iou``, else correct it to that mask (one
    click at its centre), reject one that overlaps nothing, and add every true object no
    proposal matched."""
    for image in images:
        masks = truth[image.path]
        matched = set()
        for obj in project.objects(image.id, statuses=["proposed"]):
            scores = [iou(obj.mask, mask) for mask in masks]
            best = int(np.argmax(scores))
            if scores[best] >= accept_iou:
                project.accept(obj.id, "bot", f"accept-{obj.id}")
            elif scores[best] > 0:
                ys, xs = np.nonzero(masks[best])
                project.correct(obj.id, masks[best], [[float(xs.mean()), float(ys.mean()), 1]], "bot",
                                f"correct-{obj.id}")
            else:
                project.reject(obj.id, "bot", f"reject-{obj.id}")
                continue
            matched.add(best)
        for index, mask in enumerate(masks):
            if index not in matched:
                project.add(image.id, project.classes[0], mask, None, "bot", f"add-{image.id}-{image.proposed_round}-{index}")
