"""The demo app: :func:`build_app` puts the model picker and the four tabs together,
:func:`launch` serves it with the demo's safety settings, and :func:`main` is ``langsam demo``
(and ``python demos/app.py``)."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from langsam.cli.options import add_model_arguments, model_kwargs_from_args, validate_model_arguments
from langsam.demo.click_tab import build_click_tab
from langsam.demo.common import (
    DEFAULT_MAX_DISPLAY_SIDE,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_PIXELS,
    OutputFolder,
    TabContext,
)
from langsam.demo.everything_tab import build_everything_tab
from langsam.demo.models import LazyPipeline, PipelineSource
from langsam.demo.text_tab import build_text_tab
from langsam.demo.video_tab import build_video_tab

logger = logging.getLogger(__name__)


def build_app(
    pipeline: PipelineSource = None,
    *,
    max_display_side: int = DEFAULT_MAX_DISPLAY_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    title: str = "langsam",
    click_onnx: str | os.PathLike | None = None,
):
    """Build the demo as a ``gr.Blocks`` (queued, one model job at a time).

    Args:
        pipeline: a :class:`~langsam.pipeline.LangSAM` (or anything with its ``segment``,
            ``predictor`` and ``auto_masks``), a zero-argument function returning one, or a
            dict of LangSAM settings (``sam_type``, ``sam_checkpoint``, ``detector``,
            ``detector_size``, ``clip_model``, ``clip_pretrained``, ``device``). ``None`` uses the
            defaults. Factories and settings are only called on the first request. Only with
            settings does the page offer to switch the SAM model.
        max_display_side: longest side of images sent back for display.
        max_pixels: largest uploaded image (width * height) the app decodes.
        click_onnx: a folder written by ``langsam export onnx``: the Click and box tab then runs
            SAM on onnxruntime (:class:`sam.export.OnnxSamPredictor`, loaded on first use and
            shared by all visitors); the other tabs keep the pipeline's PyTorch models.

    Launch the result with :func:`launch`, which applies the upload limit and binds to
    127.0.0.1.
    """
    import gradio as gr

    ctx = TabContext(models=LazyPipeline(pipeline), outputs=OutputFolder(), max_display_side=max_display_side,
                     max_pixels=max_pixels, click_onnx=None if click_onnx is None else os.fspath(click_onnx))
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}\nText-prompted segmentation with Grounding DINO, SAM and CLIP. "
                    "Models load on the first request.")
        _build_model_picker(ctx)
        with gr.Tab("Text"):
            build_text_tab(ctx)
        with gr.Tab("Click and box"):
            build_click_tab(ctx)
        with gr.Tab("Everything"):
            build_everything_tab(ctx)
        with gr.Tab("Video"):
            build_video_tab(ctx)
    app.queue(default_concurrency_limit=1)
    app.langsam_output_dir = ctx.outputs.root  # for tests and logs: everything the app writes is under it
    app.langsam_context = ctx  # for tests: the models and settings every tab shares
    return app


def _build_model_picker(ctx: TabContext) -> None:
    """The SAM model dropdown (choices from SAM's registry) and ``/select_model``. The choice
    holds for every visitor; running jobs finish on the model they started with."""
    import gradio as gr

    models = ctx.models

    @ctx.user_errors
    def select_model(choice):
        if not models.choose_sam(choice):
            return f"SAM model: {choice} (unchanged)."
        return f"SAM model: {choice}. It loads with the next request."

    with gr.Accordion("Model", open=False):
        if models.can_choose_sam:
            picker = gr.Dropdown(models.sam_choices(), value=models.sam_choice, label="SAM model",
                                 info="SAM's registry; the official weights download on first use. "
                                      "Applies to every visitor.", elem_id="sam-model")
            status = gr.Markdown(elem_id="sam-model-status")
            picker.input(select_model, [picker], [status], api_name="select_model", **ctx.model_event)
        else:
            gr.Markdown("The models were given to this app in code; choose them where it is launched.")


def launch(
    app,
    *,
    server_name: str = "127.0.0.1",
    server_port: int | None = None,
    max_file_size: str | int | None = DEFAULT_MAX_FILE_SIZE,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Launch ``app`` with the demo's safety settings: local address, upload size limit, no
    extra ``allowed_paths`` (only the app's own uploads and outputs can be served), no share
    link, a bounded number of sessions. Returns what ``gr.Blocks.launch`` returns."""
    return app.launch(
        server_name=server_name,
        server_port=server_port,
        max_file_size=max_file_size,
        share=False,
        allowed_paths=None,
        state_session_capacity=200,
        ssr_mode=False,
        mcp_server=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        # Our handlers turn every failure into a short gr.Error already; this also shows the
        # message (never the traceback) when gradio itself refuses an upload, e.g. a file
        # that is not an image.
        show_error=True,
    )


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``langsam demo``: the model flags shared with ``langsam segment`` (also read
    from the ``LANGSAM_*`` environment variables), plus where to listen."""
    parser = argparse.ArgumentParser(prog="langsam demo", description="Start the langsam web demo (Gradio).")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: first free one from 7860)")
    parser.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE,
                        help=f"largest upload, e.g. 20mb (default {DEFAULT_MAX_FILE_SIZE})")
    parser.add_argument("--max-display-side", type=int, default=DEFAULT_MAX_DISPLAY_SIDE,
                        help="longest side of the images shown in the browser")
    parser.add_argument("--click-onnx", metavar="DIR", default=None,
                        help="run the Click and box tab's SAM on onnxruntime from a folder written by "
                             "'langsam export onnx' (needs langsam[export])")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``langsam demo`` and ``python demos/app.py``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_model_arguments(parser, args)
    if args.max_display_side < 64:
        parser.error(f"--max-display-side must be at least 64, got {args.max_display_side}")
    if args.click_onnx is not None:
        from sam.export import MANIFEST_NAME

        if not (Path(args.click_onnx) / MANIFEST_NAME).is_file():
            parser.error(f"--click-onnx {args.click_onnx!r} is not a folder written by 'langsam export onnx' "
                         f"(it has no {MANIFEST_NAME})")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not os.environ.get("GRADIO_TEMP_DIR"):
        # Uploads and gradio's file cache go into a folder of this process, removed at exit,
        # instead of the shared /tmp/gradio. Set before gradio is imported: it reads it then.
        upload_dir = tempfile.mkdtemp(prefix="langsam-demo-uploads-")
        atexit.register(shutil.rmtree, upload_dir, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = upload_dir
    # `kill` (SIGTERM) exits like Ctrl+C, so the atexit clean-up of the temp folders runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    app = build_app(model_kwargs_from_args(args), max_display_side=args.max_display_side,
                    click_onnx=args.click_onnx)
    launch(app, server_name=args.host, server_port=args.port, max_file_size=args.max_file_size)
    return 0
