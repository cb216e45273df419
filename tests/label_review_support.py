"""Helpers for tests/test_label_review.py and benchmarks/bench_label_review.py: a project of real
photos with box proposals, a hand-driven clock, and counters on SAM's encoder and decoder."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from sam_factory import real_photo

#: The second class tries script injection through a class name (the page must show it as text).
XSS_CLASS = "<img src=x onerror=alert(1)>"
CLASSES = ["a cat", XSS_CLASS, "a coin"]
#: (photo, crop (H, W), proposal scores): the lowest score is reviewed first.
IMAGES = (("chelsea", (120, 160), (0.1, 0.6, 0.7)), ("coffee", (120, 160), (0.5, 0.8)),
          ("astronaut", (120, 160), (0.9,)))


class Clock:
    """A clock the test moves by hand (leases expire without sleeping)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def proposal_mask(height: int, width: int, index: int) -> np.ndarray:
    """Object ``index`` of an image: a rectangle, each one elsewhere."""
    mask = np.zeros((height, width), bool)
    x0, y0 = 10 + 45 * index, 15 + 10 * index
    mask[y0:y0 + 40, x0:x0 + 35] = True
    return mask


#: A finished round's figures, as `langsam label train` writes them (plus paths the page must not see).
ROUND_REPORT = {"round": 1, "checkpoint": "/secret/path/best.pth", "started_from": "base model",
                "review": {"acceptance_rate": 0.625, "corrections_per_object": 0.25, "clicks_per_mask": 1.5,
                           "proposal_miou": 0.8},
                "eval": {"before": {"miou_click_1": 0.41, "miou_box": 0.5}, "after": {"miou_click_1": 0.52,
                                                                                    "miou_box": 0.61}}}


def write_round_report(project, plot_size: tuple[int, int] = (64, 48)) -> None:
    """rounds/round-1/report.json and a report.png of ``plot_size`` (width, height)."""
    import json

    folder = project.rounds_dir / "round-1"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(ROUND_REPORT), encoding="utf-8")
    Image.new("RGB", plot_size, (30, 120, 200)).save(folder / "report.png")


def make_project(folder: Path, clock: Clock | None = None, images=IMAGES):
    """A project over crops of scikit-image photos, each with box proposals of the given scores
    (labels cycling through :data:`CLASSES`); returns the open `Project`."""
    from langsam.label import Project

    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    for name, (height, width), _ in images:
        Image.fromarray(np.ascontiguousarray(real_photo(name)[:height, :width])).save(images_dir / f"{name}.png")
    project = Project.init(folder / "project", images_dir, CLASSES, **({} if clock is None else {"clock": clock}))
    by_name = {Path(row.path).stem: row for row in project.images()}
    for name, (height, width), scores in images:
        objects = []
        for index, score in enumerate(scores):
            mask = proposal_mask(height, width, index)
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            objects.append({"label": CLASSES[index % len(CLASSES)], "mask": mask, "score": score,
                            "box": [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]})
        project.add_proposals(by_name[name].id, objects, round=1)
    return project


class CallCounter:
    """Counts calls of the model's ``encode_image`` and ``decode`` (wrapped on the instance)."""

    def __init__(self, model) -> None:
        self.counts = {"encode_image": 0, "decode": 0}
        for name in self.counts:
            setattr(model, name, self._counted(name, getattr(model, name)))

    def _counted(self, name: str, method):
        @functools.wraps(method)
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return method(*args, **kwargs)

        return counted
