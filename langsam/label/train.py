"""One round of the data engine: fine-tune SAM on the reviewed objects, evaluate on the held-out
reviewed images before and after, and write ``rounds/round-N/``.

Round N trains on every kept object (accepted, corrected, added) of the training-split images,
from all rounds so far, starting from the model that proposed round N (the base model for round
1, round N-1's ``best.pth`` after that), and validates on the kept objects of the ``val`` split
with ``langsam eval``'s protocol (1-click and box mIoU). ``langsam label propose --round N+1``
then proposes with ``rounds/round-N/best.pth``. The folder holds:

* ``best.pth`` / ``best.safetensors``: the tuned weights, official layout (``langsam finetune``
  keeps the best by validation score, the starting weights included, so a round never makes
  the held-out score worse), ``last.pth``, ``metrics.json``, ``train_state.pt``;
* ``train.json`` / ``val.json``: the data it saw, as COCO;
* ``report.json``, ``report.md`` (a table of every round so far), ``report.png`` (the same as a
  plot; needs matplotlib, otherwise ``report.md`` says so).

Review statistics of round N (over the objects proposed in round N, and the ones added on its
images): acceptance rate = accepted / reviewed proposals; corrections per object = correct
actions (not undone) / reviewed proposals; clicks per mask = clicks stored with the kept masks /
kept masks (an accepted proposal costs none); proposal mIoU = mean IoU of the kept proposals
with their final masks (1 for an accepted one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from langsam.label.export import reviewed_dataset
from langsam.label.project import REVIEWED_KEEP, Project, ProjectError
from langsam.label.propose import CHECKPOINT_NAME, round_checkpoint, round_dir

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
TABLE_NAME = "report.md"
PLOT_NAME = "report.png"


def current_round(project: Project) -> int:
    """The newest proposed round (the one a review just went through)."""
    rounds = [image.proposed_round for image in project.images() if image.proposed_round is not None]
    if not rounds:
        raise ProjectError(f"nothing proposed yet: run 'langsam label propose {project.path}' and review first")
    return max(rounds)


def review_stats(project: Project, round: int) -> dict[str, Any]:
    """The review statistics of ``round`` (see the module docstring); None where undefined."""
    objects = [obj for obj in project.objects() if obj.round == round]
    proposals = [obj for obj in objects if obj.status in ("accepted", "corrected", "rejected")]
    kept = [obj for obj in objects if obj.status in REVIEWED_KEEP]
    ids = {obj.id for obj in objects}
    corrections = sum(1 for action in project.actions()
                      if action["kind"] == "correct" and not action["undone"] and action["object_id"] in ids)
    clicks = sum(len(obj.points or []) for obj in kept)
    ious = [_iou(obj.proposal_mask, obj.mask) for obj in kept if obj.proposal_rle is not None]
    counts = {status: sum(1 for obj in objects if obj.status == status)
              for status in ("proposed", "accepted", "corrected", "rejected", "added")}

    def ratio(numerator: float, denominator: int) -> float | None:
        return float(numerator) / denominator if denominator else None

    return {"objects": counts, "acceptance_rate": ratio(counts["accepted"], len(proposals)),
            "corrections_per_object": ratio(corrections, len(proposals)),
            "clicks_per_mask": ratio(clicks, len(kept)),
            "proposal_miou": float(np.mean(ious)) if ious else None}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def train_round(project: Project, *, model: Any = None, sam_type: str | None = None,
                sam_checkpoint: str | Path | None = None, config: Any = None, device: Any = None,
                round: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train round ``round`` (default :func:`current_round`) and write its folder; returns the
    report (also ``report.json``). ``model``: the SAM to start from (trained in place); None
    builds it from the checkpoint that proposed the round (``sam_type`` / ``sam_checkpoint``
    for round 1, as ``LangSAM`` would). ``config``: a ``sam.training.TrainConfig``. A run that
    was interrupted resumes where it stopped.

    Raises:
        ProjectError: the round was already trained, or nothing reviewed to train on.
    """
    from sam.training import TrainConfig, finetune

    from langsam.io import atomic_write_json, atomic_write_text

    round = current_round(project) if round is None else int(round)
    folder = round_dir(project, round)
    if (folder / REPORT_NAME).is_file():
        raise ProjectError(f"round {round} is already trained ({folder}); propose the next round with "
                           f"'langsam label propose {project.path} --round {round + 1}', review it, then train")
    train_set = reviewed_dataset(project, [image for image in project.images("train")], "train")
    val_set = reviewed_dataset(project, [image for image in project.images("val")], "val")
    train_set = train_set.subset([i for i, record in enumerate(train_set) if record.objects], "train")
    val_set = val_set.subset([i for i, record in enumerate(val_set) if record.objects], "val")
    if train_set.num_objects == 0:
        raise ProjectError("no reviewed objects in the training images yet: accept, correct or add some first")
    if val_set.num_objects == 0:
        logger.warning("no reviewed held-out (val) image yet: the round trains without a before/after evaluation")
    config = config or TrainConfig()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "train.json", train_set.to_coco(), indent=None)
    atomic_write_json(folder / "val.json", val_set.to_coco(), indent=None)
    if model is None:
        model, device = _load_model(project, round, sam_type, sam_checkpoint, device)
    resume = (folder / "train_state.pt").is_file()
    result = finetune(model, train_set, folder, val=val_set if val_set.num_objects else None, config=config,
                      resume=resume, device=device, progress=progress)
    before, after = _before_after(result.history)
    report = {
        "round": round,
        "started_from": "base model" if round == 1 else str(round_checkpoint(project, round)),
        "checkpoint": str(folder / CHECKPOINT_NAME),
        "train": {"images": len(train_set), "objects": train_set.num_objects},
        "val": {"images": len(val_set), "objects": val_set.num_objects},
        "steps": result.steps,
        "review": review_stats(project, round),
        "eval": {"before": before, "after": after},
    }
    atomic_write_json(folder / REPORT_NAME, report)
    reports = all_reports(project)
    atomic_write_text(folder / TABLE_NAME, report_table(reports, plotted=_plot(reports, folder / PLOT_NAME)))
    return report


def _load_model(project: Project, round: int, sam_type: str | None, sam_checkpoint: Any, device: Any):
    from sam import build_sam

    from langsam.pipeline import DEFAULT_SAM_TYPE, resolve_device
    from langsam.weights import resolve_sam_checkpoint

    tuned = round_checkpoint(project, round)
    if tuned is not None:
        return build_sam("auto", checkpoint=tuned), resolve_device(device)
    sam_type = sam_type or ("auto" if sam_checkpoint else DEFAULT_SAM_TYPE)
    return build_sam(sam_type, checkpoint=resolve_sam_checkpoint(sam_type, sam_checkpoint)), resolve_device(device)


def _before_after(history: list[dict[str, Any]]) -> tuple[dict | None, dict | None]:
    """The validation summary of the starting weights and of the kept (best) ones."""
    scored = [entry for entry in history if entry.get("val")]
    if not scored:
        return None, None
    best = max(scored, key=lambda entry: (entry["val"].get("score") or -1.0, -entry["epoch"]))
    return scored[0]["val"], best["val"]


def all_reports(project: Project) -> list[dict[str, Any]]:
    """Every trained round's report.json, by round."""
    reports = []
    for path in project.rounds_dir.glob(f"round-*/{REPORT_NAME}"):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            logger.warning("%s: unreadable round report, left out of the table", path)
    return sorted(reports, key=lambda report: report["round"])


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report_table(reports: list[dict[str, Any]], plotted: bool = True) -> str:
    """A Markdown table, one row per round."""
    header = ["round", "reviewed proposals", "acceptance rate", "corrections / object", "clicks / mask",
              "proposal mIoU", "val 1-click mIoU before", "after", "val box mIoU before", "after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for report in reports:
        review = report["review"]
        objects = review["objects"]
        before = report["eval"]["before"] or {}
        after = report["eval"]["after"] or {}
        row = [report["round"], objects["accepted"] + objects["corrected"] + objects["rejected"],
               review["acceptance_rate"], review["corrections_per_object"], review["clicks_per_mask"],
               review["proposal_miou"], before.get("miou_click_1"), after.get("miou_click_1"),
               before.get("miou_box"), after.get("miou_box")]
        lines.append("| " + " | ".join(_fmt(value) for value in row) + " |")
    if not plotted:
        lines += ["", f"(no {PLOT_NAME}: matplotlib is not installed; pip install matplotlib)"]
    return "\n".join(lines) + "\n"


def _plot(reports: list[dict[str, Any]], path: Path) -> bool:
    """Acceptance rate and held-out mIoU per round as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    rounds = [report["round"] for report in reports]
    series = {
        "acceptance rate": [report["review"]["acceptance_rate"] for report in reports],
        "proposal mIoU": [report["review"]["proposal_miou"] for report in reports],
        "val 1-click mIoU (after)": [(report["eval"]["after"] or {}).get("miou_click_1") for report in reports],
        "val box mIoU (after)": [(report["eval"]["after"] or {}).get("miou_box") for report in reports],
    }
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in series.items():
        axes.plot(rounds, [np.nan if v is None else v for v in values], marker="o", label=name)
    axes.set_xlabel("round")
    axes.set_ylim(0, 1)
    axes.set_xticks(rounds)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    from langsam.io import atomic_write_bytes
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True
