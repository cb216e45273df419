"""What the demo's tabs share: limits, query parsing, display helpers, the per-app output
folder and :class:`TabContext` (the models, error handling and upload reading of one app).

gradio is imported inside the functions that need it, never at module level.
"""

from __future__ import annotations

import atexit
import functools
import io
import logging
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from langsam.demo.models import LazyPipeline, ModelLoadError
from langsam.io import load_image

logger = logging.getLogger(__name__)

#: Longest side, in pixels, of the images the app sends back for display. Masks, boxes and
#: the downloads stay at the uploaded image's full resolution.
DEFAULT_MAX_DISPLAY_SIDE = 1280
#: Largest upload Gradio accepts (``launch(max_file_size=...)``).
DEFAULT_MAX_FILE_SIZE = "20mb"
#: Largest image, in pixels, the app decodes (checked from the file header). Lower than the
#: library default because every visitor shares one process.
DEFAULT_MAX_PIXELS = 40_000_000
#: How many finished requests keep their files in the app's temp folder.
KEEP_REQUESTS = 64
#: Every event that runs a model joins this concurrency group, so with its limit of 1 only one
#: model job runs at a time across all tabs and visitors.
MODEL_QUEUE = "langsam-model"


def parse_queries(text: str | None) -> list[str]:
    """Split the query box into queries: one per line, or separated by ``,`` ``;`` or ``.``.

    >>> parse_queries("cat, dog.\\nred car; Cat")
    ['cat', 'dog', 'red car']
    """
    if not text:
        return []
    for separator in (";", ".", "\n"):
        text = text.replace(separator, ",")
    queries: list[str] = []
    seen: set[str] = set()
    for part in text.split(","):
        query = " ".join(part.split())
        if query and query.lower() not in seen:  # the detector also ignores case
            seen.add(query.lower())
            queries.append(query)
    return queries


def display_scale(image_size: tuple[int, int], max_side: int) -> float:
    """Factor (<= 1) that brings ``image_size`` (H, W) within ``max_side`` on its longest side."""
    longest = max(image_size)
    return 1.0 if longest <= max_side else max_side / longest


def for_display(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` downscaled (LANCZOS) so its longest side is at most ``max_side``."""
    scale = display_scale((image.height, image.width), max_side)
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def rounded(value: Any) -> float | None:
    """A score for the tables: a float rounded to 4 places, or None."""
    return None if value is None else round(float(value), 4)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """An (H, W) bool mask as an 8-bit grayscale PNG holding 0 and 255."""
    png = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(png, format="PNG")
    return png.getvalue()


class OutputFolder:
    """One temporary folder per app; each request writes into a fresh sub-folder of it.

    Only the newest :data:`KEEP_REQUESTS` request folders are kept; the whole folder goes
    when the process exits. Nothing from a request decides a path outside it: names are
    generated here, and labels pass through :func:`langsam.io.sanitize_name`.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="langsam-demo-"))
        self._lock = threading.Lock()
        self._requests: list[Path] = []
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    def new_request(self) -> Path:
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        with self._lock:
            self._requests.append(folder)
            while len(self._requests) > KEEP_REQUESTS:
                shutil.rmtree(self._requests.pop(0), ignore_errors=True)
        return folder


@dataclass
class TabContext:
    """What every tab of one app uses: its models, its output folder and its limits."""

    models: LazyPipeline
    outputs: OutputFolder
    max_display_side: int
    max_pixels: int
    #: The click tab's SAM on onnxruntime: a folder written by ``langsam export onnx`` (None:
    #: the pipeline's PyTorch SAM).
    click_onnx: str | None = None
    _onnx_template: Any = field(default=None, init=False, repr=False)
    _onnx_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def click_predictor(self) -> Any:
        """A SAM predictor of one visitor's own (it keeps that visitor's image embedding).

        It shares the pipeline's PyTorch model, or, with :attr:`click_onnx`, the onnxruntime
        sessions loaded once for the app (:meth:`sam.export.OnnxSamPredictor.fork`)."""
        if self.click_onnx is None:
            from sam import SamPredictor

            return SamPredictor(self.models.get().predictor.model)
        with self._onnx_lock:
            if self._onnx_template is None:
                from sam.export import OnnxSamPredictor

                try:
                    self._onnx_template = OnnxSamPredictor(self.click_onnx)
                except (ImportError, OSError, ValueError) as error:
                    raise ModelLoadError(f"Could not load the ONNX export {self.click_onnx!r}: {error}") from error
            return self._onnx_template.fork()

    @property
    def model_event(self) -> dict[str, Any]:
        """Keyword arguments for every event that runs a model: one job at a time, app-wide."""
        return {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}

    def read_upload(self, path: str | None, what: str = "an image") -> np.ndarray:
        """The uploaded image as ``(H, W, 3)`` uint8 RGB, within the app's pixel limit."""
        import gradio as gr

        if not path:
            raise gr.Error(f"Upload {what} first.", print_exception=False)
        return load_image(path, max_pixels=self.max_pixels)

    @staticmethod
    def user_errors(fn: Callable) -> Callable:
        """Show failures as a short message in the UI; the traceback goes to the server log."""
        import gradio as gr

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except (ValueError, ModelLoadError) as error:
                logger.info("request refused: %s", error)
                raise gr.Error(str(error), print_exception=False) from None
            except Exception as error:
                from langsam.weights import WeightsError

                if isinstance(error, WeightsError):  # models load lazily, so this can come late
                    logger.error("could not load the models: %s", error)
                    raise gr.Error(f"Could not load the models: {error}", print_exception=False) from None
                logger.exception("request failed")
                raise gr.Error(f"{type(error).__name__}: {error}", print_exception=False) from None

        return wrapper
