"""``langsam track``: follow what text queries name through videos, with stable object ids.

Per video: ``tracks.json`` (YouTube-VIS layout; written last: it marks the video as done for
``--skip-existing``), an overlay MP4 and, optionally, one id-map PNG per frame. A video that
breaks part-way (cut short, a damaged frame) gets the outputs of the frames before the break
and counts as failed (its JSON says ``info.damaged``, so ``--skip-existing`` retries it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from langsam.cli.batch import name_local_inputs, read_json, stop_on_sigterm
from langsam.cli.options import (
    EXIT_FAILURES,
    EXIT_OK,
    ModelLoadError,
    UsageError,
    add_model_arguments,
    fraction,
    load_pipeline,
    model_kwargs_from_args,
    number,
    output_list,
    validate_model_arguments,
)

NAME = "track"
SAVE_CHOICES = ("json", "overlay", "masks")
DEFAULT_SAVE = frozenset({"json", "overlay"})
#: File suffixes (lower case) picked up as videos when walking folders.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"})
#: A folder holding files with these suffixes directly is one video, its frames in name order.
FRAME_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
#: Default ``--max-side``: 4K video is accepted, anything larger must be asked for.
DEFAULT_MAX_SIDE = 4096
_GLOB_CHARS = set("*?[")

EPILOG = """\
inputs: video files (.mp4, .mov, .mkv, .avi, .webm, ... decoded frame by frame with PyAV),
  folders of JPEG/PNG frames (one video, frames in name order), or folders searched
  recursively for both; quote glob patterns.

outputs (under --out, one folder per video):
  <video>/tracks.json     YouTube-VIS style: videos, categories (= queries) and one annotation
                          per object id with per-frame COCO RLE segmentations, bboxes, areas,
                          presence, its label and score; written last, so it marks the video
                          as done for --skip-existing
  <video>/overlay.mp4     the video with each object tinted in its id's colour, box and
                          "id label" drawn (H.264)
  <video>/masks/NNNNNN.png  one id map per frame (pixel = object id, 0 = background; DAVIS
                          style palette PNG), with --save masks
  <video> is the video's path relative to the common input folder, made safe.

tracking: Grounding DINO (--model sam3: SAM 3, tracked by SAM 3's own video tracker from the
same --sam3-checkpoint) runs on frame 0 and every --detect-every frames; a detection that
overlaps no visible object (box IoU and box-prompted mask IoU < --new-object-iou) starts a
new object with a new id and its query as label; other detections keep their object's id;
an object absent for more than --max-lost-frames frames ends.

exit status: 0 all videos processed, 1 some videos failed (reported on stderr with the
path and reason; the rest go on), 2 usage error (nothing was loaded).

examples:
  langsam track video.mp4 --text "a car" --out results/
  langsam track clips/ --text "a person" --text "a dog" --detect-every 5 --out results/
  langsam track frames_dir/ --text car --save json,overlay,masks --out results/
  langsam track clips/ --text car --out results/ --skip-existing      # resume a run
  langsam track video.mp4 --text "a car" --model sam3 --sam3-checkpoint sam3.pt --out results/
"""


@dataclass
class VideoItem:
    """One input video (a file or a folder of frames) and where its outputs go."""

    path: Path
    file_name: str  # relative to the common input folder, POSIX separators
    key: str  # safe single path component naming its outputs under --out


@dataclass
class TrackReport:
    total: int = 0
    processed: int = 0
    skipped: int = 0
    frames: int = 0
    objects: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam track`` and its options."""
    from langsam.video import DEFAULT_DETECT_EVERY, DEFAULT_MAX_LOST_FRAMES, DEFAULT_NEW_OBJECT_IOU

    parser = commands.add_parser(
        NAME, help="track what text queries name through videos, with stable ids",
        description="Find what the text queries name in each video (Grounding DINO every N frames) and\n"
                    "track every object with SAM 2.1's video predictor; write per-video JSON, an overlay\n"
                    "video and optional per-frame mask PNGs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="video files, folders of frames, folders to search, or glob patterns (quote them)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip videos already finished in --out with the same settings (resume a run)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what the models are doing")
    queries = parser.add_argument_group("queries")
    queries.add_argument("--text", "-t", action="append", default=[], metavar="QUERY",
                         help="what to track, e.g. 'a car'; repeat for several queries (one detector pass for all)")
    tracking = parser.add_argument_group("tracking")
    tracking.add_argument("--detect-every", type=number(int, 1), default=DEFAULT_DETECT_EVERY, metavar="N",
                          help=f"run the detector on frame 0 and every N frames (default {DEFAULT_DETECT_EVERY})")
    tracking.add_argument("--box-threshold", type=fraction, default=None, metavar="P",
                          help="minimum detector box score (default 0.3; with --model sam3 SAM 3's score, default 0.5)")
    tracking.add_argument("--text-threshold", type=fraction, default=0.25, metavar="P",
                          help="minimum detector text-token score (default 0.25)")
    tracking.add_argument("--new-object-iou", type=fraction, default=DEFAULT_NEW_OBJECT_IOU, metavar="P",
                          help="a detection whose box IoU with every visible object's box, and whose SAM mask's IoU "
                               "with every visible mask, are below this starts a new object (default "
                               f"{DEFAULT_NEW_OBJECT_IOU})")
    tracking.add_argument("--max-lost-frames", type=number(int, 0), default=DEFAULT_MAX_LOST_FRAMES, metavar="N",
                          help=f"an object absent on more than N consecutive frames ends (default "
                               f"{DEFAULT_MAX_LOST_FRAMES})")
    tracking.add_argument("--sam3-association", action="store_true",
                          help="with --model sam3: SAM 3's own video inference (detection on every frame, its "
                               "hot-start and keep-alive rules) instead of the rules above; --detect-every, "
                               "--text-threshold, --new-object-iou and --max-lost-frames then do not apply")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-frames", type=number(int, 0), default=0, metavar="N",
                        help="refuse videos with more than N frames (default 0 = no limit; memory does not grow "
                             "with length)")
    limits.add_argument("--max-side", type=number(int, 0), default=DEFAULT_MAX_SIDE, metavar="N",
                        help=f"refuse videos whose longer side is over N pixels (default {DEFAULT_MAX_SIDE}; "
                             f"0 = no limit)")
    add_model_arguments(parser, clip=False)  # --model sam3: SAM 3 finds and SAM 3's video tracker tracks
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--save", type=output_list(SAVE_CHOICES), default=DEFAULT_SAVE, metavar="LIST",
                           help="comma-separated outputs: json, overlay, masks, or all (default json,overlay). "
                                "tracks.json is always written: it marks the video as done")
    parser.set_defaults(handler=run, parser=parser)
    return parser


# ============================================================================================
# Inputs
# ============================================================================================


def collect_videos(inputs: Sequence[str]) -> list[VideoItem]:
    """Expand INPUTs into videos with collision-free output keys (UsageError for missing ones)."""
    if not inputs:
        raise UsageError("no INPUT given: pass video files, folders of frames or folders of videos")
    found: dict[Path, Path] = {}
    for entry in inputs:
        text = os.fspath(entry)
        path = Path(text)
        if path.is_file():
            found.setdefault(path.resolve(), path)
        elif path.is_dir():
            videos = _videos_in_folder(path)
            if not videos:
                raise UsageError(f"{text}: the folder holds no video files and no JPEG/PNG frames")
            for video in videos:
                found.setdefault(video.resolve(), video)
        elif _GLOB_CHARS & set(text):
            import glob

            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            matches = [m for m in matches if (m.is_file() and m.suffix.lower() in VIDEO_EXTENSIONS)
                       or (m.is_dir() and _is_frame_folder(m))]
            if not matches:
                raise UsageError(f"{text}: the pattern matches no video files or frame folders")
            for match in matches:
                found.setdefault(match.resolve(), match)
        else:
            raise UsageError(f"{text}: no such file or folder")
    paths = sorted(found.values(), key=lambda p: str(p))
    return [VideoItem(path=path, file_name=file_name, key=key) for path, file_name, key in name_local_inputs(paths)]


def _is_frame_folder(folder: Path) -> bool:
    return any(child.is_file() and child.suffix.lower() in FRAME_EXTENSIONS and not child.name.startswith(".")
               for child in folder.iterdir())


def _videos_in_folder(folder: Path) -> list[Path]:
    """The folder itself if it holds frames, else the video files and frame folders under it."""
    if _is_frame_folder(folder):
        return [folder]
    videos = []
    for child in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in child.relative_to(folder).parts):
            continue
        if child.is_file() and child.suffix.lower() in VIDEO_EXTENSIONS:
            videos.append(child)
        elif child.is_dir() and _is_frame_folder(child):
            videos.append(child)
    return videos


# ============================================================================================
# The run
# ============================================================================================


def run(args: argparse.Namespace) -> int:
    """Run ``langsam track`` with parsed ``args``; returns the exit status."""
    parser = args.parser
    from langsam.detector import parse_queries

    if not any(query.strip(" .") for query in args.text):
        raise UsageError("no queries: pass --text 'a car' (repeatable)")
    queries = parse_queries(args.text)
    validate_model_arguments(parser, args)
    sam3 = getattr(args, "model", None) == "sam3"
    if args.sam3_association and not sam3:
        raise UsageError("--sam3-association is SAM 3's own video inference: add --model sam3")
    if args.box_threshold is None:
        from langsam.video.sam3 import DEFAULT_SAM3_THRESHOLD

        args.box_threshold = DEFAULT_SAM3_THRESHOLD if sam3 else 0.3
    if args.sam_type not in (None, "auto") and not sam3:
        from sam.build import model_family

        if model_family(args.sam_type) != "sam2":
            raise UsageError(f"--sam-type {args.sam_type}: video tracking needs a SAM 2 / 2.1 model "
                             "(e.g. sam2.1_hiera_small)")
    items = collect_videos(args.inputs)
    from langsam.cli.batch import prepare_out
    from langsam.io import safe_join

    out_dir = prepare_out(args.out)
    settings = _settings(args, queries)
    report = TrackReport(total=len(items))
    todo = []
    for item in items:
        if args.skip_existing and _finished(safe_join(out_dir, item.key, _json_name()), item, settings):
            report.skipped += 1
        else:
            todo.append(item)
    models: dict[str, Any] = {}  # the pipeline, loaded at the first readable video (none for only broken files)
    with stop_on_sigterm():  # SIGTERM stops the run as Ctrl-C does (exit 143, see langsam.cli.batch)
        for item in todo:
            try:
                _track_one(args, item, queries, settings, out_dir, models, report)
            except ModelLoadError:
                raise
            except (ValueError, RuntimeError, OSError, MemoryError) as error:
                _report_failure(report, item.path, error)
            else:
                report.processed += 1
    if not args.quiet:
        _print_summary(report)
    return EXIT_FAILURES if report.failures else EXIT_OK


def _json_name() -> str:
    from langsam.video import JSON_NAME

    return JSON_NAME


def _settings(args: argparse.Namespace, queries: list[str]) -> dict[str, Any]:
    """What decides a video's outputs; a finished video is reused only if these match."""
    return {
        "queries": queries,
        "detect_every": args.detect_every,
        "box_threshold": args.box_threshold,
        "text_threshold": args.text_threshold,
        "new_object_iou": args.new_object_iou,
        "max_lost_frames": args.max_lost_frames,
        **({"association": "sam3"} if args.sam3_association else {}),
        "models": {key: value for key, value in model_kwargs_from_args(args).items() if key != "device"},
        "outputs": sorted(args.save | {"json"}),
    }


def _finished(json_path: Path, item: VideoItem, settings: dict[str, Any]) -> bool:
    from langsam.video import JSON_FORMAT

    record = read_json(json_path)
    if not isinstance(record, dict) or not isinstance(record.get("info"), dict):
        return False
    info = record["info"]
    videos = record.get("videos")
    return (info.get("format") == JSON_FORMAT and info.get("run") == settings and "damaged" not in info
            and isinstance(videos, list) and len(videos) == 1 and videos[0].get("file_name") == item.file_name)


def _track_one(args, item: VideoItem, queries, settings, out_dir: Path, models: dict[str, Any],
               report: TrackReport) -> None:
    """Track one video and write its outputs (``models["pipeline"]`` is loaded on first use)."""
    from tqdm import tqdm

    from langsam.io import safe_join
    from langsam.video import JSON_NAME, MASKS_DIR, OVERLAY_NAME, open_video, track_video

    name = str(item.path)
    frames = open_video(item.path, max_frames=args.max_frames or None, max_side=args.max_side or None, name=name)
    try:
        sam3 = getattr(args, "model", None) == "sam3"
        if "pipeline" not in models:
            models["pipeline"] = load_pipeline(args, "grounded")
            if sam3:
                try:  # SAM 3's video tracker, from the same checkpoint: a file without it stops the run
                    models["pipeline"].sam3_video_predictor()
                except (ValueError, RuntimeError, OSError) as error:
                    raise ModelLoadError(f"cannot load SAM 3's video tracker: {error}") from error
            elif getattr(models["pipeline"].predictor, "family", "sam2") != "sam2":
                raise ModelLoadError("video tracking needs a SAM 2 / 2.1 model; the checkpoint is a SAM 1 model")
        pipeline = models["pipeline"]
        options = dict(detect_every=args.detect_every, box_threshold=args.box_threshold,
                       text_threshold=args.text_threshold, new_object_iou=args.new_object_iou,
                       max_lost_frames=args.max_lost_frames, name=name)
        if args.sam3_association:
            options["association"] = "sam3"
        result = pipeline.track(frames, queries, **options) if sam3 else track_video(pipeline, frames, queries, **options)
        folder = safe_join(out_dir, item.key)
        json_path = safe_join(folder, JSON_NAME)
        json_path.unlink(missing_ok=True)  # until the new one exists, the video counts as unfinished
        _remove_stale(folder, args.save, OVERLAY_NAME, MASKS_DIR)
        with tqdm(total=len(result), desc=item.key[:40], unit="frame", disable=args.quiet, dynamic_ncols=True,
                  file=sys.stderr, leave=False) as bar:
            def advance(frame) -> None:
                bar.update(1)
                bar.set_postfix(objects=len(result.tracks), refresh=False)

            result.save(folder, args.save | {"json"}, source_name=item.file_name,
                        extra_info={"run": settings, "path": str(item.path)}, on_frame=advance)
    finally:
        if hasattr(frames, "close"):
            frames.close()
    report.frames += len(result)
    report.objects += len(result.tracks)


def _remove_stale(folder: Path, save: frozenset[str], overlay_name: str, masks_dir: str) -> None:
    """Delete outputs an earlier run wrote that this run will not rewrite."""
    import re

    if "overlay" not in save:
        (folder / overlay_name).unlink(missing_ok=True)
    masks = folder / masks_dir
    if masks.is_dir():  # every frame is rewritten when masks are asked for; otherwise they are stale
        if "masks" not in save:
            for path in masks.iterdir():
                if re.fullmatch(r"\d{6}\.png", path.name):
                    path.unlink(missing_ok=True)
            try:
                masks.rmdir()
            except OSError:
                pass


def _report_failure(report: TrackReport, path: Path, error: Exception) -> None:
    from tqdm import tqdm

    reason = str(error)
    prefix = f"{path}: "
    if reason.startswith(prefix):
        reason = reason[len(prefix):]
    if not isinstance(error, ValueError):
        reason = f"{type(error).__name__}: {reason}"
    if "limit" in reason and ("frames" in reason or "side" in reason):
        reason += " (--max-frames N / --max-side N, 0 = no limit)"
    report.failures.append((str(path), reason))
    tqdm.write(f"error: {path}: {reason}", file=sys.stderr)


def _print_summary(report: TrackReport) -> None:
    elapsed = time.perf_counter() - report.started
    rate = report.frames / elapsed if elapsed > 0 else 0.0
    lines = [f"langsam {NAME}: {report.total} videos: {report.processed} processed, {report.skipped} skipped, "
             f"{len(report.failures)} failed; {report.frames} frames, {report.objects} objects in {elapsed:.1f} s "
             f"({rate:.2f} frames/s)"]
    if report.failures:
        lines.append("failed:")
        lines += [f"  {path}: {reason}" for path, reason in report.failures]
    print("\n".join(lines))
