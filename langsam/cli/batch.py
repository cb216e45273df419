"""What the batch commands (``segment``, ``auto-masks``) share: the input and output options,
collecting inputs into :class:`Item` s with collision-free output names, the pixel limit,
decoding ahead in a thread, the progress bar, failure reports (on stderr, in the summary and in
``failures.jsonl``), the closing summary, and the driver side of a ``--ray`` run
(:func:`run_on_ray`).

Outputs are written by this process in both engines: on a cluster the workers send back each
image's encoded files and record, and the driver writes them with the same atomic writes as a
local run (record last). A worker killed mid-image has therefore written nothing, no node needs
the output folder, and the driver keeps exactly one result per image."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import posixpath
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import closing, contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from langsam.cli.options import ModelLoadError, UsageError, load_pipeline, model_kwargs_from_args, number

logger = logging.getLogger(__name__)

__all__ = [
    "ANNOTATIONS_NAME",
    "FAILURES_NAME",
    "OVERLAY_NAME",
    "RECORD_NAME",
    "ClusterError",
    "Failure",
    "Item",
    "RunReport",
    "Terminated",
    "add_input_arguments",
    "collect_items",
    "encode_image",
    "load_reason",
    "prefetch",
    "prepare_out",
    "print_summary",
    "progress",
    "read_json",
    "report_failure",
    "run_on_ray",
    "set_pixel_limit",
    "stop_on_sigterm",
    "write_failures",
]

# Per-run files at the top of --out; no per-image output may take these names.
ANNOTATIONS_NAME = "annotations.json"
RECORD_NAME = "result.json"
OVERLAY_NAME = "overlay.jpg"
#: One JSON object per line for each input that failed and is not finished (see write_failures).
FAILURES_NAME = "failures.jsonl"
_RESERVED_STEMS = {ANNOTATIONS_NAME, RECORD_NAME, FAILURES_NAME}


@dataclass
class Item:
    """One input image and where its outputs go."""

    path: Path
    file_name: str  # relative to the common input folder, POSIX separators (COCO file_name)
    key: str  # safe single path component naming its outputs under --out
    uri: str | None = None  # set for inputs read through pyarrow (s3://, gs://, ...; --ray only)

    @property
    def source(self) -> str:
        """The input as the user named it: the URI, else the path."""
        return self.uri if self.uri is not None else str(self.path)


class ClusterError(ModelLoadError):
    """The cluster could not run (or finish) the job (exit status 1; finished images stay valid)."""


@dataclass(frozen=True)
class Failure:
    """One input that failed: a line of the summary and of ``failures.jsonl``."""

    input: str  # the input as the user named it (path or URI)
    output: str  # its output name under --out (Item.key)
    error: str  # the error's class, e.g. "ImageLoadError", "WorkerDiedError"
    message: str  # the reason, as printed on stderr
    attempts: int = 1  # how many times it was begun (more than 1: its Ray worker died during it)

    def to_json(self, command: str) -> dict[str, Any]:
        return {"command": command, "input": self.input, "output": self.output, "error": self.error,
                "message": self.message, "attempts": self.attempts}


@dataclass
class RunReport:
    """Counts the summary prints."""

    total: int = 0
    processed: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    objects: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)
    finished: set[str] = field(default_factory=set)  # keys of the items this run finished
    failures_file: Path | None = None  # failures.jsonl, once written with at least one record


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run stops as on Ctrl-C (finished outputs stay valid, nothing half
    written is left) and the command exits with ``EXIT_TERMINATED`` (143) instead of 130."""


_sigterm_blocks = 0  # stop_on_sigterm blocks now open in the main thread


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, so ``kill``,
    ``docker stop`` and systemd stop a batch command the way Ctrl-C does (Python's default
    would end the process at once, skipping every ``finally``). The previous handler comes back
    afterwards. Outside the main thread (signals go to the main thread only) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _sigterm_blocks
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _sigterm_blocks += 1
    try:
        yield
    finally:
        _sigterm_blocks -= 1
        signal.signal(signal.SIGTERM, previous)


def rearm_sigterm() -> None:
    """Put :func:`stop_on_sigterm`'s handler back after a library replaced it (``ray.init``
    installs one that calls ``sys.exit``), if a ``stop_on_sigterm`` block is active."""
    if _sigterm_blocks and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


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


def collect_items(inputs: Sequence[str], allow_uris: bool = False) -> list[Item]:
    """Expand INPUTs and give each image a collision-free output key (usage errors raise UsageError).
    With ``allow_uris`` (``--ray``), INPUTs may instead all be URIs (see :func:`collect_uri_items`)."""
    from langsam.io import iter_image_files

    if not inputs:
        raise UsageError("no INPUT given: pass image files, folders or glob patterns")
    uris = [entry for entry in inputs if _is_uri(entry)]
    if uris:
        if not allow_uris:
            raise UsageError(f"{uris[0]}: URIs are read on a cluster only: add --ray (and pip install "
                             '"langsam[distributed]"), or copy the images to a local folder')
        if len(uris) != len(inputs):
            raise UsageError("INPUTs mix URIs and local paths: run them separately (their outputs are named "
                             "relative to one common folder)")
        return collect_uri_items(uris)
    try:
        paths = iter_image_files(inputs)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not paths:
        raise UsageError(f"no image files found in {', '.join(inputs)}")
    return [Item(path=path, file_name=file_name, key=key)
            for path, file_name, key in name_local_inputs(paths, reserved=_RESERVED_STEMS)]


def name_local_inputs(paths: list[Path], reserved: Iterable[str] = ()) -> list[tuple[Path, str, str]]:
    """``(path, file_name, key)`` for each input: ``file_name`` is the path relative to the
    inputs' common folder (POSIX), ``key`` its output-folder name, made safe and unique (never
    one of ``reserved``)."""
    from langsam.io import unique_stem

    resolved = [path.resolve() for path in paths]
    try:
        root = Path(os.path.commonpath([str(path.parent) for path in resolved]))
    except ValueError:  # e.g. inputs on different Windows drives
        root = None
    seen = set(reserved)
    named = []
    for path, absolute in zip(paths, resolved):
        try:
            file_name = absolute.relative_to(root).as_posix() if root is not None else path.name
        except ValueError:
            file_name = path.name
        named.append((path, file_name, unique_stem(absolute, seen, root=root)))
    return named


def _is_uri(text: str) -> bool:
    scheme, separator, _ = text.partition("://")
    return bool(separator) and scheme.isalnum() and len(scheme) > 1  # "C://x" is a Windows path


def collect_uri_items(uris: Sequence[str]) -> list[Item]:
    """URIs of files, folders (searched recursively) or glob patterns (``fnmatch`` rules, ``*``
    also crosses ``/``) on any file system pyarrow reads, as :class:`Item` s named like local
    inputs: ``file_name`` relative to their common folder, ``key`` from it."""
    from langsam.io import IMAGE_EXTENSIONS, unique_stem

    try:
        from pyarrow import fs
    except ImportError:
        raise UsageError('URI inputs are read with pyarrow, which is not installed: pip install '
                         '"langsam[distributed]"') from None
    found: dict[str, str] = {}  # URI -> path inside its file system
    for text in uris:
        scheme = text.partition("://")[0]
        try:
            filesystem, path = fs.FileSystem.from_uri(text)
        except (ValueError, OSError) as error:
            raise UsageError(f"{text}: cannot open ({error})") from None

        def listing(folder: str) -> list[str]:
            selector = fs.FileSelector(folder, recursive=True, allow_not_found=True)
            files = [info.path for info in filesystem.get_file_info(selector) if info.type == fs.FileType.File]
            return [f for f in files if posixpath.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in posixpath.relpath(f, folder).split("/"))]

        matches: list[str]
        if set("*?[") & set(path):
            base = path[:min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0]
            matches = [f for f in listing(base or "/") if fnmatch.fnmatchcase(f, path)]
            if not matches:
                raise UsageError(f"{text}: the pattern matches no image files")
        else:
            info = filesystem.get_file_info(path)
            if info.type == fs.FileType.File:
                matches = [path]
            elif info.type == fs.FileType.Directory:
                matches = listing(path)
            else:
                raise UsageError(f"{text}: no such file or folder")
        for match in matches:
            found.setdefault(f"{scheme}://{match}", match)
    if not found:
        raise UsageError(f"no image files found in {', '.join(uris)}")
    ordered = sorted(found)
    root = posixpath.commonpath([posixpath.dirname(found[uri]) or "/" for uri in ordered])
    seen = set(_RESERVED_STEMS)
    items = []
    for uri in ordered:
        relative = posixpath.relpath(found[uri], root)
        parts = relative.split("/")
        stem = "__".join([*parts[:-1], posixpath.splitext(parts[-1])[0]])
        key = unique_stem(Path(stem + ".image"), seen)
        items.append(Item(path=Path(posixpath.basename(found[uri])), file_name=relative, key=key, uri=uri))
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


def encode_image(image: Any, format: str, **options: Any) -> bytes:
    """A PIL image as the bytes of an image file, as ``langsam.io.atomic_save_image`` would write
    it (JPEG without alpha); the workers of a ``--ray`` run send these back to be written."""
    import io

    if format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


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


def report_failure(report: RunReport, bar: Any, item: Item, reason: str, error: str, attempts: int = 1) -> None:
    """Say on stderr, at once, which input failed and why (``error``: the error's class); the
    run goes on, and the failure is kept for the summary and ``failures.jsonl``."""
    prefix = f"{item.source}: "
    if reason.startswith(prefix):  # io's messages already start with the path
        reason = reason[len(prefix):]
    report.failures.append(Failure(item.source, item.key, error, reason, attempts))
    bar.write(f"error: {item.source}: {reason}", file=sys.stderr)


def write_failures(out_dir: Path, command: str, report: RunReport) -> Path | None:
    """Rewrite ``out_dir/failures.jsonl`` atomically: one JSON object per line for each input of
    this run that failed (:meth:`Failure.to_json`), after the records of earlier runs whose
    input this run neither finished nor failed again (an interrupted rerun, other inputs, the
    other command), so a record goes away only when its image is done. No record left: the
    file is removed. Returns its path, or None when there is none."""
    from langsam.io import atomic_write_text, safe_join

    path = safe_join(out_dir, FAILURES_NAME)
    ended = report.finished | {failure.output for failure in report.failures}
    kept = [record for record in _read_failures(path)
            if record.get("command") != command or record.get("output") not in ended]
    records = kept + [failure.to_json(command) for failure in report.failures]
    if not records:
        path.unlink(missing_ok=True)
        return None
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def _read_failures(path: Path) -> list[dict[str, Any]]:
    """The records of an earlier ``failures.jsonl`` (lines that are not records are dropped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("cannot read the earlier %s (%s); it is replaced", path, error)
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str):
            records.append(record)
    return records


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
        lines += [f"  {failure.input}: {failure.message}" for failure in report.failures]
    if report.failures_file is not None:
        lines.append(f"failures: {report.failures_file}")
    print("\n".join(lines))


def read_json(path: Path) -> Any | None:
    """The parsed JSON file, or None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ============================================================================================
# The per-image engine `segment` and `auto-masks` share: locally or on Ray
# ============================================================================================

#: One image's outputs, made anywhere (here or on a Ray worker, so it must pickle):
#: ``render(pipeline, image, file_name, source) -> (document, {file name: encoded bytes})``.
Render = Callable[[Any, Any, str, str], "tuple[dict[str, Any], dict[str, bytes]]"]
#: Writes one image's outputs here, last its document, then counts its objects in the report:
#: ``finish(item, document, files)``.
Finish = Callable[[Item, dict, dict], None]


def process_items(args: argparse.Namespace, todo: Sequence[Item], *, command: str, mode: str, render: Render,
                  finish: Finish, ray_options: dict[str, Any] | None, max_pixels: int | None, report: RunReport,
                  postfix: Callable[[RunReport], dict[str, Any]]) -> None:
    """Run every item of ``todo`` through the ``mode`` pipeline and write its outputs here, under
    a progress bar that starts at ``report.skipped``; SIGTERM stops it as Ctrl-C does.

    Locally the images decode ahead in a thread (:func:`prefetch`, ``--batch-size`` deep) and the
    models load at the first readable image (a run of only broken files loads nothing); with
    ``ray_options`` Ray workers run ``render`` and this process writes (:func:`run_on_ray`). An
    image that fails is reported and the run goes on; ``report.processed`` counts the rest.
    However the run ends (interrupted too), ``failures.jsonl`` under ``--out`` is rewritten
    (:func:`write_failures`).
    """
    # On a cluster Ray Data draws the progress; ours would sit at 0 until the end.
    bar = progress(report.total, report.skipped, command, args.quiet or ray_options is not None)
    with stop_on_sigterm(), closing(bar):
        try:
            if todo:
                _process(args, todo, mode, render, finish, ray_options, max_pixels, report, bar, postfix)
        finally:
            try:  # commands without an output folder (label propose keeps its failures in the project)
                if getattr(args, "out", None) is not None:
                    report.failures_file = write_failures(Path(args.out).resolve(), command, report)
            except (OSError, ValueError) as error:  # a full disk; a failures.jsonl linked outside --out
                print(f"warning: cannot write {FAILURES_NAME}: {error}", file=sys.stderr)


def _process(args, todo, mode, render, finish, ray_options, max_pixels, report, bar, postfix) -> None:
    if ray_options is not None:
        from functools import partial

        from langsam.distributed import PipelineBuilder

        def on_result(item: Item, row: dict[str, Any]) -> None:
            finish(item, json.loads(row["document"]), dict(zip(row["file_names"], row["file_data"])))
            report.processed += 1
            report.finished.add(item.key)

        run_on_ray(ray_options, todo, PipelineBuilder(mode, **model_kwargs_from_args(args)),
                   partial(_render_row, render=render), on_result, report, max_pixels, args.quiet, args.verbose)
        return

    from langsam.io import ImageLoadError, load_image

    pipeline = None

    def load(path: Path):
        return load_image(path, max_pixels=max_pixels)

    for item, future in prefetch(todo, load, depth=args.batch_size):
        try:
            image = future.result()
            if pipeline is None:
                pipeline = load_pipeline(args, mode)
            document, files = render(pipeline, image, item.file_name, item.source)
            finish(item, document, files)
        except ImageLoadError as error:
            report_failure(report, bar, item, load_reason(error), type(error).__name__)
        except (ValueError, RuntimeError, OSError, MemoryError) as error:
            # Unreadable files (permissions, I/O), a model error on this one image, a full disk.
            report_failure(report, bar, item, f"{type(error).__name__}: {error}", type(error).__name__)
        else:
            report.processed += 1
            report.finished.add(item.key)
        bar.set_postfix(**postfix(report), failed=len(report.failures), refresh=False)
        bar.update(1)


def _render_row(pipeline: Any, image: Any, row: dict[str, Any], *, render: Render) -> dict[str, Any]:
    """On a Ray worker: one image's outputs, encoded as a result row (nothing is written there)."""
    document, files = render(pipeline, image, row["file_name"], row["path"])
    return {"document": json.dumps(document, ensure_ascii=False), "file_names": list(files),
            "file_data": list(files.values())}


# ============================================================================================
# --ray: the driver side
# ============================================================================================


class _StderrLines:
    """Where :func:`report_failure` writes during a ``--ray`` run: Ray Data draws the progress."""

    def write(self, text: str, file: Any = None) -> None:
        print(text, file=sys.stderr, flush=True)


def run_on_ray(ray_options: dict[str, Any], todo: Sequence[Item], build: Callable[[], Any],
               process: Callable[..., dict[str, Any]], on_result: Callable[[Item, dict[str, Any]], None],
               report: RunReport, max_pixels: int | None, quiet: bool, verbose: bool) -> None:
    """Run ``process(pipeline, image, row)`` on every item of ``todo`` on a Ray cluster (the
    pipeline built once per worker by ``build``) and hand each finished item's row to
    ``on_result`` here, in this process, which writes the outputs. ``process`` gets rows with
    ``image_id`` (the item's key), ``path`` (its source) and ``file_name``, and returns
    ``{"document": JSON text, "file_names": [...], "file_data": [bytes, ...]}``.

    Failed images are reported as locally and the run goes on. An image whose worker process
    died during it is begun again at most ``ray_options["max_retries"]`` times (default
    :data:`~langsam.distributed.DEFAULT_MAX_RETRIES`), then reported as failed. Each item is
    handed over at most once even if Ray ran its batch twice (a worker died after finishing it). Raises
    :class:`UsageError` when Ray is missing, :class:`ModelLoadError` when the workers cannot
    load the models, :class:`ClusterError` when the cluster cannot be reached or gives up.
    Ctrl-C stops the cluster's work (a cluster this call started is shut down) and propagates.
    """
    try:
        from langsam import distributed

        ray = distributed.require_ray()
    except ImportError as error:
        raise UsageError(str(error)) from None
    import pyarrow as pa

    address = ray_options["address"]
    try:
        started = distributed.connect(address, num_cpus=distributed.local_cpus(
            ray_options["workers"], ray_options["cpus_per_worker"]), verbose=verbose)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {error}") from None
    rearm_sigterm()
    rows = None
    try:
        try:
            resources = distributed.plan_resources(ray_options["workers"], ray_options["gpus_per_worker"],
                                                   ray_options["cpus_per_worker"], ray_options["batch_size"])
        except ValueError as error:
            raise UsageError(str(error)) from None
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not quiet
        by_key = {item.key: item for item in todo}
        inputs = ray.data.from_items([{"image_id": item.key, "path": item.source, "file_name": item.file_name}
                                      for item in todo])
        fields = [("document", pa.string()), ("file_names", pa.list_(pa.string())),
                  ("file_data", pa.list_(pa.binary()))]
        max_retries = ray_options.get("max_retries")
        results = distributed.map_images(inputs, build, process, fields, resources, max_pixels,
                                         distributed.DEFAULT_MAX_RETRIES if max_retries is None else max_retries)
        bar = _StderrLines()
        done: set[str] = set()
        rows = iter(results.iter_rows())
        for row in rows:
            if row["fatal"]:
                raise ModelLoadError(row["fatal"])
            item = by_key.get(row["image_id"])
            if item is None or item.key in done:
                continue
            done.add(item.key)
            if row["error"] is not None:
                reason = row["error"]
                if row["error_kind"] == "image":
                    reason = load_reason(ValueError(reason))
                elif row["error_kind"] == "crash":
                    reason += " (--ray-max-retries N allows more)"
                report_failure(report, bar, item, reason, row["error_type"] or "Error", row["attempts"] or 1)
                continue
            try:
                on_result(item, row)
            except (ValueError, OSError) as error:  # a full disk, a name refused by safe_join
                report_failure(report, bar, item, f"{type(error).__name__}: {error}", type(error).__name__,
                               row["attempts"] or 1)
        for item in todo:
            if item.key not in done:
                report_failure(report, bar, item, "the cluster returned no result for this image", "MissingResult")
    except ray.exceptions.RayError as error:
        raise ClusterError(f"the cluster run failed: {error}\nfinished images are complete on disk; rerun "
                           "with --skip-existing to resume") from None
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops Ray Data's executor (and its workers) when the loop ended early
        if started:
            ray.shutdown()
