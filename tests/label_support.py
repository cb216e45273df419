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
