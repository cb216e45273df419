"""The langsam web demo: a Gradio app with three tabs.

1. **Text**: an image and one or more text queries give a :class:`~langsam.result.Segmentation`
   (modes ``grounded``, ``clip``, ``hybrid``), shown as an overlay, a gallery of the objects and
   a table, with the COCO JSON and a zip of the mask PNGs to download.
2. **Click and box**: interactive SAM. The image embedding is computed once when the image is
   uploaded; every click (positive, negative, or two box corners) only runs the mask decoder.
   The three multimask candidates are offered, best score first.
3. **Everything**: the automatic mask generator, with its main parameters as sliders.

Start it with ``langsam demo`` or ``python demos/app.py``; it listens on 127.0.0.1 only.
Models load lazily, on the first request, exactly once. All heavy events share one queue
slot, so two visitors never run two model jobs at the same time. Files the app writes go
into one temporary folder of its own, removed when the process exits.

gradio is imported when the app is built, so ``langsam demo --help`` answers at once and
``import langsam`` never imports it.
"""

import argparse
import atexit
import colorsys
import functools
import inspect
import io
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from langsam.io import atomic_write_bytes, atomic_write_json, load_image, sanitize_name

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_DISPLAY_SIDE",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_PIXELS",
    "build_app",
    "build_parser",
    "launch",
    "main",
    "parse_queries",
]

#: Longest side, in pixels, of the images the app sends back for display. Masks, boxes and
#: the downloads stay at the uploaded image's full resolution.
DEFAULT_MAX_DISPLAY_SIDE = 1280
#: Largest upload Gradio accepts (``launch(max_file_size=...)``).
DEFAULT_MAX_FILE_SIZE = "20mb"
#: Largest image, in pixels, the app decodes (checked from the file header). Lower than the
#: library default because every visitor shares one process.
DEFAULT_MAX_PIXELS = 40_000_000
#: Most objects shown in the gallery (the table and downloads keep all of them).
MAX_GALLERY_ITEMS = 48
#: How many finished requests keep their files in the app's temp folder.
KEEP_REQUESTS = 64

MODES = ("grounded", "clip", "hybrid")
CLICK_POSITIVE, CLICK_NEGATIVE, CLICK_BOX = "positive point", "negative point", "box corner"
# Every event that runs a model joins this concurrency group, so with its limit of 1 only one
# model job runs at a time across all tabs and visitors.
_MODEL_QUEUE = "langsam-model"
_SESSION_TTL_S = 3600

_PIPELINE_KEYS = ("sam_type", "sam_checkpoint", "detector", "clip_model", "clip_pretrained", "device")

PipelineSource = Any  # a LangSAM, a zero-argument factory returning one, or LangSAM kwargs


# --------------------------------------------------------------------------------------------
# Plain helpers (no gradio): parsing, drawing, output files
# --------------------------------------------------------------------------------------------


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


def _display_scale(image_size: tuple[int, int], max_side: int) -> float:
    """Factor (<= 1) that brings ``image_size`` (H, W) within ``max_side`` on its longest side."""
    longest = max(image_size)
    return 1.0 if longest <= max_side else max_side / longest


def _for_display(image: Image.Image, max_side: int) -> Image.Image:
    scale = _display_scale((image.height, image.width), max_side)
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _object_thumbnail(image: np.ndarray, mask: np.ndarray, box: np.ndarray, side: int = 256) -> Image.Image:
    """The object's bounding box (padded by 10%) with everything outside the mask dimmed."""
    height, width = mask.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    pad_x, pad_y = 0.1 * (x1 - x0) + 2, 0.1 * (y1 - y0) + 2
    left, top = max(0, int(x0 - pad_x)), max(0, int(y0 - pad_y))
    right, bottom = min(width, int(np.ceil(x1 + pad_x))), min(height, int(np.ceil(y1 + pad_y)))
    if right <= left or bottom <= top:  # degenerate box: show the whole image
        left, top, right, bottom = 0, 0, width, height
    crop = image[top:bottom, left:right].astype(np.float32)
    inside = mask[top:bottom, left:right, None]
    dimmed = np.where(inside, crop, crop * 0.25 + 255 * 0.15)
    thumbnail = Image.fromarray(np.clip(dimmed, 0, 255).astype(np.uint8))
    thumbnail.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumbnail


def _fmt(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def _object_rows(segmentation: Any) -> list[list[Any]]:
    clip_scores = segmentation.clip_scores
    rows = []
    for index in range(len(segmentation)):
        x0, y0, x1, y1 = (round(float(v), 1) for v in segmentation.boxes[index])
        rows.append([
            index,
            segmentation.labels[index],
            _fmt(segmentation.scores[index]),
            _fmt(segmentation.mask_scores[index]),
            None if clip_scores is None else _fmt(clip_scores[index]),
            x0, y0, x1, y1,
            int(segmentation.masks[index].sum()),
        ])
    return rows


TEXT_TABLE_HEADERS = ["#", "label", "score", "mask score", "clip score", "x0", "y0", "x1", "y1", "area"]
AUTO_TABLE_HEADERS = ["#", "area", "predicted iou", "stability", "x0", "y0", "x1", "y1"]


def coco_dataset(segmentation: Any, file_name: str, image_id: int = 1) -> dict[str, Any]:
    """A complete COCO dataset dict (images, categories, annotations) for one result.

    Categories are the result's distinct labels, numbered from 1 in order of appearance,
    so the file loads with ``pycocotools.coco.COCO``.
    """
    height, width = segmentation.image_size
    category_ids = segmentation.category_ids()
    annotations = segmentation.to_coco(image_id=image_id, category_ids=category_ids)
    for number, annotation in enumerate(annotations, start=1):
        annotation.setdefault("id", number)
    return {
        "info": {"description": "langsam demo", "mode": segmentation.mode},
        "images": [{"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)}],
        "categories": [{"id": cid, "name": name} for name, cid in category_ids.items()],
        "annotations": annotations,
    }


def masks_zip_bytes(segmentation: Any) -> bytes:
    """A zip with one 8-bit PNG (0 / 255) per mask, named ``{index:03d}_{label}.png``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, (mask, label) in enumerate(zip(segmentation.masks, segmentation.labels)):
            name = f"{index:03d}_{sanitize_name(label or 'object', max_len=40)}.png"
            archive.writestr(name, _mask_png_bytes(mask))
    return buffer.getvalue()


def _mask_png_bytes(mask: np.ndarray) -> bytes:
    """An (H, W) bool mask as an 8-bit grayscale PNG holding 0 and 255."""
    png = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(png, format="PNG")
    return png.getvalue()


_POINT_COLORS = {1: (40, 200, 70), 0: (230, 40, 40)}
_CLICK_MASK_COLOR = np.array([30, 144, 255], dtype=np.float32)


def render_click_view(
    image: np.ndarray,
    mask: np.ndarray | None,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    box: Sequence[float] | None,
    pending_corner: Sequence[float] | None,
    max_side: int,
) -> Image.Image:
    """The click tab's view: the image (downscaled to ``max_side``) with the selected mask,
    the prompt points (green positive, red negative), the box and a half-drawn box corner.

    ``points``, ``box`` and ``pending_corner`` are in original-image pixels.
    """
    scale = _display_scale(image.shape[:2], max_side)
    base = _for_display(Image.fromarray(image), max_side)
    if mask is not None:
        view_mask = np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).resize(base.size, Image.Resampling.NEAREST)
        ) > 127
        pixels = np.asarray(base, dtype=np.float32).copy()
        pixels[view_mask] = pixels[view_mask] * 0.45 + _CLICK_MASK_COLOR * 0.55
        base = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(base)
    radius = max(4, round(max(base.size) / 120))
    for (x, y), label in zip(points, labels):
        cx, cy = x * scale, y * scale
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius),
                     fill=_POINT_COLORS[int(label)], outline=(255, 255, 255), width=2)
    if box is not None:
        draw.rectangle([v * scale for v in box], outline=(255, 215, 0), width=max(2, radius // 2))
    if pending_corner is not None:
        cx, cy = pending_corner[0] * scale, pending_corner[1] * scale
        draw.line((cx - 2 * radius, cy, cx + 2 * radius, cy), fill=(255, 215, 0), width=2)
        draw.line((cx, cy - 2 * radius, cx, cy + 2 * radius), fill=(255, 215, 0), width=2)
    return base


# --------------------------------------------------------------------------------------------
# Lazy model holder and per-app output folder
# --------------------------------------------------------------------------------------------


class ModelLoadError(RuntimeError):
    """The models could not be built (missing weights while offline, a bad checkpoint...)."""


class _LazyPipeline:
    """Builds the LangSAM pipeline on first use, exactly once, whatever thread asks first."""

    def __init__(self, source: PipelineSource):
        self._lock = threading.Lock()
        self._pipeline: Any = None
        if source is None:
            source = {}
        if isinstance(source, Mapping):
            unknown = sorted(set(source) - set(_PIPELINE_KEYS))
            if unknown:
                raise ValueError(f"unknown model settings {unknown}; valid ones are {list(_PIPELINE_KEYS)}")
            settings = {key: value for key, value in source.items() if value is not None}
            self._factory: Callable[[], Any] = functools.partial(_new_pipeline, settings)
        elif callable(source) and not hasattr(source, "segment"):
            self._factory = source
        elif hasattr(source, "segment"):
            self._pipeline = source
            self._factory = lambda: source
        else:
            raise TypeError(
                "build_app expects a LangSAM instance, a function that returns one, or a dict "
                f"of LangSAM settings; got {type(source).__name__}"
            )

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def get(self) -> Any:
        if self._pipeline is not None:
            return self._pipeline
        with self._lock:
            if self._pipeline is None:
                logger.info("loading models")
                try:
                    self._pipeline = self._factory()
                except Exception as error:
                    logger.exception("could not load the models")
                    raise ModelLoadError(f"Could not load the models: {error}") from error
        return self._pipeline


def _new_pipeline(settings: dict[str, Any]) -> Any:
    from langsam.pipeline import LangSAM

    return LangSAM(**settings)


class _OutputFolder:
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
class ClickSession:
    """Per-visitor state of the click tab (kept in a ``gr.State``).

    The visitor's own :class:`~sam.predictor.SamPredictor` shares the pipeline's SAM model
    but holds this visitor's image embedding, so clicks of one visitor never see another
    visitor's image. All coordinates are original-image pixels.
    """

    predictor: Any
    image: np.ndarray
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None
    pending_corner: list[float] | None = None
    # Undo stack, oldest first: ("point",) or ("box", the box it replaced).
    history: list[tuple] = field(default_factory=list)
    masks: np.ndarray | None = None  # (3, H, W) bool, best score first
    scores: np.ndarray | None = None  # (3,) predicted IoU, descending
    selected: int = 0

    @property
    def has_prompt(self) -> bool:
        return bool(self.points) or self.box is not None


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _segment_defaults() -> dict[str, float]:
    """Threshold defaults, read from LangSAM.segment so the demo and the library agree."""
    defaults = {"box_threshold": 0.3, "text_threshold": 0.25, "clip_threshold": 0.5}
    try:
        from langsam.pipeline import DEFAULT_CLIP_THRESHOLD, LangSAM

        defaults["clip_threshold"] = float(DEFAULT_CLIP_THRESHOLD)
        parameters = inspect.signature(LangSAM.segment).parameters
    except Exception:  # pipeline not importable: the app still builds, the first run says why
        return defaults
    for name in defaults:
        default = parameters.get(name)
        if default is not None and isinstance(default.default, (int, float)):
            defaults[name] = float(default.default)
    return defaults


def build_app(
    pipeline: PipelineSource = None,
    *,
    max_display_side: int = DEFAULT_MAX_DISPLAY_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    title: str = "langsam",
):
    """Build the demo as a ``gr.Blocks`` (queued, one model job at a time).

    Args:
        pipeline: a :class:`~langsam.pipeline.LangSAM` (or anything with its ``segment``,
            ``predictor`` and ``auto_masks``), a zero-argument function returning one, or a
            dict of LangSAM settings (``sam_type``, ``sam_checkpoint``, ``detector``,
            ``clip_model``, ``clip_pretrained``, ``device``). ``None`` uses the defaults.
            Factories and settings are only called on the first request.
        max_display_side: longest side of images sent back for display.
        max_pixels: largest uploaded image (width * height) the app decodes.

    Launch the result with :func:`launch`, which applies the upload limit and binds to
    127.0.0.1.
    """
    import gradio as gr

    models = _LazyPipeline(pipeline)
    outputs = _OutputFolder()
    defaults = _segment_defaults()

    def user_errors(fn: Callable) -> Callable:
        """Show failures as a short message in the UI; the traceback goes to the server log."""

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

    def read_upload(path: str | None, what: str = "an image") -> np.ndarray:
        if not path:
            raise gr.Error(f"Upload {what} first.", print_exception=False)
        return load_image(path, max_pixels=max_pixels)

    # ----- tab 1: text --------------------------------------------------------------------

    @user_errors
    def run_text(image_path, query_text, mode, box_threshold, text_threshold, clip_threshold, multimask=False,
                 max_objects=0):
        image = read_upload(image_path)
        queries = parse_queries(query_text)
        if not queries:
            raise gr.Error("Type at least one query, e.g. 'cat' or 'cat, dog'.", print_exception=False)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        max_objects = int(max_objects or 0)
        if max_objects < 0:
            raise ValueError(f"max objects must be 0 (all) or more, got {max_objects}")
        segmentation = models.get().segment(
            image, queries, box_threshold=float(box_threshold), text_threshold=float(text_threshold),
            mode=mode, clip_threshold=float(clip_threshold), multimask=bool(multimask),
            top_k=max_objects or None,
        )
        overlay = _for_display(segmentation.overlay(image), max_display_side)
        gallery = [
            (_object_thumbnail(image, segmentation.masks[i], segmentation.boxes[i]),
             f"{i}: {segmentation.labels[i]} {float(segmentation.scores[i]):.2f}")
            for i in range(min(len(segmentation), MAX_GALLERY_ITEMS))
        ]
        # Only the names come from the upload, sanitised; the folder is always our own.
        stem = sanitize_name(Path(image_path).stem, max_len=60)
        file_name = sanitize_name(Path(image_path).name, max_len=80)
        folder = outputs.new_request()
        coco_path = atomic_write_json(folder / f"{stem}.coco.json", coco_dataset(segmentation, file_name))
        zip_path = atomic_write_bytes(folder / f"{stem}_masks.zip", masks_zip_bytes(segmentation))
        found = ", ".join(sorted(set(segmentation.labels))) or "nothing"
        status = f"{len(segmentation)} object(s) in {mode} mode: {found}."
        return overlay, gallery, _object_rows(segmentation), str(coco_path), str(zip_path), status

    # ----- tab 2: click and box -----------------------------------------------------------

    def click_outputs(session: ClickSession | None, status: str):
        if session is None:
            return None, session, gr.update(choices=[], value=None), None, None, status
        mask = None if session.masks is None else session.masks[session.selected]
        view = render_click_view(session.image, mask, session.points, session.labels, session.box,
                                 session.pending_corner, max_display_side)
        if session.masks is None:
            return view, session, gr.update(choices=[], value=None), None, _click_info(session), status
        choices = [(f"#{i + 1}  score {float(s):.3f}", i) for i, s in enumerate(session.scores)]
        folder = outputs.new_request()
        mask_path = atomic_write_bytes(folder / f"mask_{session.selected + 1}.png", _mask_png_bytes(mask))
        return (view, session, gr.update(choices=choices, value=session.selected), str(mask_path),
                _click_info(session), status)

    def _click_info(session: ClickSession) -> dict[str, Any]:
        return {
            "image_size": list(session.image.shape[:2]),
            "points": session.points,
            "labels": session.labels,
            "box": session.box,
            "scores": None if session.scores is None else [float(s) for s in session.scores],
            "selected": session.selected if session.masks is not None else None,
        }

    def decode(session: ClickSession) -> None:
        """Run the mask decoder on the session's prompts (the embedding is already set)."""
        if not session.has_prompt:
            session.masks, session.scores, session.selected = None, None, 0
            return
        point_coords = np.array(session.points, dtype=np.float32) if session.points else None
        point_labels = np.array(session.labels, dtype=np.int64) if session.points else None
        box = np.array(session.box, dtype=np.float32) if session.box is not None else None
        masks, scores, _ = session.predictor.predict(
            point_coords=point_coords, point_labels=point_labels, box=box, multimask_output=True
        )
        order = np.argsort(-scores, kind="stable")
        session.masks, session.scores, session.selected = masks[order], scores[order], 0

    @user_errors
    def click_set_image(image_path):
        image = read_upload(image_path)
        from sam import SamPredictor

        # A predictor of this visitor's own around the shared model: it keeps this image's
        # embedding however many other visitors upload images meanwhile.
        predictor = SamPredictor(models.get().predictor.model)
        predictor.set_image(image)  # the one encoder run for this image
        session = ClickSession(predictor=predictor, image=image)
        height, width = image.shape[:2]
        return click_outputs(session, f"Image embedded ({width}x{height}). Click on the image to add points.")

    def require_session(session: ClickSession | None) -> ClickSession:
        if session is None:
            raise gr.Error("Upload an image in this tab first.", print_exception=False)
        return session

    def add_prompt(session: ClickSession, x: float, y: float, kind: str) -> str:
        height, width = session.image.shape[:2]
        if not (np.isfinite(x) and np.isfinite(y)):
            raise ValueError("the point needs finite x and y coordinates")
        x, y = min(max(float(x), 0.0), width - 1.0), min(max(float(y), 0.0), height - 1.0)
        if kind == CLICK_BOX:
            if session.pending_corner is None:
                session.pending_corner = [x, y]
                return "First box corner set; click the opposite corner."
            (x0, y0), session.pending_corner = session.pending_corner, None
            session.history.append(("box", session.box))
            session.box = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
            return "Box set."
        if kind not in (CLICK_POSITIVE, CLICK_NEGATIVE):
            raise ValueError(f"unknown click mode {kind!r}")
        session.points.append([x, y])
        session.labels.append(1 if kind == CLICK_POSITIVE else 0)
        session.history.append(("point",))
        return f"{kind.capitalize()} at ({x:.0f}, {y:.0f})."

    # No `from __future__ import annotations` in this module: gradio finds the event-data
    # parameter by its annotation, which must be the real class (gradio is imported above).
    @user_errors
    def click_select(session, kind, evt: gr.SelectData):
        session = require_session(session)
        # evt.index is in the displayed (possibly downscaled) image's pixels.
        scale = _display_scale(session.image.shape[:2], max_display_side)
        x, y = (float(v) / scale for v in evt.index[:2])
        status = add_prompt(session, x, y, kind)
        decode(session)
        return click_outputs(session, status)

    @user_errors
    def click_add_point(session, x, y, kind):
        session = require_session(session)
        if x is None or y is None:
            raise ValueError("enter both x and y")
        status = add_prompt(session, x, y, kind)
        decode(session)
        return click_outputs(session, status)

    @user_errors
    def click_set_box(session, x0, y0, x1, y1):
        session = require_session(session)
        values = [x0, y0, x1, y1]
        session.history.append(("box", session.box))
        if any(v is None for v in values):
            session.box = None
            status = "Box cleared."
        else:
            height, width = session.image.shape[:2]
            x0, x1 = sorted(min(max(float(v), 0.0), width - 1.0) for v in (x0, x1))
            y0, y1 = sorted(min(max(float(v), 0.0), height - 1.0) for v in (y0, y1))
            session.box = [x0, y0, x1, y1]
            status = "Box set."
        session.pending_corner = None
        decode(session)
        return click_outputs(session, status)

    @user_errors
    def click_undo(session):
        session = require_session(session)
        if session.pending_corner is not None:
            session.pending_corner = None
        elif session.history:
            action = session.history.pop()
            if action[0] == "point":
                session.points.pop()
                session.labels.pop()
            else:
                session.box = action[1]
        decode(session)
        return click_outputs(session, "Undone.")

    @user_errors
    def click_clear(session):
        session = require_session(session)
        session.points, session.labels, session.box, session.pending_corner = [], [], None, None
        session.history.clear()
        decode(session)
        return click_outputs(session, "Prompts cleared.")

    @user_errors
    def click_choose(session, candidate):
        session = require_session(session)
        if session.masks is None:
            raise gr.Error("Click on the image first.", print_exception=False)
        if candidate is None or not 0 <= int(candidate) < len(session.masks):
            raise ValueError(f"candidate must be between 0 and {len(session.masks) - 1}")
        session.selected = int(candidate)
        return click_outputs(session, f"Candidate #{session.selected + 1} selected.")

    # ----- tab 3: everything --------------------------------------------------------------

    @user_errors
    def run_auto(image_path, points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh,
                 crop_n_layers):
        image = read_upload(image_path)
        records = models.get().auto_masks(
            image,
            points_per_side=int(points_per_side),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            box_nms_thresh=float(box_nms_thresh),
            crop_n_layers=int(crop_n_layers),
        )
        records = sorted(records, key=lambda r: -int(r["area"]))
        overlay = _for_display(auto_overlay(image, [r["segmentation"] for r in records]), max_display_side)
        rows = []
        for index, record in enumerate(records):
            x, y, w, h = (round(float(v), 1) for v in record["bbox"])
            rows.append([index, int(record["area"]), _fmt(record["predicted_iou"]),
                         _fmt(record["stability_score"]), x, y, round(x + w, 1), round(y + h, 1)])
        return overlay, rows, f"{len(records)} mask(s)."

    # ----- layout -------------------------------------------------------------------------

    model_event = {"concurrency_id": _MODEL_QUEUE, "concurrency_limit": 1}

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}\nText-prompted segmentation with Grounding DINO, SAM and CLIP. "
                    "Models load on the first request.")
        with gr.Tab("Text"):
            with gr.Row():
                with gr.Column():
                    text_image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                          elem_id="text-image")
                    text_queries = gr.Textbox(label="Queries", placeholder="cat, dog (comma or one per line)",
                                              elem_id="text-queries")
                    text_mode = gr.Radio(list(MODES), value="grounded", label="Mode",
                                         info="grounded: detector boxes to SAM; clip: automatic masks ranked by "
                                              "CLIP; hybrid: detector boxes to SAM, re-scored by CLIP")
                    with gr.Accordion("Thresholds", open=False):
                        text_box_threshold = gr.Slider(0.0, 1.0, value=defaults["box_threshold"], step=0.01,
                                                       label="Box threshold (grounded, hybrid)")
                        text_text_threshold = gr.Slider(0.0, 1.0, value=defaults["text_threshold"], step=0.01,
                                                        label="Text threshold (grounded, hybrid)")
                        text_clip_threshold = gr.Slider(0.0, 1.0, value=defaults["clip_threshold"], step=0.01,
                                                        label="CLIP threshold (clip, hybrid)")
                        text_multimask = gr.Checkbox(False, label="Multimask: best of 3 SAM masks per box")
                        text_max_objects = gr.Number(0, precision=0, minimum=0, label="Max objects (0: all)",
                                                     elem_id="text-max-objects")
                    text_run = gr.Button("Run", variant="primary", elem_id="text-run")
                with gr.Column():
                    text_overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False,
                                            elem_id="text-overlay")
                    text_status = gr.Markdown(elem_id="text-status")
            text_gallery = gr.Gallery(label="Objects", columns=8, height=220, object_fit="contain", fit_columns=False,
                                      format="png")
            text_table = gr.Dataframe(headers=TEXT_TABLE_HEADERS, label="Objects", interactive=False)
            with gr.Row():
                text_coco = gr.File(label="COCO JSON", interactive=False)
                text_zip = gr.File(label="Mask PNGs (zip)", interactive=False)
            text_inputs = [text_image, text_queries, text_mode, text_box_threshold, text_text_threshold,
                           text_clip_threshold, text_multimask, text_max_objects]
            text_outputs = [text_overlay, text_gallery, text_table, text_coco, text_zip, text_status]
            text_run.click(run_text, text_inputs, text_outputs, api_name="segment_text", **model_event)
            text_queries.submit(run_text, text_inputs, text_outputs, api_name=False, **model_event)

        with gr.Tab("Click and box"):
            click_state = gr.State(None, time_to_live=_SESSION_TTL_S)
            gr.Markdown("Upload an image (its embedding is computed once), then click on the result "
                        "image. Each click only runs the mask decoder. In box mode two clicks give "
                        "opposite corners.")
            with gr.Row():
                with gr.Column():
                    click_image = gr.Image(label="Image", type="filepath", image_mode=None,
                                           sources=["upload", "clipboard"], elem_id="click-image")
                    click_mode = gr.Radio([CLICK_POSITIVE, CLICK_NEGATIVE, CLICK_BOX], value=CLICK_POSITIVE,
                                          label="Click adds")
                    with gr.Row():
                        click_undo_button = gr.Button("Undo")
                        click_clear_button = gr.Button("Clear")
                    with gr.Accordion("Coordinates (original image pixels)", open=False):
                        with gr.Row():
                            point_x = gr.Number(label="x")
                            point_y = gr.Number(label="y")
                        click_point_button = gr.Button("Add point")
                        with gr.Row():
                            box_x0 = gr.Number(label="x0")
                            box_y0 = gr.Number(label="y0")
                            box_x1 = gr.Number(label="x1")
                            box_y1 = gr.Number(label="y1")
                        click_box_button = gr.Button("Set box (empty fields clear it)")
                with gr.Column():
                    click_view = gr.Image(label="Click here", type="pil", format="png", interactive=False,
                                          elem_id="click-view")
                    click_candidate = gr.Radio([], label="Candidate masks (best score first)", elem_id="click-candidates")
                    click_status = gr.Markdown(elem_id="click-status")
                    click_mask_file = gr.File(label="Selected mask (PNG)", interactive=False)
                    click_info = gr.JSON(label="Prompts and scores")
            click_outputs_list = [click_view, click_state, click_candidate, click_mask_file, click_info, click_status]
            click_image.upload(click_set_image, [click_image], click_outputs_list,
                               api_name="click_set_image", **model_event)
            # Removing the image ends the session (and frees its embedding).
            click_image.clear(lambda: click_outputs(None, ""), None, click_outputs_list, api_name=False)
            click_view.select(click_select, [click_state, click_mode], click_outputs_list,
                              api_name=False, **model_event)
            click_point_button.click(click_add_point, [click_state, point_x, point_y, click_mode],
                                     click_outputs_list, api_name="click_add_point", **model_event)
            click_box_button.click(click_set_box, [click_state, box_x0, box_y0, box_x1, box_y1],
                                   click_outputs_list, api_name="click_set_box", **model_event)
            click_undo_button.click(click_undo, [click_state], click_outputs_list,
                                    api_name="click_undo", **model_event)
            click_clear_button.click(click_clear, [click_state], click_outputs_list,
                                     api_name="click_clear", **model_event)
            click_candidate.input(click_choose, [click_state, click_candidate], click_outputs_list,
                                  api_name="click_choose")

        with gr.Tab("Everything"):
            with gr.Row():
                with gr.Column():
                    auto_image = gr.Image(label="Image", type="filepath", image_mode=None,
                                          sources=["upload", "clipboard"], elem_id="auto-image")
                    auto_points = gr.Slider(1, 64, value=16, step=1, label="Points per side")
                    auto_iou = gr.Slider(0.0, 1.0, value=0.88, step=0.01, label="Predicted IoU threshold")
                    auto_stability = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="Stability score threshold")
                    auto_nms = gr.Slider(0.0, 1.0, value=0.7, step=0.01, label="Box NMS threshold")
                    auto_crops = gr.Slider(0, 2, value=0, step=1, label="Crop layers")
                    auto_run = gr.Button("Generate masks", variant="primary", elem_id="auto-run")
                with gr.Column():
                    auto_view = gr.Image(label="Masks", type="pil", format="png", interactive=False,
                                            elem_id="auto-overlay")
                    auto_status = gr.Markdown()
            auto_table = gr.Dataframe(headers=AUTO_TABLE_HEADERS, label="Masks", interactive=False)
            auto_run.click(
                run_auto, [auto_image, auto_points, auto_iou, auto_stability, auto_nms, auto_crops],
                [auto_view, auto_table, auto_status], api_name="auto_masks", **model_event,
            )

    app.queue(default_concurrency_limit=1)
    app.langsam_output_dir = outputs.root  # for tests and logs: everything the app writes is under it
    return app


def auto_overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """The image with each automatic mask tinted in its own colour, largest first so small
    masks stay visible on top, and each mask's outline drawn in white."""
    pixels = image.astype(np.float32)
    outline = np.zeros(image.shape[:2], dtype=bool)
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        # Golden-ratio hue steps give neighbouring masks clearly different colours.
        hue = (index * 0.618033988749895) % 1.0
        color = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.95), dtype=np.float32) * 255
        pixels[mask] = pixels[mask] * (1 - alpha) + color * alpha
        edge = mask.copy()
        edge[1:-1, 1:-1] = mask[1:-1, 1:-1] & ~(
            mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        )
        outline |= edge
    pixels[outline] = 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------


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
    from langsam.cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: first free one from 7860)")
    parser.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE,
                        help=f"largest upload, e.g. 20mb (default {DEFAULT_MAX_FILE_SIZE})")
    parser.add_argument("--max-display-side", type=int, default=DEFAULT_MAX_DISPLAY_SIDE,
                        help="longest side of the images shown in the browser")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``langsam demo`` and ``python demos/app.py``."""
    from langsam.cli import model_kwargs_from_args, validate_model_arguments

    parser = build_parser()
    args = parser.parse_args(argv)
    validate_model_arguments(parser, args)
    if args.max_display_side < 64:
        parser.error(f"--max-display-side must be at least 64, got {args.max_display_side}")
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
    app = build_app(model_kwargs_from_args(args), max_display_side=args.max_display_side)
    launch(app, server_name=args.host, server_port=args.port, max_file_size=args.max_file_size)
    return 0
