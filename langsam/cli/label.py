"""``langsam label``: the data engine. A labelling project is a folder; the model proposes masks,
you review them in the browser, SAM is fine-tuned on the reviews, and proposes again.

``init`` creates the project, ``propose`` runs the pipeline over the images not yet proposed (on
``langsam.cli.batch``'s engine: progress bar, bad files reported, ``--ray``), ``review`` serves
the review page, ``export`` writes COCO / YOLO / SA-1B, ``train`` runs one fine-tuning round.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from langsam.cli.finetune import add_recipe_arguments, recipe_kwargs
from langsam.cli.options import (EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, UsageError,
    add_model_arguments, add_ray_arguments, fraction, model_kwargs_from_args, number, ray_options_from_args,
    validate_model_arguments)

NAME = "label"
MODES = ("grounded", "hybrid", "clip")

EPILOG = """\
the loop:
  langsam label init pets/ --images photos/ --classes "a dog, a cat"
  langsam label propose pets/                 # round 1, the base model; rerun to resume
  langsam label review pets/                  # http://127.0.0.1:8000, keyboard shortcuts
  langsam label train pets/                   # rounds/round-1/: tuned SAM, report.md
  langsam label propose pets/ --round 2       # unreviewed images again, with round 1's model
  langsam label export pets/ --format coco --out pets_coco/

run 'langsam label COMMAND --help' for the options of each step
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam label`` and its sub-commands."""
    parser = commands.add_parser(
        NAME, help="label your own data: propose, review in the browser, export, fine-tune, repeat",
        description="A labelling project: the model proposes masks for text classes, you review them,\n"
                    "SAM is fine-tuned on the reviews and proposes again.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steps = parser.add_subparsers(dest="label_command", metavar="STEP")
    steps.required = True
    _add_init(steps)
    _add_propose(steps)
    _add_review(steps)
    _add_export(steps)
    _add_train(steps)
    return parser


def _subparser(steps: argparse._SubParsersAction, name: str, help: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = steps.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", metavar="PROJECT", help="the project folder")
    return parser


def _open(args: argparse.Namespace):
    from langsam.label import Project, ProjectError

    try:
        return Project.open(args.project)
    except ProjectError as error:
        raise UsageError(str(error)) from None


# ============================================================================================ init


def _add_init(steps: argparse._SubParsersAction) -> None:
    parser = _subparser(steps, "init", "create a labelling project for a folder of images", epilog="""\
The images are never copied or modified; the project stores paths relative to --images.
A seeded --val-fraction of them is held out: 'label train' evaluates on those and never trains on them.

example:
  langsam label init pets/ --images photos/ --classes "a dog, a cat"
""")
    parser.add_argument("--images", required=True, metavar="DIR", help="the folder of images (searched recursively)")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", metavar="LIST", help='comma-separated classes, e.g. "a dog, a cat"')
    classes.add_argument("--classes-file", metavar="FILE", help="a UTF-8 file with one class per line")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                        help="fraction of the images held out for evaluation (default 0.2)")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seed of the held-out choice (default 0)")
    parser.set_defaults(handler=run_init, parser=parser)


def run_init(args: argparse.Namespace) -> int:
    from langsam.label import Project, ProjectError
    from langsam.label.project import parse_classes

    if args.classes_file is not None:
        try:
            text = Path(args.classes_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --classes-file {args.classes_file!r}: {error}") from None
        text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))
    else:
        text = args.classes
    if args.val_fraction >= 1:
        raise UsageError("--val-fraction must be below 1 (training needs images)")
    try:
        project = Project.init(args.project, args.images, parse_classes(text), val_fraction=args.val_fraction,
                               seed=args.seed)
    except ProjectError as error:
        raise UsageError(str(error)) from None
    images = project.images()
    held_out = sum(1 for image in images if image.split == "val")
    print(f"created {args.project}: {len(images)} images ({held_out} held out), classes: "
          f"{', '.join(project.classes)}\nnext: langsam label propose {args.project}")
    project.close()
    return EXIT_OK


# ============================================================================================ propose


def _add_propose(steps: argparse._SubParsersAction) -> None:
    parser = _subparser(steps, "propose", "propose masks for the images not yet proposed", epilog="""\
Resumable: each image's proposals are stored in one transaction as it finishes, so a killed
run loses at most the images in flight; rerun the same command to go on.
--round N (N >= 2) proposes again, with rounds/round-(N-1)/best.pth, every image nothing has
been reviewed on yet. Default: the round after the newest trained one (1 before any training).

exit status: 0 every image proposed, 1 some failed (reported; rerun to retry them), 2 usage error.
""")
    parser.add_argument("--round", type=number(int, 1), default=None, metavar="N", help="the round to propose")
    settings = parser.add_argument_group("detection")
    settings.add_argument("--mode", choices=MODES, default="grounded",
                          help="grounded: Grounding DINO boxes -> SAM; hybrid: grounded, re-scored by CLIP; "
                               "clip: SAM auto masks ranked by CLIP (default grounded)")
    settings.add_argument("--box-threshold", type=fraction, default=None, metavar="P",
                          help="minimum detector box score (default 0.3)")
    settings.add_argument("--text-threshold", type=fraction, default=None, metavar="P",
                          help="minimum detector text-token score (default 0.25)")
    settings.add_argument("--clip-threshold", type=fraction, default=None, metavar="P",
                          help="minimum CLIP probability in clip/hybrid mode")
    settings.add_argument("--top-k", type=number(int, 1), default=None, metavar="K",
                          help="keep at most K objects per image, best first")
    add_model_arguments(parser)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--max-pixels", type=number(int, 0), default=None, metavar="N",
                           help="refuse images larger than N pixels (default 100000000; 0 = no limit)")
    run_group.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    run_group.add_argument("--verbose", "-v", action="store_true", help="log what the models are doing")
    add_ray_arguments(parser)
    parser.set_defaults(handler=run_propose, parser=parser)


def run_propose(args: argparse.Namespace) -> int:
    from langsam.cli.batch import Item, RunReport, print_summary, process_items, set_pixel_limit
    from langsam.label import ProjectError
    from langsam.label.propose import default_round, render_proposals, round_checkpoint, segment_kwargs, \
        store_proposals

    validate_model_arguments(args.parser, args)
    ray_options = ray_options_from_args(args)
    project = _open(args)
    round = default_round(project) if args.round is None else args.round
    if round > 1:
        if args.sam_checkpoint is not None and os.environ.get("LANGSAM_SAM_CHECKPOINT") != args.sam_checkpoint:
            raise UsageError(f"--round {round} proposes with round {round - 1}'s tuned checkpoint; drop --sam-checkpoint")
        try:
            args.sam_checkpoint = str(round_checkpoint(project, round))
        except ProjectError as error:
            raise UsageError(str(error)) from None
        args.sam_type = "auto"
    max_pixels = set_pixel_limit(args.max_pixels)

    todo = project.unproposed(round)
    done = sum(1 for image in project.images() if image.proposed_round == round)
    report = RunReport(total=done + len(todo), skipped=done)
    items = []
    for image in todo:
        try:
            items.append(Item(path=project.image_path(image.id), file_name=image.path, key=str(image.id)))
        except ProjectError as error:
            report.failures.append((image.path, str(error)))
            print(f"error: {error}", file=sys.stderr)

    def finish(item: Item, document: dict[str, Any], files: dict[str, bytes]) -> None:
        store_proposals(project, int(item.key), document, round)
        report.objects.update(obj["label"] for obj in document["objects"])

    kwargs = segment_kwargs(args.mode, box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                            clip_threshold=args.clip_threshold, top_k=args.top_k)
    render = partial(render_proposals, classes=project.classes, segment_kwargs=kwargs)
    try:
        process_items(args, items, command=f"{NAME} propose", mode=args.mode, render=render, finish=finish,
                      ray_options=ray_options, max_pixels=max_pixels, report=report,
                      postfix=lambda report: {"objects": sum(report.objects.values())})
    except KeyboardInterrupt as interrupt:
        from langsam.cli.batch import Terminated

        stored = sum(1 for image in project.images() if image.proposed_round == round) - done
        print(f"\nstopped; {stored} images were proposed and are stored. Rerun "
              f"'langsam label propose {args.project} --round {round}' to go on", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    finally:
        project.close()
    if not args.quiet:
        lines = [f"round {round}; objects per class:"] + [f"  {name}: {report.objects[name]}"
                                                          for name in project.classes]
        if report.failures:
            lines.append(f"rerun 'langsam label propose {args.project} --round {round}' to retry the failed images")
        else:
            lines.append(f"next: langsam label review {args.project}")
        print_summary(f"{NAME} propose", report, lines)
    return EXIT_FAILURES if report.failures else EXIT_OK


# ============================================================================================ review


def _add_review(steps: argparse._SubParsersAction) -> None:
    parser = _subparser(steps, "review", "review the proposals in the browser", epilog="""\
The page's address is printed once the port is open. Every action is one database transaction,
so a crash or kill -9 of this server loses at most the action in flight; start it again on the
same project and the review goes on: the same queue, an open tab keeps its image, and the image
of a tab closed meanwhile returns to the queue when its lease lapses (2 minutes).

stopping: Ctrl+C or SIGTERM closes the port, gives the requests in flight 5 s to finish, closes
the project and exits 0.

exit status: 0 stopped, 1 the port cannot be opened or the server is not installed, 2 usage error.
""")
    parser.add_argument("--host", default=None,
                        help="interface to listen on (default 127.0.0.1; another one needs an API key)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require this key (header X-API-Key); default: LANGSAM_API_KEY if set")
    add_model_arguments(parser, detector=False, clip=False)
    parser.set_defaults(handler=run_review, parser=parser)


def _port(text: str) -> int:
    """--port: 1024-65535, or 0 for a free port."""
    value = number(int, 0)(text)
    if value != 0 and not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (a free port) or 1024-65535, got {text}")
    return value


def run_review(args: argparse.Namespace) -> int:
    validate_model_arguments(args.parser, args)
    try:
        from langsam.label.review import serve_review
    except ImportError as error:
        print(f"langsam label review: error: the review server is not available in this installation ({error})",
              file=sys.stderr)
        return EXIT_FAILURES
    _open(args).close()  # a clear usage error before the server starts
    api_key = args.api_key or os.environ.get("LANGSAM_API_KEY") or None
    try:
        serve_review(args.project, host=args.host, port=args.port, api_key=api_key, **model_kwargs_from_args(args))
    except KeyboardInterrupt:
        return EXIT_OK
    except ValueError as error:  # the binding rule, a short key, a bad port: serve's errors
        raise UsageError(str(error)) from None
    except (ImportError, OSError) as error:  # the serve extra is missing; the port is taken
        print(f"langsam label review: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


# ============================================================================================ export


def _add_export(steps: argparse._SubParsersAction) -> None:
    from langsam.label.export import FORMATS

    parser = _subparser(steps, "export", "export the reviewed objects (accepted, corrected, added)", epilog="""\
formats:
  coco   OUT/<split>.json: COCO instances, RLE masks, file_name relative to the images folder
  sa1b   OUT/<split>/<image>.json: one SA-1B file per image (langsam auto-masks' layout + category)
  yolo   OUT/images/<split>/ (links to the originals), OUT/labels/<split>/<image>.txt with one
         'class x1 y1 x2 y2 ...' line per object (class from 0, polygon normalised to [0, 1]),
         OUT/data.yaml (Ultralytics segmentation)

--split: project (default: the held-out images chosen at init are 'val'), none (one set, 'all'),
or val=F (a random fraction F of the exported images, --seed).
""")
    parser.add_argument("--format", choices=FORMATS, default="coco", help="default coco")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--split", default="project", metavar="SPLIT", help="project, none or val=F")
    parser.add_argument("--seed", type=number(int, 0), default=0, help="seed of --split val=F (default 0)")
    parser.set_defaults(handler=run_export, parser=parser)


def run_export(args: argparse.Namespace) -> int:
    from langsam.label import ProjectError
    from langsam.label.export import export, parse_split

    try:
        split = parse_split(args.split)
    except ValueError as error:
        raise UsageError(str(error)) from None
    project = _open(args)
    try:
        summary = export(project, args.out, args.format, split=split, seed=args.seed)
    except ProjectError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        print(f"langsam label export: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    finally:
        project.close()
    for name in summary["images"]:
        print(f"{name}: {summary['images'][name]} images, {summary['objects'][name]} objects")
    print(f"wrote {len(summary['files'])} files under {args.out}")
    return EXIT_OK


# ============================================================================================ train


def _add_train(steps: argparse._SubParsersAction) -> None:
    parser = _subparser(steps, "train", "fine-tune SAM on the reviewed objects (one round)", epilog="""\
Trains round N (the newest proposed round) on every kept object of the training images, starting
from the model that proposed round N, validates on the held-out reviewed images before and after
('langsam eval's 1-click and box mIoU), and writes rounds/round-N/: best.pth (use it with
'label propose --round N+1'), train.json / val.json (the data it saw), report.json, report.md,
report.png. Interrupted? Rerun the same command: it resumes.
""")
    parser.add_argument("--round", type=number(int, 1), default=None, metavar="N",
                        help="the round to train (default: the newest proposed one)")
    add_recipe_arguments(parser.add_argument_group("training (as langsam finetune)"))
    add_model_arguments(parser, detector=False, clip=False)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_train, parser=parser)


def run_train(args: argparse.Namespace) -> int:
    from sam.training import TrainConfig

    from langsam.cli.options import ModelLoadError
    from langsam.label import ProjectError
    from langsam.label.train import TABLE_NAME, train_round

    validate_model_arguments(args.parser, args)
    try:
        config = TrainConfig(**recipe_kwargs(args))
    except ValueError as error:
        raise UsageError(str(error).replace("invalid TrainConfig: ", "")) from None
    project = _open(args)
    try:
        report = train_round(project, sam_type=args.sam_type, sam_checkpoint=args.sam_checkpoint, config=config,
                             device=args.device, round=args.round, progress=not args.quiet)
    except ProjectError as error:
        raise UsageError(str(error)) from None
    except (RuntimeError, OSError) as error:
        raise ModelLoadError(f"cannot train: {error}") from error
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume the round", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        project.close()
    folder = Path(report["checkpoint"]).parent
    print((folder / TABLE_NAME).read_text(encoding="utf-8"))
    print(f"round {report['round']}: {report['steps']} steps; tuned weights {report['checkpoint']}\n"
          f"next: langsam label propose {args.project} --round {report['round'] + 1}")
    return EXIT_OK
