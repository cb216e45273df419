"""``langsam eval DATA --video RESULTS...``: tracking quality of a tracked video against its labels.

Not a command of its own: ``langsam eval`` hands over here when ``--video`` is given. DATA is the
ground truth in YouTube-VIS JSON (one or more videos, masks per frame); RESULTS are the JSON
files ``langsam track`` wrote (one per video, matched to the ground truth by file name), or one
YouTube-VIS results list. Prints J&F, identity metrics and video mask AP, writes the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from langsam.cli.options import EXIT_FAILURES, EXIT_OK, UsageError, choice_list

METRICS = ("jf", "identity", "ap")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--video RESULTS...``, ``--metrics``, ``--boundary-tolerance``, ``--identity-iou``."""
    video = parser.add_argument_group("video tracking (DATA is YouTube-VIS ground truth)")
    video.add_argument("--video", nargs="+", metavar="RESULTS", default=None,
                       help="score these tracking results (video.json files written by 'langsam track', or one "
                            "YouTube-VIS results list) against DATA instead of running a model")
    video.add_argument("--track", nargs="+", metavar="VIDEO", default=None,
                       help="prompted tracking: run SAM 2.1's video predictor on these videos (files or frame "
                            "folders, matched to DATA's videos by file name), each labelled object prompted on its "
                            "first visible frame (--prompt), and score J&F; the tracks are saved beside the report")
    video.add_argument("--prompt", choices=("mask", "box"), default="mask",
                       help="what --track gives SAM of each object: its mask or its box (default mask)")
    video.add_argument("--metrics", type=choice_list(METRICS, "metrics"), default=None, metavar="LIST",
                       help="comma-separated: jf (J&F, objects matched by id: prompted tracking), identity "
                            "(IDF1, ID switches: text tracking), ap (video mask AP) (default all three; jf with --track)")
    video.add_argument("--boundary-tolerance", type=float, default=None, metavar="T",
                       help="F's boundary tolerance: a fraction of the image diagonal, or pixels if >= 1 "
                            "(default 0.008, DAVIS')")
    video.add_argument("--identity-iou", type=float, default=None, metavar="P",
                       help="mask IoU at which a prediction matches an object in the identity metrics (default 0.5)")


def _merged_results(paths: list[str]) -> Any:
    """One document of every video in `paths` (ids renumbered; matched to the ground truth by file name)."""
    from langsam.video.metrics import VideoEvaluationError

    if len(paths) == 1:
        return paths[0]
    videos, annotations = [], []
    for number, path in enumerate(paths, start=1):
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise VideoEvaluationError(f"cannot read the results {path!r}: {error}") from None
        rows = document.get("videos") if isinstance(document, dict) else None
        if not rows or len(rows) != 1 or not rows[0].get("file_name"):
            raise VideoEvaluationError(f"{path!r}: with several results files each must hold one video with a "
                                       "file_name ('langsam track' writes them so)")
        videos.append({**rows[0], "id": number})
        annotations += [{**a, "video_id": number, "id": a.get("id", index)}
                        for index, a in enumerate(document.get("annotations", []))]
    return {"videos": videos, "annotations": annotations}


def _track(args: argparse.Namespace, ground_truth: Any) -> dict[str, Any]:
    """Prompted tracking of every ``--track`` video; one results document of all of them."""
    from langsam.cli.options import load_pipeline, validate_model_arguments
    from langsam.video.metrics import VideoEvaluationError, load_vis
    from langsam.video.prompted import track_prompted
    from langsam.video.tracker import _build_video_predictor

    labels = load_vis(ground_truth, what="ground truth")
    by_name = {Path(v.name).name: v for v in labels.values() if v.name}
    todo = []
    for path in args.track:
        if not Path(path).exists():
            raise UsageError(f"--track: {path!r} does not exist")
        video = by_name.get(Path(path).name) or by_name.get(Path(path).stem) or \
            next((v for name, v in by_name.items() if Path(name).stem == Path(path).stem), None)
        if video is None:
            raise VideoEvaluationError(f"{path!r}: no video of that name in the ground truth "
                                       f"({', '.join(sorted(by_name)) or 'it names none'})")
        todo.append((path, video))
    if args.sam_type is None and args.sam_checkpoint is not None:
        args.sam_type = "auto"
    validate_model_arguments(args.parser, args)
    try:
        predictor = _build_video_predictor(load_pipeline(args, "sam"))
    except ValueError as error:
        raise VideoEvaluationError(str(error)) from None
    videos, annotations = [], []
    for number, (path, labelled) in enumerate(todo, start=1):
        try:
            document = track_prompted(predictor, path, labelled, prompt=args.prompt, progress=not args.quiet)
        except ValueError as error:
            raise VideoEvaluationError(str(error)) from None
        videos.append({**document["videos"][0], "id": number})
        annotations += [{**a, "video_id": number} for a in document["annotations"]]
    return {"info": document["info"], "videos": videos, "annotations": annotations}


def run(args: argparse.Namespace) -> int:
    """Score ``args.video`` against ``args.data``; print the tables, write ``args.report``."""
    from langsam.video.metrics import BOUNDARY_TOLERANCE, IDENTITY_IOU, VideoEvaluationError, evaluate_video

    if args.video is not None and args.track is not None:
        raise UsageError("give --video (score results) or --track (run prompted tracking), not both")
    metrics = args.metrics or (("jf",) if args.track is not None else METRICS)
    tolerance = BOUNDARY_TOLERANCE if args.boundary_tolerance is None else args.boundary_tolerance
    identity_iou = IDENTITY_IOU if args.identity_iou is None else args.identity_iou
    if tolerance < 0:
        raise UsageError("--boundary-tolerance must be >= 0")
    if not 0 < identity_iou <= 1:
        raise UsageError("--identity-iou must be in (0, 1]")
    try:
        with open(args.data, encoding="utf-8") as handle:
            ground_truth = json.load(handle)
    except OSError as error:
        raise UsageError(f"ground truth {args.data!r}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        print(f"langsam eval: error: the ground truth {args.data!r} is not JSON: {error}", file=sys.stderr)
        return EXIT_FAILURES
    from langsam.io import atomic_write_json

    try:
        if args.track is not None:
            results, sources = _track(args, ground_truth), [str(p) for p in args.track]
            tracks_path = Path(args.report).with_name(Path(args.report).stem + "_tracks.json")
            atomic_write_json(tracks_path, results)
            print(f"tracks: {tracks_path}")
        else:
            results, sources = _merged_results(args.video), [str(p) for p in args.video]
        report = evaluate_video(ground_truth, results, metrics=metrics, tolerance=tolerance,
                                iou_threshold=identity_iou)
    except VideoEvaluationError as error:
        print(f"langsam eval: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    report = {"ground_truth": str(args.data), "results": sources, **report}
    print(table(report))
    atomic_write_json(args.report, report)
    print(f"report: {args.report}")
    return EXIT_OK


def table(report: dict[str, Any]) -> str:
    """The report's headline numbers as text tables."""
    from sam.evaluation import format_table

    parts = [f"{report['videos']} videos, {report['objects']} objects"]
    if "jf" in report:
        rows = [[name, s["J&F"], s["J"], s["F"]] for name, s in report["jf"]["per_object"].items()]
        rows.append(["mean", report["jf"]["J&F"], report["jf"]["J"], report["jf"]["F"]])
        parts.append("J&F (prompted tracking, objects matched by id)\n" + format_table(["object", "J&F", "J", "F"], rows))
    if "identity" in report:
        o = report["identity"]["overall"]
        parts.append("identity (text tracking)\n" + format_table(
            ["IDF1", "IDP", "IDR", "ID switches", "fragmentations", "MOTA"],
            [[o["idf1"], o["idp"], o["idr"], o["num_switches"], o["num_fragmentations"], o["mota"]]]))
    if "ap" in report:
        a = report["ap"]
        parts.append("video mask AP\n" + format_table(["AP", "AP50", "AP75", "detections"],
                                                      [[a["ap"], a["ap50"], a["ap75"], a["detections"]]]))
    return "\n\n".join(parts)
