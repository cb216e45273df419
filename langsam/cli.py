"""The ``langsam`` command line: ``segment``, ``auto-masks`` and ``demo``.

Everything heavy (torch, the models, tqdm, pycocotools) is imported inside the command
that needs it, so ``langsam --help`` and every usage error answer at once, before any
model loads. Exit status: 0 when every image was processed, 1 when some input failed
(each failure is reported on stderr and the run goes on), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

__all__ = ["add_model_arguments", "build_parser", "main", "model_kwargs_from_args", "validate_model_arguments"]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

SAM_TYPES = ("auto", "vit_b", "vit_l", "vit_h")
MODES = ("grounded", "clip", "hybrid")
SAVE_CHOICES = ("masks", "overlay", "coco", "json")
_DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")

#: argparse ``dest`` of each model option -> the environment variable that sets its default.
#: The demo reads the same names, so one ``export`` configures both.
MODEL_ENVIRONMENT = {
    "sam_type": "LANGSAM_SAM_TYPE",
    "sam_checkpoint": "LANGSAM_SAM_CHECKPOINT",
    "detector": "LANGSAM_DETECTOR",
    "clip_model": "LANGSAM_CLIP_MODEL",
    "clip_pretrained": "LANGSAM_CLIP_PRETRAINED",
    "device": "LANGSAM_DEVICE",
}

# Per-run files at the top of --out; no per-image folder may take these names.
ANNOTATIONS_NAME = "annotations.json"
RECORD_NAME = "result.json"
OVERLAY_NAME = "overlay.jpg"
_RESERVED_STEMS = {ANNOTATIONS_NAME, RECORD_NAME}
#: Version of the per-image record layout; a record of another version is redone on resume.
RECORD_FORMAT = 1


class UsageError(ValueError):
    """A command-line mistake found before any model loads (exit status 2)."""


class ModelLoadError(Exception):
    """A model could not be built or loaded (exit status 1, the run stops)."""


# ============================================================================================
# Shared model options (imported by langsam.demo)
# ============================================================================================


def _env_default(dest: str) -> str | None:
    value = os.environ.get(MODEL_ENVIRONMENT[dest], "").strip()
    return value or None


def add_model_arguments(parser: argparse.ArgumentParser, *, sam: bool = True, detector: bool = True,
                        clip: bool = True) -> argparse._ArgumentGroup:
    """Add the model options shared by ``langsam segment`` and ``langsam demo`` to ``parser``.

    Each option's default comes from the environment variable in :data:`MODEL_ENVIRONMENT`
    (read when this function runs), else from :class:`langsam.LangSAM`'s own default, so
    an unset option is simply not passed on. Call :func:`validate_model_arguments` after
    parsing and :func:`model_kwargs_from_args` to get ``LangSAM(**kwargs)`` keywords.
    """
    group = parser.add_argument_group(
        "model options", "each option also reads the environment variable named in its help"
    )
    if sam:
        group.add_argument("--sam-type", dest="sam_type", metavar="TYPE", default=_env_default("sam_type"),
                           help=f"SAM size: {', '.join(SAM_TYPES)} ('auto' infers it from --sam-checkpoint); "
                                "default vit_b [LANGSAM_SAM_TYPE]")
        group.add_argument("--sam-checkpoint", dest="sam_checkpoint", metavar="PATH",
                           default=_env_default("sam_checkpoint"),
                           help="local SAM checkpoint (official .pth or .safetensors); default: the official "
                                "weights for --sam-type, downloaded once to the cache [LANGSAM_SAM_CHECKPOINT]")
    if detector:
        group.add_argument("--detector", dest="detector", metavar="ID_OR_DIR", default=_env_default("detector"),
                           help="Grounding DINO: a Hugging Face hub id or a save_pretrained folder; default "
                                "IDEA-Research/grounding-dino-tiny [LANGSAM_DETECTOR]")
    if clip:
        group.add_argument("--clip-model", dest="clip_model", metavar="NAME", default=_env_default("clip_model"),
                           help="open_clip architecture for --mode clip/hybrid; default ViT-B-32 [LANGSAM_CLIP_MODEL]")
        group.add_argument("--clip-pretrained", dest="clip_pretrained", metavar="TAG_OR_PATH",
                           default=_env_default("clip_pretrained"),
                           help="open_clip pretrained tag or a local weights file; default laion2b_s34b_b79k "
                                "[LANGSAM_CLIP_PRETRAINED]")
    group.add_argument("--device", dest="device", metavar="DEVICE", default=_env_default("device"),
                       help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu [LANGSAM_DEVICE]")
    return group


def validate_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the model options (also the ones that came from the environment) without loading
    anything; a mistake ends in ``parser.error`` (exit status 2)."""
    sam_type = getattr(args, "sam_type", None)
    if sam_type is not None and sam_type not in SAM_TYPES:
        parser.error(f"unknown SAM type {sam_type!r}; choose one of {', '.join(SAM_TYPES)}")
    checkpoint = getattr(args, "sam_checkpoint", None)
    if checkpoint is not None and not Path(checkpoint).is_file():
        parser.error(f"SAM checkpoint {checkpoint!r} is not a file")
    if sam_type == "auto" and checkpoint is None:
        parser.error("SAM type 'auto' infers the model size from a checkpoint: pass --sam-checkpoint PATH")
    device = getattr(args, "device", None)
    if device is not None and not _DEVICE_PATTERN.match(device):
        parser.error(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")


def model_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``LangSAM(...)`` from parsed model options; unset ones are left out
    so the pipeline's defaults apply."""
    kwargs = {}
    for dest in MODEL_ENVIRONMENT:
        value = getattr(args, dest, None)
        if value is not None:
            kwargs[dest] = value
    return kwargs


# ============================================================================================
# Parser
# ============================================================================================


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def _number(kind: Callable[[str], Any], minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _save_list(text: str) -> frozenset[str]:
    items = {item.strip().lower() for item in text.split(",") if item.strip()}
    if "all" in items:
        return frozenset(SAVE_CHOICES)
    unknown = sorted(items - set(SAVE_CHOICES))
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown output {', '.join(unknown) or '(empty)'}; choose from {','.join(SAVE_CHOICES)} or all"
        )
    return frozenset(items)


SEGMENT_EPILOG = """\
outputs (under --out):
  <image>/mask_NNN_<query>.png  one mask per object (white = object), NNN = object index
  <image>/overlay.jpg       the image with every mask, box and label drawn on it
  <image>/result.json       per-image record: queries, boxes, scores, RLE masks; written
                            last, so it marks the image as done for --skip-existing
  annotations.json          COCO instances file for the whole run (categories = queries,
                            RLE segmentations, bbox, area, score), loadable by pycocotools
  <image> is the image's path relative to the common input folder, made safe
  (a/cat.jpg -> a_cat); equal names in different folders never overwrite each other.

exit status: 0 all images processed, 1 some images failed (reported on stderr, the run
goes on), 2 usage error (nothing was loaded).

examples:
  langsam segment photos/ --text "a dog" --text "a ball" --out results/
  langsam segment 'shots/**/*.jpg' --queries-file queries.txt --out results/ --save masks,coco
  langsam segment cat.jpg --text cat --mode hybrid --box-threshold 0.25 --out results/
  langsam segment photos/ --text person --out results/ --skip-existing   # resume a run
  LANGSAM_DEVICE=cuda langsam segment photos/ --text car --sam-type vit_h --out results/
"""

AUTO_MASKS_EPILOG = """\
outputs (under --out):
  <image>.json        SA-1B style: {"image": {file_name, height, width},
                      "annotations": [{id, segmentation (COCO RLE), bbox (xywh), area,
                      predicted_iou, stability_score, point_coords, crop_box}]};
                      written last, so it marks the image as done for --skip-existing
  <image>_masks/NNN.png  with --png: one mask per annotation (NNN = its id), plus
                      <image>_masks/overlay.jpg

Mask-generator options left unset keep SamAutomaticMaskGenerator's defaults.
exit status: 0 all images processed, 1 some images failed, 2 usage error.

examples:
  langsam auto-masks photos/ --out masks/
  langsam auto-masks img.jpg --out masks/ --checkpoint sam_vit_h_4b8939.pth --png
  langsam auto-masks photos/ --out masks/ --points-per-side 16 --pred-iou-thresh 0.9 --crop-n-layers 1
"""

# (flag, type, help) for every SamAutomaticMaskGenerator parameter the command exposes.
AMG_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("points_per_side", _number(int, 1), "points sampled along one side of the image (default 32)"),
    ("points_per_batch", _number(int, 1), "points run through the model at once; more is faster, needs more memory "
                                          "(default 64)"),
    ("pred_iou_thresh", _number(float, 0.0), "keep masks whose predicted IoU is above this (default 0.88)"),
    ("stability_score_thresh", _number(float, 0.0), "keep masks whose stability score is above this (default 0.95)"),
    ("stability_score_offset", _number(float, 0.0), "logit offset used for the stability score (default 1.0)"),
    ("box_nms_thresh", _fraction, "box IoU above which duplicate masks are removed (default 0.7)"),
    ("crop_n_layers", _number(int, 0), "extra layers of image crops to run on (default 0)"),
    ("crop_nms_thresh", _fraction, "box IoU for removing duplicates between crops (default 0.7)"),
    ("crop_overlap_ratio", _fraction, "overlap of neighbouring crops, as a fraction of the crop (default 512/1500)"),
    ("crop_n_points_downscale_factor", _number(int, 1),
     "points per side are divided by this in each crop layer (default 1)"),
    ("min_mask_region_area", _number(int, 0), "remove holes and islands smaller than this many pixels (default 0)"),
)


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, folders (searched recursively) or glob patterns (quote them)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip images already finished in --out (resume an interrupted run)")
    parser.add_argument("--max-pixels", type=_number(int, 0), default=None, metavar="N",
                        help="refuse images larger than N pixels (default 100000000; 0 = no limit)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what the models are doing")


def build_parser() -> argparse.ArgumentParser:
    """The ``langsam`` argument parser (subcommands ``segment``, ``auto-masks``, ``demo``)."""
    from langsam import __version__

    parser = argparse.ArgumentParser(
        prog="langsam",
        description="Text-prompted segmentation: Grounding DINO finds what the text names, "
                    "Segment Anything outlines it, CLIP can rank it.",
        epilog="run 'langsam COMMAND --help' for the options of each command",
    )
    parser.add_argument("--version", action="version", version=f"langsam {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    segment = commands.add_parser(
        "segment", help="segment what text queries name in many images",
        description="Segment every object the text queries name in each input image; write masks,\n"
                    "overlays, per-image JSON and one COCO annotations file.",
        epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_arguments(segment)
    queries = segment.add_argument_group("queries")
    queries.add_argument("--text", "-t", action="append", default=[], metavar="QUERY",
                         help="what to find, e.g. 'a dog'; repeat for several queries (one detector pass for all)")
    queries.add_argument("--queries-file", metavar="FILE",
                         help="a UTF-8 text file with one query per line (blank lines and lines starting "
                              "with # are ignored)")
    settings = segment.add_argument_group("detection")
    settings.add_argument("--mode", choices=MODES, default="grounded",
                          help="grounded: Grounding DINO boxes -> SAM; clip: SAM auto masks ranked by CLIP; "
                               "hybrid: grounded, re-scored by CLIP (default grounded)")
    settings.add_argument("--box-threshold", type=_fraction, default=None, metavar="P",
                          help="minimum detector box score (default 0.3)")
    settings.add_argument("--text-threshold", type=_fraction, default=None, metavar="P",
                          help="minimum detector text-token score (default 0.25)")
    settings.add_argument("--clip-threshold", type=_fraction, default=None, metavar="P",
                          help="minimum CLIP probability in clip/hybrid mode (default: the pipeline's)")
    settings.add_argument("--top-k", type=_number(int, 1), default=None, metavar="K",
                          help="keep at most K objects per image, best first (default: all)")
    add_model_arguments(segment)
    run = segment.add_argument_group("run")
    run.add_argument("--save", type=_save_list, default=frozenset(SAVE_CHOICES), metavar="LIST",
                     help="comma-separated outputs: masks, overlay, coco, json, or all (default all). "
                          "The per-image result.json is always written: it marks the image as done")
    run.add_argument("--batch-size", type=_number(int, 1), default=1, metavar="N",
                     help="images decoded ahead in a background thread while the models run (default 1)")
    segment.set_defaults(handler=_run_segment, parser=segment)

    auto = commands.add_parser(
        "auto-masks", help="SAM automatic masks (everything, no text) in SA-1B JSON",
        description="Run SamAutomaticMaskGenerator on each image and write SA-1B style JSON.",
        epilog=AUTO_MASKS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_arguments(auto)
    model = auto.add_argument_group("model options")
    model.add_argument("--model-type", "--sam-type", dest="sam_type", metavar="TYPE", default=_env_default("sam_type"),
                       help=f"SAM size: {', '.join(SAM_TYPES)}; default auto with --checkpoint, else vit_b "
                            "[LANGSAM_SAM_TYPE]")
    model.add_argument("--checkpoint", "--sam-checkpoint", dest="sam_checkpoint", metavar="PATH",
                       default=_env_default("sam_checkpoint"),
                       help="local SAM checkpoint; default: the official weights for --model-type "
                            "[LANGSAM_SAM_CHECKPOINT]")
    model.add_argument("--device", dest="device", metavar="DEVICE", default=_env_default("device"),
                       help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu [LANGSAM_DEVICE]")
    amg = auto.add_argument_group("mask generator (SamAutomaticMaskGenerator parameters)")
    for name, kind, text in AMG_OPTIONS:
        amg.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, metavar="X", help=text)
    auto.add_argument("--png", action="store_true", help="also write one PNG per mask and an overlay per image")
    auto.set_defaults(handler=_run_auto_masks, parser=auto)

    # The demo parses its own options (langsam.demo.main); this entry only shows up in --help.
    commands.add_parser("demo", help="start the Gradio demo (see 'langsam demo --help')", add_help=False)
    return parser


# ============================================================================================
# Entry point
# ============================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``langsam`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _run_demo(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return _exit_code(exit_)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except SystemExit as exit_:  # parser.error() from a late check, still before any model loads
        return _exit_code(exit_)
    except UsageError as error:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ModelLoadError as error:
        print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt:
        print("\ninterrupted; finished images are complete on disk, rerun with --skip-existing to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _exit_code(exit_: SystemExit) -> int:
    if exit_.code is None:
        return EXIT_OK
    return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


def _run_demo(argv: list[str]) -> int:
    try:
        from langsam.demo import main as demo_main
    except ImportError as error:
        print(f"langsam demo: error: the demo needs gradio ({error}); install it with: pip install 'langsam[demo]'",
              file=sys.stderr)
        return EXIT_FAILURES
    try:
        status = demo_main(argv)
    except SystemExit as exit_:  # the demo's own --help and usage errors
        return _exit_code(exit_)
    return EXIT_OK if status is None else int(status)


# ============================================================================================
# Inputs, names, progress
# ============================================================================================


@dataclass
class _Item:
    """One input image and where its outputs go."""

    path: Path
    file_name: str  # relative to the common input folder, POSIX separators (COCO file_name)
    key: str  # safe single path component naming its outputs under --out


@dataclass
class _RunReport:
    """Counts the summary prints."""

    total: int = 0
    processed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    objects: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)


def _collect_items(inputs: Sequence[str]) -> list[_Item]:
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
        items.append(_Item(path=path, file_name=file_name, key=unique_stem(absolute, seen, root=root)))
    return items


def _prepare_out(out: str) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --out {out!r}: {error.strerror or error}") from None
    return out_dir.resolve()


def _set_pixel_limit(max_pixels: int | None) -> int | None:
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


def _load_reason(error: Exception) -> str:
    message = str(error)
    if "pixels" in message and ("limit" in message or "too large" in message):
        message += "; raise the limit with --max-pixels N (0 = no limit)"
    return message


def _prefetch(items: Sequence[_Item], load: Callable[[Path], Any], depth: int) -> Iterator[tuple[_Item, Future]]:
    """Yield ``(item, future image)`` in order while up to ``depth`` later images decode in a thread,
    so decoding overlaps the model. Each image is decoded exactly once."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="langsam-load") as pool:
        pending: list[tuple[_Item, Future]] = []
        for item in items:
            pending.append((item, pool.submit(load, item.path)))
            if len(pending) > depth:
                yield pending.pop(0)
        while pending:
            yield pending.pop(0)


def _progress(total: int, initial: int, description: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="img", disable=quiet,
                dynamic_ncols=True, file=sys.stderr)


def _report_failure(report: _RunReport, bar: Any, path: Path, reason: str) -> None:
    """Say on stderr, at once, which input failed and why; the run goes on."""
    prefix = f"{path}: "
    if reason.startswith(prefix):  # io's messages already start with the path
        reason = reason[len(prefix):]
    report.failures.append((str(path), reason))
    bar.write(f"error: {path}: {reason}", file=sys.stderr)


def _print_summary(command: str, report: _RunReport, extra_lines: Sequence[str] = ()) -> None:
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


def _read_json(path: Path) -> Any | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ============================================================================================
# langsam segment
# ============================================================================================


def _collect_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.text)
    if args.queries_file is not None:
        try:
            lines = Path(args.queries_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --queries-file {args.queries_file!r}: {error}") from None
        queries += [line for line in lines if not line.strip().startswith("#")]
    from langsam.detector import parse_queries

    if not any(query.strip(" .") for query in queries):
        raise UsageError("no queries: pass --text 'a dog' (repeatable) or --queries-file FILE")
    # The pipeline labels objects with its own normalisation of the queries (spaces collapsed,
    # outer dots stripped, case-insensitive duplicates dropped); categories must use the same.
    return parse_queries(queries)


def _segment_settings(args: argparse.Namespace, queries: list[str]) -> dict[str, Any]:
    """What decides an image's objects; a finished image is reused only if these match."""
    return {
        "queries": queries,
        "mode": args.mode,
        "box_threshold": args.box_threshold,
        "text_threshold": args.text_threshold,
        "clip_threshold": args.clip_threshold,
        "top_k": args.top_k,
        "models": {key: value for key, value in model_kwargs_from_args(args).items() if key != "device"},
        "outputs": sorted(args.save),
    }


def _segment_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"mode": args.mode}
    for name in ("box_threshold", "text_threshold", "clip_threshold", "top_k"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def _finished_record(record_path: Path, item: _Item, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an image finished earlier with the same settings, else None (redo it)."""
    record = _read_json(record_path)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or record.get("settings") != settings:
        return None
    if not isinstance(record.get("image"), dict) or record["image"].get("file_name") != item.file_name:
        return None  # the folder belongs to another input that mapped to the same name
    return record


def _run_segment(args: argparse.Namespace) -> int:
    parser = args.parser
    queries = _collect_queries(args)
    validate_model_arguments(parser, args)
    items = _collect_items(args.inputs)
    out_dir = _prepare_out(args.out)
    max_pixels = _set_pixel_limit(args.max_pixels)
    settings = _segment_settings(args, queries)
    category_ids = {query: index for index, query in enumerate(queries, start=1)}

    from langsam.io import safe_join

    report = _RunReport(total=len(items))
    records: dict[str, dict[str, Any]] = {}
    todo: list[_Item] = []
    for item in items:
        record = None
        if args.skip_existing:
            record = _finished_record(safe_join(out_dir, item.key, RECORD_NAME), item, settings)
        if record is None:
            todo.append(item)
        else:
            records[item.key] = record
            report.skipped += 1
            report.objects.update(obj["label"] for obj in record["objects"])

    bar = _progress(len(items), report.skipped, "segment", args.quiet)
    try:
        if todo:
            _segment_images(args, todo, queries, settings, category_ids, out_dir, max_pixels, records, report, bar)
    finally:
        bar.close()

    annotations_path = None
    if "coco" in args.save:
        coco = _build_coco(items, records, queries, category_ids)
        annotations_path = safe_join(out_dir, ANNOTATIONS_NAME)
        from langsam.io import atomic_write_json

        atomic_write_json(annotations_path, coco, indent=None)
    if not args.quiet:
        lines = ["objects per query:"] + [f"  {query}: {report.objects[query]}" for query in queries]
        if annotations_path is not None:
            lines.append(f"COCO annotations: {annotations_path}")
        _print_summary("segment", report, lines)
    return EXIT_FAILURES if report.failures else EXIT_OK


def _load_pipeline(args: argparse.Namespace, mode: str) -> Any:
    """Build ``LangSAM`` and load every model the run needs now, so a missing or broken model
    stops the run once, with one clear message, instead of failing image after image."""
    from langsam.pipeline import LangSAM

    try:
        pipeline = LangSAM(**model_kwargs_from_args(args))
        pipeline.predictor
        if mode in ("grounded", "hybrid"):
            pipeline.detector.load()
        if mode in ("clip", "hybrid"):
            pipeline.clip_scorer
    except (ValueError, RuntimeError, OSError, ImportError) as error:
        raise ModelLoadError(f"cannot load the models: {error}") from error
    return pipeline


def _segment_images(args, todo, queries, settings, category_ids, out_dir, max_pixels, records, report, bar) -> None:
    from langsam.io import ImageLoadError, load_image

    segment_kwargs = _segment_kwargs(args)
    pipeline = None  # loaded at the first readable image: a run of only broken files loads nothing

    def load(path: Path):
        return load_image(path, max_pixels=max_pixels)

    for item, future in _prefetch(todo, load, depth=args.batch_size):
        try:
            image = future.result()
            if pipeline is None:
                pipeline = _load_pipeline(args, args.mode)
            result = pipeline.segment(image, queries, **segment_kwargs)
            record = _write_segment_outputs(item, image, result, settings, category_ids, out_dir, args.save)
        except ImageLoadError as error:
            _report_failure(report, bar, item.path, _load_reason(error))
        except (ValueError, RuntimeError, OSError, MemoryError) as error:
            # Unreadable files (permissions, I/O), a model error on this one image, a full disk.
            _report_failure(report, bar, item.path, f"{type(error).__name__}: {error}")
        else:
            records[item.key] = record
            report.processed += 1
            report.objects.update(obj["label"] for obj in record["objects"])
        bar.set_postfix(objects=sum(report.objects.values()), failed=len(report.failures), refresh=False)
        bar.update(1)


def _write_segment_outputs(item: _Item, image, result, settings, category_ids, out_dir: Path,
                           save: frozenset[str]) -> dict[str, Any]:
    """Write one image's masks, overlay and (last) its record; returns the record."""
    import numpy as np
    from PIL import Image

    from langsam.io import atomic_save_image, atomic_write_json, safe_join, sanitize_name

    folder = safe_join(out_dir, item.key)
    record_path = safe_join(folder, RECORD_NAME)
    previous = _read_json(record_path)
    # Until the new record exists the image counts as unfinished, even if the run stops midway.
    record_path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)

    annotations = result.to_coco(image_id=0, category_ids=category_ids) if len(result) else []
    objects = []
    written: set[str] = set()
    for index in range(len(result)):
        label = result.labels[index]
        mask_file = None
        if "masks" in save:
            mask_file = f"mask_{index:03d}_{sanitize_name(label, max_len=60)}.png"
            mask = np.asarray(result.masks[index], dtype=bool)
            atomic_save_image(safe_join(folder, mask_file), Image.fromarray(mask.astype(np.uint8) * 255))
            written.add(mask_file)
        annotation = annotations[index]
        objects.append({
            "index": index,
            "label": label,
            "score": float(result.scores[index]),
            "mask_score": float(result.mask_scores[index]),
            "clip_score": None if result.clip_scores is None else float(result.clip_scores[index]),
            "box_xyxy": [float(v) for v in result.boxes[index]],
            "bbox": [float(v) for v in annotation["bbox"]],
            "area": float(annotation["area"]),
            "segmentation": annotation["segmentation"],
            "mask_file": mask_file,
        })
    if "overlay" in save:
        atomic_save_image(safe_join(folder, OVERLAY_NAME), result.overlay(image), quality=90)
        written.add(OVERLAY_NAME)
    _remove_stale(folder, previous, written)

    height, width = image.shape[:2]
    record = {
        "format": RECORD_FORMAT,
        "image": {"file_name": item.file_name, "path": str(item.path), "height": int(height), "width": int(width)},
        "settings": settings,
        "objects": objects,
    }
    # Written whatever --save says, and last: it marks the image as done for --skip-existing.
    atomic_write_json(record_path, record)
    return record


def _remove_stale(folder: Path, previous: Any, written: set[str]) -> None:
    """Delete files an earlier run of this image wrote (per its record) that this run did not."""
    from langsam.io import safe_join

    if not isinstance(previous, dict):
        return
    old_files = [obj.get("mask_file") for obj in previous.get("objects", []) if isinstance(obj, dict)]
    old_files.append(OVERLAY_NAME)
    for name in old_files:
        if isinstance(name, str) and name not in written:
            try:
                safe_join(folder, name).unlink(missing_ok=True)
            except (ValueError, OSError):
                pass


def _build_coco(items: list[_Item], records: dict[str, dict[str, Any]], queries: list[str],
                category_ids: dict[str, int]) -> dict[str, Any]:
    """One COCO instances file for every finished image of the run (fresh or resumed)."""
    images, annotations = [], []
    for image_id, item in enumerate((item for item in items if item.key in records), start=1):
        record = records[item.key]
        info = record["image"]
        images.append({"id": image_id, "file_name": info["file_name"], "height": info["height"],
                       "width": info["width"], "langsam_output": item.key})
        for obj in record["objects"]:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids[obj["label"]],
                "segmentation": obj["segmentation"],
                "bbox": obj["bbox"],
                "area": obj["area"],
                "score": obj["score"],
                "iscrowd": 0,
            })
    return {
        "info": {"description": "langsam segment", "queries": queries},
        "images": images,
        "categories": [{"id": category_ids[query], "name": query, "supercategory": "query"} for query in queries],
        "annotations": annotations,
    }


# ============================================================================================
# langsam auto-masks
# ============================================================================================


def _run_auto_masks(args: argparse.Namespace) -> int:
    parser = args.parser
    if args.sam_type is None:
        args.sam_type = "auto" if args.sam_checkpoint is not None else "vit_b"
    validate_model_arguments(parser, args)
    items = _collect_items(args.inputs)
    out_dir = _prepare_out(args.out)
    max_pixels = _set_pixel_limit(args.max_pixels)
    amg_params = {name: getattr(args, name) for name, _, _ in AMG_OPTIONS if getattr(args, name) is not None}

    from langsam.io import safe_join

    report = _RunReport(total=len(items))
    todo = []
    for item in items:
        done = _read_json(safe_join(out_dir, item.key + ".json")) if args.skip_existing else None
        if isinstance(done, dict) and isinstance(done.get("annotations"), list):
            report.skipped += 1
            report.objects["masks"] += len(done["annotations"])
        else:
            todo.append(item)

    bar = _progress(len(items), report.skipped, "auto-masks", args.quiet)
    try:
        if todo:
            _auto_mask_images(args, todo, amg_params, out_dir, max_pixels, report, bar)
    finally:
        bar.close()
    if not args.quiet:
        _print_summary("auto-masks", report, [f"masks: {report.objects['masks']}"])
    return EXIT_FAILURES if report.failures else EXIT_OK


def _auto_mask_images(args, todo, amg_params, out_dir, max_pixels, report, bar) -> None:
    from langsam.io import ImageLoadError, load_image

    pipeline = None  # loaded at the first readable image

    def load(path: Path):
        return load_image(path, max_pixels=max_pixels)

    for item, future in _prefetch(todo, load, depth=1):
        try:
            image = future.result()
            if pipeline is None:
                pipeline = _load_pipeline(args, "auto-masks")
            # coco_rle: masks leave the generator already compressed, as SA-1B stores them.
            masks = pipeline.auto_masks(image, output_mode="coco_rle", **amg_params)
            count = _write_auto_mask_outputs(item, image, masks, out_dir, args.png)
        except ImageLoadError as error:
            _report_failure(report, bar, item.path, _load_reason(error))
        except (ValueError, RuntimeError, OSError, MemoryError) as error:
            _report_failure(report, bar, item.path, f"{type(error).__name__}: {error}")
        else:
            report.processed += 1
            report.objects["masks"] += count
        bar.set_postfix(masks=report.objects["masks"], failed=len(report.failures), refresh=False)
        bar.update(1)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> JSON types."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _write_auto_mask_outputs(item: _Item, image, masks: list[dict[str, Any]], out_dir: Path, png: bool) -> int:
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from langsam.io import atomic_save_image, atomic_write_json, safe_join

    json_path = safe_join(out_dir, item.key + ".json")
    json_path.unlink(missing_ok=True)  # unfinished until rewritten
    height, width = image.shape[:2]
    annotations = []
    for index, mask in enumerate(masks, start=1):
        rle = mask["segmentation"]
        counts = rle["counts"]
        annotations.append({
            "id": index,
            "segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "bbox": _plain(mask["bbox"]),
            "area": int(mask["area"]),
            "predicted_iou": float(mask["predicted_iou"]),
            "stability_score": float(mask["stability_score"]),
            "point_coords": _plain(mask["point_coords"]),
            "crop_box": _plain(mask["crop_box"]),
        })
    if png:
        # "<key>_masks" can never equal another image's "<key>.json" (or its folder).
        folder = safe_join(out_dir, item.key + "_masks")
        folder.mkdir(parents=True, exist_ok=True)
        binary = [mask_utils.decode({"size": a["segmentation"]["size"],
                                     "counts": a["segmentation"]["counts"].encode("ascii")}).astype(bool)
                  for a in annotations]
        written = set()
        for annotation, mask in zip(annotations, binary):
            name = f"{annotation['id']:03d}.png"
            atomic_save_image(safe_join(folder, name), Image.fromarray(mask.astype(np.uint8) * 255))
            written.add(name)
        atomic_save_image(safe_join(folder, OVERLAY_NAME), _auto_overlay(image, binary), quality=90)
        for stale in folder.glob("*.png"):  # masks of an earlier run of this image that had more
            if re.fullmatch(r"\d{3,}\.png", stale.name) and stale.name not in written:
                stale.unlink(missing_ok=True)
    atomic_write_json(json_path, {
        "image": {"image_id": 1, "file_name": item.file_name, "height": int(height), "width": int(width)},
        "annotations": annotations,
    }, indent=None)
    return len(annotations)


def _auto_overlay(image, masks: list) -> Any:
    """Every mask in its own colour at half opacity (colours fixed by mask order, seed 0)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.utils import draw_segmentation_masks

    if not masks:
        return Image.fromarray(image)
    rng = np.random.default_rng(0)
    colours = [tuple(int(c) for c in rng.integers(40, 256, size=3)) for _ in masks]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    drawn = draw_segmentation_masks(canvas, torch.from_numpy(np.stack(masks)), alpha=0.5, colors=colours)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())
