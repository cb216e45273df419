"""``langsam demo``: start the Gradio web demo.

The demo parses its own flags (:func:`langsam.demo.main`, shared with ``python demos/app.py``),
so this command hands its arguments on unchanged. gradio is an optional extra: it is imported
only here, when the command runs, and a missing install is one clear message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from langsam.cli.options import EXIT_FAILURES, EXIT_OK, exit_status

NAME = "demo"
#: The arguments after ``demo`` go to :func:`main` as they are, not through ``langsam``'s parser.
OWN_PARSER = True


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam demo`` for ``langsam --help``; its options are the demo's own."""
    return commands.add_parser(NAME, help="start the Gradio demo (see 'langsam demo --help')", add_help=False)


def main(argv: Sequence[str]) -> int:
    """Run ``langsam demo ARGV...``; returns the exit status."""
    try:
        from langsam.demo import main as demo_main
    except ImportError as error:
        print(f"langsam demo: error: the demo needs gradio ({error}); install it with: pip install 'langsam[demo]'",
              file=sys.stderr)
        return EXIT_FAILURES
    try:
        status = demo_main(list(argv))
    except SystemExit as exit_:  # the demo's own --help and usage errors
        return exit_status(exit_)
    return EXIT_OK if status is None else int(status)
