"""``langsam eval``: segmentation quality on a dataset.

SAM alone with the SAM paper's protocols (mIoU after 1 and N simulated clicks, and with the
ground-truth box), and the full text pipeline (COCO mask AP with the category names as
queries, in grounded / hybrid / clip mode). Prints tables, writes a JSON report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from langsam.cli import eval_video
from langsam.cli.options import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    add_model_arguments,
    choice_list,
    fraction,
    load_pipeline,
    model_kwargs_from_args,
    number,
    validate_model_arguments,
)

NAME = "eval"
PROMPTS = ("points", "box", "text")
MODES = ("grounded", "hybrid", "clip")
DATA_FORMATS = ("auto", "coco", "sa1b", "png")
DEFAULT_REPORT = "eval_report.json"

EPILOG = """\
datasets (DATA):
  instances.json      COCO instances (RLE or polygon masks); images in --images (default:
                      the JSON's folder)
  masks/ or x.json    SA-1B JSON files (e.g. 'langsam auto-masks' output); images in --images
  folder/             images/<name>.jpg + masks/<name>/<object>.png (one PNG per object;
                      the category comes from the file name: 'dog_1.png' -> dog)

protocols (--prompts):
  points   mIoU after 1 click and after --clicks clicks (SAM paper / RITM): the first click
           at the object's interior point farthest from its boundary, each next one on the
           largest error region, previous logits as mask input; "oracle" = best of SAM's 3
           first-click masks
  box      mIoU with the ground-truth box
  text     COCO mask AP / AP50 (pycocotools) with the category names as queries, in each
           --modes mode (needs Grounding DINO and/or CLIP)

outputs: tables on stdout (overall and per category) and a JSON report (--report).
exit status: 0 done, 1 bad dataset or model, 2 usage error, 130 interrupted.

examples:
  langsam eval val.json --images val2017/ --sam-checkpoint tuned.pth
  langsam eval shapes/ --prompts points,box --clicks 9 --report before.json
  langsam eval val.json --images val2017/ --prompts text --modes grounded,hybrid
  langsam eval val.json --images val2017/ --prompts text --model sam3 --sam3-checkpoint sam3.pt
  langsam eval labels.json --video out/clip/video.json      (tracking: J&F, IDF1, video AP)
  langsam eval labels.json --track clip.mp4 --prompt box     (SAM 2.1 prompted tracking: J&F)
"""


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA, ``--images``, ``--format``, ``--skip-bad-annotations``, ``-q``, ``-v`` (shared with finetune)."""
    parser.add_argument("data", metavar="DATA",
                        help="a COCO instances JSON, SA-1B JSON file(s) or a PNG-mask folder (see below)")
    parser.add_argument("--images", metavar="DIR", help="image folder of a COCO or SA-1B dataset "
                                                        "(default: the JSON's folder)")
    parser.add_argument("--format", choices=DATA_FORMATS, default="auto",
                        help="dataset format (default: detected from DATA)")
    parser.add_argument("--skip-bad-annotations", action="store_true",
                        help="skip annotations that cannot be used (with a warning) instead of stopping")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what is happening")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam eval`` and its options."""
    parser = commands.add_parser(
        NAME, help="measure segmentation quality on a dataset (mIoU, COCO mask AP)",
        description="Measure SAM with point and box prompts (mIoU, SAM paper protocols) and the text\n"
                    "pipeline (COCO mask AP) on a dataset with ground-truth masks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataset_arguments(parser)
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--prompts", type=choice_list(PROMPTS, "prompts"), default=("points", "box"), metavar="LIST",
                          help="comma-separated: points, box, text (default points,box)")
    protocol.add_argument("--clicks", type=number(int, 1), default=5, metavar="N",
                          help="clicks per object in the point protocol (default 5)")
    protocol.add_argument("--modes", type=choice_list(MODES, "modes"), default=("grounded",), metavar="LIST",
                          help="text modes: grounded, hybrid, clip (default grounded); grounded and hybrid use "
                               "--model's concept model")
    protocol.add_argument("--box-threshold", type=fraction, default=0.3, metavar="P",
                          help="minimum object score for text prompts: Grounding DINO's box score, or SAM 3's "
                               "(default 0.3)")
    protocol.add_argument("--text-threshold", type=fraction, default=0.25, metavar="P",
                          help="detector text threshold for text prompts (default 0.25)")
    protocol.add_argument("--clip-threshold", type=fraction, default=None, metavar="P",
                          help="CLIP probability cut in hybrid/clip mode (default: the pipeline's 0.5)")
    protocol.add_argument("--max-images", type=number(int, 1), default=None, metavar="N",
                          help="evaluate the first N images only")
    parser.add_argument("--report", metavar="FILE", default=DEFAULT_REPORT,
                        help=f"JSON report to write (default {DEFAULT_REPORT})")
    add_model_arguments(parser)
    eval_video.add_arguments(parser)
    parser.set_defaults(handler=run, parser=parser)
    return parser


def load_data(args: argparse.Namespace, path: str, images: str | None) -> Any:
    """The dataset at `path`, or UsageError for a path that is not there."""
    from sam.training.data import load_dataset

    if not Path(path).exists():
        raise UsageError(f"dataset {path!r} does not exist")
    if images is not None and not Path(images).is_dir():
        raise UsageError(f"--images {images!r} is not a folder")
    return load_dataset(path, images=images, format=args.format, strict=not args.skip_bad_annotations)


def run(args: argparse.Namespace) -> int:
    """Run ``langsam eval`` with parsed ``args``; returns the exit status."""
    if args.video is not None or args.track is not None:
        return eval_video.run(args)
    if args.sam_type is None and args.sam_checkpoint is not None:
        args.sam_type = "auto"  # a local checkpoint says what it is
    validate_model_arguments(args.parser, args)
    if args.model == "sam3" and "text" in args.prompts and "clip" in args.modes:
        raise UsageError("--modes clip ranks SAM's automatic masks and uses no concept model; with --model sam3 "
                         "evaluate grounded and/or hybrid")
    from sam.training.data import AnnotationError

    try:
        dataset = load_data(args, args.data, args.images)
    except (AnnotationError, ValueError, FileNotFoundError) as error:
        if isinstance(error, UsageError):
            raise
        print(f"langsam {NAME}: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    if args.max_images is not None:
        dataset = dataset.subset(range(min(args.max_images, len(dataset))))
    if dataset.num_objects == 0:
        print(f"langsam {NAME}: error: {dataset.name} has no objects to evaluate", file=sys.stderr)
        return EXIT_FAILURES
    try:
        report = evaluate(args, dataset)
    except (AnnotationError, ImportError) as error:  # a bad mask found late; scipy missing
        print(f"langsam {NAME}: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt:
        print("\ninterrupted; no report was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    from langsam.io import atomic_write_json

    atomic_write_json(args.report, report)
    print(f"report: {args.report}")
    return EXIT_OK


def _pipeline_mode(args: argparse.Namespace) -> str:
    """The `load_pipeline` mode that loads every model the requested protocols need."""
    if "text" not in args.prompts:
        return "sam"
    modes = set(args.modes)
    if "hybrid" in modes or {"grounded", "clip"} <= modes:
        return "hybrid"
    return "clip" if modes == {"clip"} else "grounded"


def evaluate(args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    """Run the requested protocols, print their tables; returns the JSON report."""
    from sam.evaluation import evaluate_prompts

    pipeline = load_pipeline(args, _pipeline_mode(args))
    progress = not args.quiet
    report: dict[str, Any] = {
        "dataset": {"path": str(args.data), "name": dataset.name, "images": len(dataset),
                    "objects": dataset.num_objects, "categories": dataset.categories},
        "model": {key: str(value) for key, value in model_kwargs_from_args(args).items()},
    }
    print(f"{dataset.name}: {len(dataset)} images, {dataset.num_objects} objects, "
          f"{len(dataset.categories)} categories")
    points, box = "points" in args.prompts, "box" in args.prompts
    if points or box:
        prompts = evaluate_prompts(pipeline.predictor, dataset, num_clicks=args.clicks if points else 0, box=box,
                                   progress=progress)
        report["prompts"] = prompts.to_dict()
        print("\nmIoU (SAM, point and box prompts)")
        print(prompts.table())
    if "text" in args.prompts:
        from langsam.evaluation import evaluate_text

        text = evaluate_text(pipeline, dataset, modes=args.modes, box_threshold=args.box_threshold,
                             text_threshold=args.text_threshold, clip_threshold=args.clip_threshold,
                             progress=progress)
        report["text"] = text.to_dict()
        print("\nCOCO mask AP (text prompts: the category names)")
        print(text.table())
    return report
