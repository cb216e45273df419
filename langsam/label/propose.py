"""Model proposals for a labelling project: run a ``LangSAM`` pipeline over the images not yet
proposed and store each image's objects in one transaction.

The work is split so the command line can run it on ``langsam.cli.batch``'s engine (local
prefetch or Ray workers): :func:`render_proposals` runs anywhere and returns JSON,
:func:`store_proposals` writes it into the project here. :func:`propose` is the same thing as a
plain Python loop, for scripts and tests that inject their own pipeline.

Rounds: round 1 proposes with the base model; ``langsam label train`` writes
``rounds/round-N/best.pth`` from round N's reviews, and round N + 1 proposes with it
(:func:`round_checkpoint`). An image is proposed again in a later round only while nothing on it
has been reviewed, so reviewed work is never replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from langsam.label.project import Project, ProjectError, rle_encode

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "best.pth"


def round_dir(project: Project, round: int) -> Path:
    """``PROJECT/rounds/round-N``."""
    return project.rounds_dir / f"round-{int(round)}"


def trained_rounds(project: Project) -> list[int]:
    """The rounds whose training finished (their folder holds the checkpoint), ascending."""
    rounds = []
    if project.rounds_dir.is_dir():
        for folder in project.rounds_dir.glob("round-*"):
            suffix = folder.name.removeprefix("round-")
            if suffix.isdigit() and (folder / CHECKPOINT_NAME).is_file():
                rounds.append(int(suffix))
    return sorted(rounds)


def default_round(project: Project) -> int:
    """The round a plain ``propose`` runs: the one after the newest trained round (1 if none)."""
    rounds = trained_rounds(project)
    return rounds[-1] + 1 if rounds else 1


def round_checkpoint(project: Project, round: int) -> Path | None:
    """The SAM checkpoint that proposes ``round``: None (the base model) for round 1, else
    ``rounds/round-(N-1)/best.pth``. Raises ProjectError if that round was not trained."""
    if round < 1:
        raise ProjectError(f"rounds start at 1, got {round}")
    if round == 1:
        return None
    checkpoint = round_dir(project, round - 1) / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise ProjectError(f"round {round} proposes with round {round - 1}'s tuned model, but {checkpoint} does not "
                           f"exist: run 'langsam label train {project.path}' after reviewing round {round - 1}")
    return checkpoint


def segment_kwargs(mode: str = "grounded", **options: Any) -> dict[str, Any]:
    """``LangSAM.segment`` keywords: ``mode`` and the options that are not None."""
    return {"mode": mode, **{name: value for name, value in options.items() if value is not None}}


def render_proposals(pipeline: Any, image: np.ndarray, file_name: str, source: str, *, classes: list[str],
                     segment_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Segment one image and return its proposals as JSON (here or on a Ray worker; writes
    nothing): ``({"file_name", "width", "height", "objects": [{"label", "mask_rle", "box",
    "score"}]}, {})``. Empty masks are dropped (nothing to review)."""
    result = pipeline.segment(image, classes, **segment_kwargs)
    objects = []
    for index in range(len(result)):
        mask = np.asarray(result.masks[index], dtype=bool)
        if not mask.any():
            continue
        objects.append({"label": result.labels[index], "mask_rle": rle_encode(mask),
                        "box": [float(v) for v in result.boxes[index]], "score": float(result.scores[index])})
    height, width = image.shape[:2]
    return {"file_name": file_name, "width": int(width), "height": int(height), "objects": objects}, {}


def store_proposals(project: Project, image_id: int, document: Mapping[str, Any], round: int) -> int:
    """Write one image's :func:`render_proposals` document (one transaction); returns the count."""
    image = project.image(image_id)
    if (image.width, image.height) != (document["width"], document["height"]):
        if image.width is not None:
            raise ProjectError(f"{image.path}: the image is now {document['width']}x{document['height']}, "
                               f"the project recorded {image.width}x{image.height} (was it replaced?)")
        project.set_image_size(image_id, document["width"], document["height"])
    project.add_proposals(image_id, document["objects"], round=round)
    return len(document["objects"])


@dataclass
class ProposeReport:
    processed: int = 0
    objects: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def propose(project: Project, pipeline: Any, round: int = 1, *, mode: str = "grounded",
            on_image: Callable[[int, int], None] | None = None, **options: Any) -> ProposeReport:
    """Propose ``round`` for every image :meth:`Project.unproposed` lists, with ``pipeline``
    (a ``LangSAM``; the caller picks its checkpoint, see :func:`round_checkpoint`). ``options``:
    ``LangSAM.segment`` keywords (``box_threshold``, ``top_k``, ...). A failing image is logged,
    listed in the report, and the loop goes on. ``on_image(image_id, objects)`` after each."""
    from langsam.io import ImageLoadError, load_image

    kwargs = segment_kwargs(mode, **options)
    report = ProposeReport()
    for image in project.unproposed(round):
        path = project.image_path(image.id)
        try:
            pixels = load_image(path)
            document, _ = render_proposals(pipeline, pixels, image.path, str(path), classes=project.classes,
                                           segment_kwargs=kwargs)
            count = store_proposals(project, image.id, document, round)
        except (ImageLoadError, ValueError, RuntimeError, OSError) as error:
            logger.error("%s: %s", path, error)
            report.failures.append((str(path), str(error)))
            continue
        report.processed += 1
        report.objects += count
        if on_image is not None:
            on_image(image.id, count)
    return report
