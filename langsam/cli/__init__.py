"""The ``langsam`` command line: ``segment``, ``auto-masks``, ``track``, ``eval``,
``finetune``, ``label``, ``serve``, ``export`` and ``demo``.

One module per command, listed in :data:`COMMANDS`; :mod:`langsam.cli.options` holds what
they (and the demo's launcher) share, :mod:`langsam.cli.batch` what the batch commands share.
Adding a command is one module and one row of the table. A command module has

* ``NAME``, the word after ``langsam``;
* ``add_parser(commands)``, which adds its sub-parser to ``commands`` and sets ``handler`` (a
  function ``(args) -> exit status``) and ``parser`` as defaults;
* or, for a command that parses its own arguments, ``OWN_PARSER = True`` and ``main(argv)``
  (``add_parser`` then only lists it in ``langsam --help``).

The model-option helpers and the output file names are re-exported here, where they were before
the command line became a package.

Everything heavy (torch, the models, tqdm, pycocotools) is imported inside the command
that needs it, so ``langsam --help`` and every usage error answer at once, before any
model loads. Exit status: 0 when every image was processed, 1 when some input failed
(each failure is reported on stderr and the run goes on), 2 for a usage error, 130 when
interrupted (Ctrl-C, SIGINT), 143 when stopped by SIGTERM (``kill``, ``docker stop``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from langsam.cli import auto_masks, demo, evaluate, export, finetune, label, segment, serve, track
from langsam.cli.batch import ANNOTATIONS_NAME, OVERLAY_NAME, RECORD_NAME, Terminated
from langsam.cli.options import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ModelLoadError,
    UsageError,
    add_model_arguments,
    exit_status,
    model_kwargs_from_args,
    validate_model_arguments,
)

__all__ = [
    "ANNOTATIONS_NAME",
    "COMMANDS",
    "EXIT_FAILURES",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "OVERLAY_NAME",
    "RECORD_NAME",
    "add_model_arguments",
    "build_parser",
    "main",
    "model_kwargs_from_args",
    "validate_model_arguments",
]

#: The commands, in the order ``langsam --help`` lists them.
COMMANDS = (
    segment,
    auto_masks,
    track,
    evaluate,
    finetune,
    label,
    serve,
    export,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``langsam`` argument parser, with one sub-parser per entry of :data:`COMMANDS`."""
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
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``langsam`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own_parser = {command.NAME: command for command in COMMANDS if getattr(command, "OWN_PARSER", False)}
    if argv and argv[0] in own_parser:
        return own_parser[argv[0]].main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_status(exit_)
    _configure_logging(getattr(args, "verbose", False))
    try:
        return args.handler(args)
    except SystemExit as exit_:  # parser.error() from a late check, still before any model loads
        return exit_status(exit_)
    except UsageError as error:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ModelLoadError as error:
        print(f"{args.parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt as interrupt:  # Ctrl-C (SIGINT), or SIGTERM as batch.Terminated
        terminated = isinstance(interrupt, Terminated)
        print(f"\n{'terminated' if terminated else 'interrupted'}; finished outputs are complete on disk, "
              "rerun with --skip-existing to resume", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
