"""What the batch commands (``segment``, ``auto-masks``) share: the input and output options,
collecting inputs into :class:`Item` s with collision-free output names, the pixel limit,
decoding ahead in a thread, the progress bar, failure reports and the closing summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from langsam.cli.options import UsageError, number

__all__ = [
    "ANNOTATIONS_NAME",
    "OVERLAY_NAME",
    "RECORD_NAME",
    "Item",
    "RunReport",
    "add_input_arguments",
    "collect_items",
    "load_reason",
    "prefetch",
    "prepare_out",
    "print_summary",
    "progress",
    "read_json",
    "report_failure",
    "set_pixel_limit",
]

# Per-run files at the top of --out; no per-image output may take these names.
ANNOTATIONS_NAME = "annotations.json"
RECORD_NAME = "result.json"
OVERLAY_NAME = "overlay.jpg"
_RESERVED_STEMS = {ANNOTATIONS_NAME, RECORD_NAME}


@dataclass
class Item:
    """One input image and where its outputs go."""

    path: Path
    file_name: str  # relative to the common input folder, POSIX separators (COCO file_name)
    key: str  # safe single path component naming its outputs under --out


@dataclass
class RunReport:
    """Counts the summary prints."""

    total: int = 0
    processed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    objects: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """INPUT..., ``--out``, ``--skip-existing``, ``--max-pixels``, ``-q``, ``-v``."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, folders (searched recursively) or glob patterns (quote them)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip images already finished in --out (resume an interrupted run)")
    parser.add_argument("--max-pixels", type=number(int, 0), default=None, metavar="N",
                        help="refuse images larger than N pixels (default 100000000; 0 = no limit)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what the models are doing")


def collect_items(inputs: Sequence[str]) -> list[Item]:
    """Expand INPUTs and give each image a collision-free output key (usage errors raise UsageError)."""
    from langsam.io import iter_image_files, unique_stem

    if not inputs:
        raise UsageError("no INPUT given: pass image files, folders or glob patterns")
    try:
        paths = iter_image_files(inputs)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not paths:
        raise UsageError(f"no image files found in {', '.join(inputs)}")
    resolved = [path.resolve() for path in paths]
    try:
        root = Path(os.path.commonpath([str(path.parent) for path in resolved]))
    except ValueError:  # e.g. inputs on different Windows drives
        root = None
    seen = set(_RESERVED_STEMS)
    items = []
    for path, absolute in zip(paths, resolved):
        try:
            file_name = absolute.relative_to(root).as_posix() if root is not None else path.name
        except ValueError:
            file_name = path.name
        items.append(Item(path=path, file_name=file_name, key=unique_stem(absolute, seen, root=root)))
    return items


def prepare_out(out: str) -> Path:
    """Create ``--out`` if needed; returns it resolved (UsageError if it cannot be a folder)."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --out {out!r}: {error.strerror or error}") from None
    return out_dir.resolve()


def set_pixel_limit(max_pixels: int | None) -> int | None:
    """The ``max_pixels`` to give ``load_image``; raises Pillow's own bomb guard to match."""
    from PIL import Image

    from langsam.io import DEFAULT_MAX_PIXELS

    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if max_pixels == 0:
        Image.MAX_IMAGE_PIXELS = None
        return None
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    return max_pixels


def load_reason(error: Exception) -> str:
    """The message of an ``ImageLoadError``, with the flag to use when the pixel limit refused it."""
    message = str(error)
    if "pixels" in message and ("limit" in message or "too large" in message):
        message += "; raise the limit with --max-pixels N (0 = no limit)"
    return message


def prefetch(items: Sequence[Item], load: Callable[[Path], Any], depth: int) -> Iterator[tuple[Item, Future]]:
    """Yield ``(item, future image)`` in order while up to ``depth`` later images decode in a thread,
    so decoding overlaps the model. Each image is decoded exactly once."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="langsam-load") as pool:
        pending: list[tuple[Item, Future]] = []
        for item in items:
            pending.append((item, pool.submit(load, item.path)))
            if len(pending) > depth:
                yield pending.pop(0)
        while pending:
            yield pending.pop(0)


def progress(total: int, initial: int, description: str, quiet: bool):
    """A tqdm bar on stderr (disabled with ``-q``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="img", disable=quiet,
                dynamic_ncols=True, file=sys.stderr)


def report_failure(report: RunReport, bar: Any, path: Path, reason: str) -> None:
    """Say on stderr, at once, which input failed and why; the run goes on."""
    prefix = f"{path}: "
    if reason.startswith(prefix):  # io's messages already start with the path
        reason = reason[len(prefix):]
    report.failures.append((str(path), reason))
    bar.write(f"error: {path}: {reason}", file=sys.stderr)


def print_summary(command: str, report: RunReport, extra_lines: Sequence[str] = ()) -> None:
    elapsed = time.perf_counter() - report.started
    rate = report.processed / elapsed if elapsed > 0 else 0.0
    lines = [
        f"langsam {command}: {report.total} images: {report.processed} processed, {report.skipped} skipped, "
        f"{len(report.failures)} failed in {elapsed:.1f} s ({rate:.2f} images/s)",
        *extra_lines,
    ]
    if report.failures:
        lines.append("failed:")
        lines += [f"  {path}: {reason}" for path, reason in report.failures]
    print("\n".join(lines))


def read_json(path: Path) -> Any | None:
    """The parsed JSON file, or None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
