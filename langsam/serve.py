"""The langsam HTTP API (`langsam serve`), on LitServe.

A LitAPI holds the models (`LangSAM`, its `SamPredictor`) and a store of image embeddings in an
inference worker process; its four verbs are LitServe's:

- `decode_request`: one queued request -> a `Job` (the uploaded bytes decoded to pixels), or a
  `Failure` (a 4xx for that request alone: LitServe fails a whole batch when a hook raises);
- `predict`: a batch of jobs (LitServe's `max_batch_size` / `batch_timeout`) -> one result each.
  `/v1/segment` jobs with the same settings go to `LangSAM.segment_batch` together; new images
  for `/v1/images` go through the SAM encoder together on a GPU (`encoder_batch_size`); every
  `/v1/predict` job is one decoder call on a stored embedding;
- `encode_response`: a result -> `(status, JSON body)`, masks as COCO RLE.

By default one worker serves everything. With `workers=N`, `/v1/segment` and `/v1/auto-masks`
run on N workers (LitServe's workers per device, one process and one set of models each) and
`/v1/images` + `/v1/predict` on one more, which keeps the image store.

The HTTP side is LitServe's FastAPI app. LitServe gives one POST route per LitAPI; this API has
four model endpoints sharing models and one embedding store, so the routes here parse and check
each request, put it on a LitAPI's queue themselves and wait for the answer, and LitServe's own
routes are removed. Around them: `/healthz`, `/v1/models`, `/v1/stats`, the OpenAPI docs
(`/docs`), the optional Gradio demo at `/demo`, a bounded queue (503 with Retry-After when
full), a body-size limit, per-request timeouts (504) and an optional API key
(`LANGSAM_API_KEY`; without one the server listens on 127.0.0.1 only).

No endpoint reads a server-side path or fetches a URL: images arrive as uploaded bytes (multipart)
or base64 in JSON, and are decoded from memory.

Nothing else in langsam imports this module (it needs the `serve` extra: litserve).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import math
import multiprocessing
import os
import secrets
import signal
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, Literal

import litserve as ls
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from langsam.io import IMAGE_FORMATS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "API_KEY_ENV",
    "LangSAMAPI",
    "ServeConfig",
    "api_key_from_env",
    "build_server",
    "decode_image_bytes",
    "serve",
]

API_KEY_ENV = "LANGSAM_API_KEY"
MIN_API_KEY_LENGTH = 16
#: Paths answered without the API key: the health check (for load balancers) and the docs.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
#: LitServe's own routes for the LitAPIs; removed, the /v1 routes feed the queues instead.
_INTERNAL_PATHS = {"all": "/_langsam_internal", "segment": "/_langsam_internal_segment",
                   "interactive": "/_langsam_internal_interactive"}
#: Which LitAPI runs each operation when the server is split (ServeConfig.workers > 1).
_ROLE_OF_OP = {"segment": "segment", "auto_masks": "segment", "set_image": "interactive", "predict": "interactive",
               "stats": "interactive"}
MODEL_PATHS = ("/v1/segment", "/v1/auto-masks", "/v1/images", "/v1/predict")
LOW_RES_SIDE = 256
_LITSERVE_HOSTS = ("127.0.0.1", "0.0.0.0", "::")


# ============================================================================================
# Configuration
# ============================================================================================


def api_key_from_env() -> str | None:
    """The API key from ``LANGSAM_API_KEY`` (None when unset or blank)."""
    value = os.environ.get(API_KEY_ENV, "").strip()
    return value or None


@dataclass
class ServeConfig:
    """Everything `build_server` / `serve` need; checked when made.

    models: `LangSAM` keyword arguments (sam_type, sam_checkpoint, detector, detector_size,
        clip_model, clip_pretrained, device, dtype).
    host: None binds 127.0.0.1 without an API key and 0.0.0.0 with one; another interface needs
        a key. port: 1024-65535.
    api_key: requests must send it as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``.
    max_batch_size, batch_timeout: LitServe batching: up to this many queued requests, waiting at
        most this many seconds for the batch to fill.
    max_queue: requests admitted at once (waiting or running); more get 503 with Retry-After.
    timeout: seconds a request may take, queue included, before it gets 504.
    max_body_bytes: largest request body (413 above). max_pixels: largest image (width * height).
    max_images: embeddings kept for `/v1/predict` (least recently used dropped first).
    workers: inference worker processes for `/v1/segment` and `/v1/auto-masks` (LitServe's
        workers per device), each with its own models. With more than one, `/v1/images` and
        `/v1/predict` get a worker of their own (the image store lives in one process), so
        `workers + 1` copies of the models are loaded; torch_threads then defaults to
        cores // workers. With 1 (the default), one worker serves everything.
    encoder_batch_size: new images (`/v1/images`) encoded per SAM encoder call. None: 1 on the
        CPU (measured: no faster per image, and the activations grow with the batch), the whole
        batch on a GPU.
    demo: mount the Gradio demo at /demo (it loads its own models on its first request).
    torch_threads: CPU threads of the worker's PyTorch (None: PyTorch's default, one per core).
        On a machine shared with other busy processes, fewer threads than cores avoid threads
        waiting on each other (measured: 20x slower decoder calls with 2 threads on 2 loaded cores).
    pipeline_factory: "module:function" called in the worker with `models` as keyword
        arguments instead of `LangSAM(**models)`, for pipelines built in code (injected
        detectors, an `OnnxSamPredictor`, ...). It must return a `LangSAM`.
    """

    models: dict[str, Any] = field(default_factory=dict)
    host: str | None = None
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 8
    batch_timeout: float = 0.01
    max_queue: int = 64
    timeout: float = 60.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 32
    demo: bool = False
    log_level: str = "warning"
    torch_threads: int | None = None
    workers: int = 1
    encoder_batch_size: int | None = None
    pipeline_factory: str | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None:
            if not isinstance(self.api_key, str) or len(self.api_key) < MIN_API_KEY_LENGTH or not self.api_key.isprintable():
                raise ValueError(
                    f"the API key must be at least {MIN_API_KEY_LENGTH} printable characters; make one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        if self.host is None:
            self.host = "0.0.0.0" if self.api_key else "127.0.0.1"
        if self.host not in _LITSERVE_HOSTS:
            raise ValueError(f"host must be one of {', '.join(_LITSERVE_HOSTS)} (LitServe binds only these), "
                             f"got {self.host!r}")
        if self.host != "127.0.0.1" and not self.api_key:
            raise ValueError(f"listening on {self.host} needs an API key: set {API_KEY_ENV} (without one the "
                             "server listens on 127.0.0.1 only)")
        if self.demo and self.api_key:
            raise ValueError(f"the demo cannot send the API key from a browser; serve it without {API_KEY_ENV} "
                             "(127.0.0.1 only) or run 'langsam demo' separately")
        checks = (
            ("port", self.port, 1024, 65535),
            ("max_batch_size", self.max_batch_size, 1, 1024),
            ("max_queue", self.max_queue, 1, 1_000_000),
            ("max_body_bytes", self.max_body_bytes, 1024, 2**40),
            ("max_pixels", self.max_pixels, 1, 2**40),
            ("max_images", self.max_images, 1, 1_000_000),
            ("workers", self.workers, 1, 256),
        )
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        for name, value in (("batch_timeout", self.batch_timeout), ("timeout", self.timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if self.timeout <= self.batch_timeout:
            raise ValueError("timeout must be longer than batch_timeout")
        for name in ("torch_threads", "encoder_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.workers > 1 and self.torch_threads is None:
            # Workers share the cores; each using all of them would make them wait on each other.
            self.torch_threads = max(1, (os.cpu_count() or 1) // self.workers)
        if self.pipeline_factory is not None:
            _resolve_factory(self.pipeline_factory)  # fail here, not in the worker
        unknown = sorted(set(self.models) - {"sam_type", "sam_checkpoint", "detector", "detector_size", "clip_model",
                                              "clip_pretrained", "device", "dtype"})
        if unknown:
            raise ValueError(f"unknown model settings {unknown}")


def _resolve_factory(spec: str) -> Any:
    """"package.module:function" -> the function."""
    import importlib

    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise ValueError(f"pipeline_factory must look like 'package.module:function', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load pipeline_factory {spec!r}: {error}") from None
    if not callable(factory):
        raise ValueError(f"pipeline_factory {spec!r} is not callable")
    return factory


# ============================================================================================
# Request and response schemas (validation and the OpenAPI docs)
# ============================================================================================


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentParams(_Strict):
    """`/v1/segment` settings (the arguments of `LangSAM.segment`)."""

    text: str | list[str] = Field(description="queries separated by '.', or a list of queries")
    mode: Literal["grounded", "hybrid", "clip"] = "grounded"
    box_threshold: float = Field(0.3, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    clip_threshold: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1000)
    multimask: bool = False


class AutoMaskParams(_Strict):
    """`/v1/auto-masks` settings (automatic mask generator parameters; unset ones keep the
    model family's defaults). Bounded so that one request cannot hold the server for long."""

    points_per_side: int | None = Field(None, ge=1, le=64)
    points_per_batch: int | None = Field(None, ge=1, le=256)
    pred_iou_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_offset: float | None = Field(None, ge=0.0, le=10.0)
    box_nms_thresh: float | None = Field(None, ge=0.0, le=1.0)
    crop_n_layers: int | None = Field(None, ge=0, le=2)
    crop_nms_thresh: float | None = Field(None, ge=0.0, le=1.0)
    crop_overlap_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int | None = Field(None, ge=1, le=4)
    min_mask_region_area: int | None = Field(None, ge=0, le=10_000_000)


class PredictParams(_Strict):
    """`/v1/predict`: prompts on an image sent to `/v1/images` (original-image pixels)."""

    image_id: str = Field(min_length=1, max_length=64)
    points: list[tuple[float, float]] | None = Field(None, max_length=64, description="(x, y) clicks")
    labels: list[int] | None = Field(None, max_length=64, description="1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(None, description="x0, y0, x1, y1")
    mask_input: str | None = Field(
        None, description="low-res logits from an earlier answer: base64 of 256x256 float32 little-endian")
    previous_mask: int | None = Field(
        None, ge=0, le=2, description="use candidate k of this image's last /v1/predict answer as mask_input")
    multimask: bool = True
    return_low_res: bool = Field(False, description="also return each candidate's 256x256 logits (base64)")


class ImageJSON(_Strict):
    image: str = Field(description="the image file (PNG, JPEG, WebP, BMP, GIF, TIFF, PPM), base64")


class SegmentJSON(SegmentParams):
    image: str = Field(description="the image file, base64")


class AutoMasksJSON(AutoMaskParams):
    image: str = Field(description="the image file, base64")


class RLE(BaseModel):
    size: list[int] = Field(description="[H, W]")
    counts: str = Field(description="COCO compressed RLE (pycocotools)")


#: Scores are null where the model gives NaN (JSON has no NaN), e.g. the stability of an empty mask.
Score = float | None


class SegmentObject(BaseModel):
    label: str
    score: Score
    mask_score: Score
    clip_score: Score
    box: list[float] = Field(description="x0, y0, x1, y1 in pixels")
    bbox: list[float] = Field(description="COCO x, y, w, h")
    area: float
    segmentation: RLE


class SegmentResponse(BaseModel):
    width: int
    height: int
    mode: str
    objects: list[SegmentObject]


class AutoMask(BaseModel):
    segmentation: RLE
    area: float
    bbox: list[float]
    predicted_iou: Score
    stability_score: Score
    point_coords: list[list[float]]
    crop_box: list[float]


class AutoMasksResponse(BaseModel):
    width: int
    height: int
    masks: list[AutoMask]


class ImageResponse(BaseModel):
    image_id: str
    width: int
    height: int


class PredictResponse(BaseModel):
    image_id: str
    width: int
    height: int
    masks: list[RLE]
    scores: list[Score]
    low_res_masks: list[str] | None = None


class ErrorResponse(BaseModel):
    detail: str


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 503, 504)}


# ============================================================================================
# Decoding uploads
# ============================================================================================


def decode_image_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded image file -> (H, W, 3) uint8 RGB, displayed orientation (as `load_image`).

    Only the formats of `langsam.io.IMAGE_FORMATS` are opened; the size is checked from the
    header before any pixel is decoded. Raises `ImageLoadError` with the reason."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageLoadError("image: the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                if image.width * image.height > max_pixels:
                    raise ImageLoadError(f"image: {image.width}x{image.height} pixels is more than this server's "
                                         f"limit of {max_pixels:,} pixels")
                image.load()
                return load_image(image, max_pixels=max_pixels)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"image: too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"image: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"image: corrupt or truncated ({error})") from None


def _b64decode(text: str, what: str) -> bytes:
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]  # a data URL: data:image/png;base64,....
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _HTTPError(400, f"{what} must be base64 (the file's bytes, not a path or URL)") from None


def _low_res_from_b64(text: str) -> np.ndarray:
    data = _b64decode(text, "mask_input")
    expected = LOW_RES_SIDE * LOW_RES_SIDE * 4
    if len(data) != expected:
        raise _HTTPError(400, f"mask_input must be {LOW_RES_SIDE}x{LOW_RES_SIDE} float32 values ({expected} bytes "
                              f"before base64), got {len(data)} bytes")
    array = np.frombuffer(data, dtype="<f4").reshape(1, LOW_RES_SIDE, LOW_RES_SIDE).astype(np.float32)
    if not np.isfinite(array).all():
        raise _HTTPError(400, "mask_input contains NaN or infinite values")
    return array


# ============================================================================================
# The worker side: the LitAPI
# ============================================================================================


@dataclass
class Job:
    """One request, decoded: `op` is segment, auto_masks, set_image or predict."""

    op: str
    params: dict[str, Any]
    deadline: float
    pixels: np.ndarray | None = None


@dataclass
class Failure:
    """A request's own error, carried through the batch instead of raised (LitServe answers a
    whole batch with the error of any hook that raises)."""

    status: int
    detail: str


@dataclass
class _StoredImage:
    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    low_res: np.ndarray | None = None  # the last /v1/predict answer's (C, 256, 256) logits


class ImageStore:
    """Image id -> embedding for `/v1/predict`, least recently used dropped beyond `capacity`.
    Ids are random, so one client cannot probe for another's images."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, _StoredImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: _StoredImage) -> str:
        image_id = secrets.token_urlsafe(16)
        self._entries[image_id] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> _StoredImage | None:
        entry = self._entries.get(image_id)
        if entry is not None:
            self._entries.move_to_end(image_id)
        return entry


class _WaitingBatchedLoop(BatchedLoop):
    """LitServe's batched loop, except that an idle worker sleeps on the request queue. (The
    stock loop polls the queue every millisecond: measured on the 2-core dev machine, an idle
    server used 7% of a core with it and 0.2% with this one.)"""

    def get_batch_requests(self, lit_api, request_queue, transport):
        try:
            first = request_queue.get(timeout=1.0)
        except Empty:
            return [], []
        if first == _SENTINEL_VALUE:
            raise _StopLoopError()
        batch, timed_out = [], []
        response_queue_id, uid, timestamp, payload = first
        if lit_api.request_timeout not in (-1, False) and time.monotonic() - timestamp > lit_api.request_timeout:
            timed_out.append((response_queue_id, uid))
        else:
            batch.append((response_queue_id, uid, payload))
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(batch) < lit_api.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=remaining) if remaining > 0 else request_queue.get_nowait()
            except Empty:
                break
            if item == _SENTINEL_VALUE:
                request_queue.put(item)  # stop after this batch
                break
            response_queue_id, uid, timestamp, payload = item
            if lit_api.request_timeout not in (-1, False) and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                batch.append((response_queue_id, uid, payload))
        return batch, timed_out


class LangSAMAPI(ls.LitAPI):
    """The four LitAPI verbs on top of `LangSAM` (see the module docstring).

    role: "all" (every operation), or, when the server is split over several workers,
    "segment" (/v1/segment, /v1/auto-masks) or "interactive" (/v1/images, /v1/predict).
    """

    def __init__(self, config: ServeConfig, role: str = "all") -> None:
        batch_size = config.max_batch_size
        if role == "segment":
            # A worker takes a whole batch off the shared queue and runs it alone: split the batch
            # among the workers, or one worker gets every waiting request and the others idle.
            batch_size = max(1, batch_size // config.workers)
        super().__init__(max_batch_size=batch_size, batch_timeout=config.batch_timeout,
                         api_path=_INTERNAL_PATHS[role], loop=_WaitingBatchedLoop())
        self.config = config
        self.role = role
        self.pipeline = None
        self.images: ImageStore | None = None
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}

    def setup(self, device) -> None:
        """Build the pipeline in the worker and load SAM and the detector now, so that a missing
        model stops the server at start instead of failing every request."""
        from langsam.pipeline import LangSAM

        if self.config.torch_threads is not None:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        settings = dict(self.config.models)
        if settings.get("device") is None and device not in (None, "auto"):
            settings["device"] = device
        factory = _resolve_factory(self.config.pipeline_factory) if self.config.pipeline_factory else LangSAM
        self.pipeline = factory(**settings)
        self.pipeline.predictor
        if self.role != "interactive":  # clicks need no detector: it is never loaded there
            detector = self.pipeline.detector
            if hasattr(detector, "load"):
                detector.load()
        self.images = ImageStore(self.config.max_images)
        logger.info("langsam worker ready: %r", self.pipeline)

    def decode_request(self, request):
        """A queued payload {op, params, deadline, image bytes} -> a `Job`, or a `Failure`."""
        pixels = None
        if request.get("image") is not None:
            try:
                pixels = decode_image_bytes(request["image"], self.config.max_pixels)
            except ImageLoadError as error:
                return Failure(400, str(error))
        return Job(request["op"], request["params"], request["deadline"], pixels)

    def predict(self, jobs):
        """One result (or `Failure`) per job, in order."""
        results: list[Any] = [job if isinstance(job, Failure) else None for job in jobs]
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        now = time.monotonic()
        pending = []
        for index, job in enumerate(jobs):
            if isinstance(job, Failure):
                continue
            if now > job.deadline:
                results[index] = Failure(504, "the request timed out while queued")
            else:
                pending.append(index)
        by_op: dict[str, list[int]] = {}
        for index in pending:
            by_op.setdefault(jobs[index].op, []).append(index)
        # New images first: a batch may hold clicks on other images, never on these.
        self._together(self._set_images, jobs, by_op.get("set_image", []), results)
        self._segment(jobs, by_op.get("segment", []), results)
        for index in by_op.get("auto_masks", []):
            self._guarded(self._auto_masks, jobs, [index], results)
        for index in by_op.get("predict", []):
            self._guarded(self._predict_prompts, jobs, [index], results)
        for index in by_op.get("stats", []):
            results[index] = ("stats", {**self.stats, "images_stored": len(self.images)})
        return results

    def encode_response(self, output) -> tuple[int, dict[str, Any]]:
        """A result -> (HTTP status, JSON body)."""
        if isinstance(output, Failure):
            return output.status, {"detail": output.detail}
        kind, payload = output
        return 200, _ENCODERS[kind](payload)

    # ------------------------------------------------------------------ operations
    def _guarded(self, operation, jobs: list, indices: list[int], results: list) -> None:
        """Run `operation` on these jobs; a bad input or a crash fails only them."""
        if not indices:
            return
        try:
            for index, result in zip(indices, operation([jobs[i] for i in indices])):
                results[index] = result
        except ValueError as error:
            for index in indices:
                results[index] = Failure(400, str(error))
        except Exception as error:  # noqa: BLE001 - one request's crash must not take down the others
            logger.exception("request failed in %s", getattr(operation, "__name__", operation))
            for index in indices:
                results[index] = Failure(500, f"internal error ({type(error).__name__}); see the server log")

    def _set_images(self, jobs: list[Job]) -> list:
        import torch

        predictor = self.pipeline.predictor
        chunk = self.config.encoder_batch_size
        if chunk is None:
            chunk = 1 if predictor.device.type == "cpu" else len(jobs)
        encoded = []
        for start in range(0, len(jobs), chunk):
            group = jobs[start : start + chunk]
            if len(group) == 1:
                predictor.set_image(group[0].pixels)
                encoded.append((predictor.features, predictor.original_size, predictor.input_size))
            else:
                encoded.extend(_encode_batch(predictor, [job.pixels for job in group], torch))
        results = []
        for job, (features, original_size, input_size) in zip(jobs, encoded):
            image_id = self.images.add(_StoredImage(features, original_size, input_size))
            height, width = original_size
            results.append(("image", {"image_id": image_id, "width": int(width), "height": int(height)}))
        return results

    def _segment(self, jobs: list, indices: list[int], results: list) -> None:
        """Segment jobs with the same settings go to `segment_batch` together."""
        groups: dict[tuple, list[int]] = {}
        for index in indices:
            settings = tuple(sorted((k, v) for k, v in jobs[index].params.items() if k != "queries"))
            groups.setdefault(settings, []).append(index)
        for group in groups.values():
            self._together(self._segment_group, jobs, group, results)

    def _together(self, operation, jobs: list, indices: list[int], results: list) -> None:
        """Run `operation` on these jobs in one call; if it raises, run each job alone, so that
        only the faulty one fails."""
        if len(indices) <= 1:
            self._guarded(operation, jobs, indices, results)
            return
        try:
            outputs = operation([jobs[i] for i in indices])
        except Exception:  # noqa: BLE001 - find the request at fault
            for index in indices:
                self._guarded(operation, jobs, [index], results)
            return
        for index, output in zip(indices, outputs):
            results[index] = output

    def _segment_group(self, group: list[Job]) -> list:
        settings = {k: v for k, v in group[0].params.items() if k != "queries"}
        segmentations = self.pipeline.segment_batch(
            [job.pixels for job in group], [job.params["queries"] for job in group], **settings
        )
        return [("segment", segmentation) for segmentation in segmentations]

    def _auto_masks(self, jobs: list[Job]) -> list:
        job = jobs[0]
        records = self.pipeline.auto_masks(job.pixels, output_mode="coco_rle", **job.params)
        height, width = job.pixels.shape[:2]
        return [("auto_masks", {"width": width, "height": height, "records": records})]

    def _predict_prompts(self, jobs: list[Job]) -> list:
        params = jobs[0].params
        entry = self.images.get(params["image_id"])
        if entry is None:
            return [Failure(404, f"unknown image_id {params['image_id']!r}: it was never issued, or it was dropped "
                                 f"(the server keeps the {self.images.capacity} most recently used images); "
                                 "POST the image to /v1/images again")]
        mask_input = params.get("mask_input")
        if params.get("previous_mask") is not None:
            if entry.low_res is None or params["previous_mask"] >= len(entry.low_res):
                return [Failure(400, "previous_mask refers to a candidate of an earlier /v1/predict answer on this "
                                     "image, and there is none with that index")]
            mask_input = entry.low_res[params["previous_mask"]][None]
        predictor = self.pipeline.predictor
        predictor.set_embedding(entry.features, entry.original_size, entry.input_size)
        points = params.get("points")
        labels = params.get("labels")
        masks, scores, low_res = predictor.predict(
            point_coords=None if points is None else np.asarray(points, dtype=np.float64),
            point_labels=None if labels is None else np.asarray(labels),
            box=None if params.get("box") is None else np.asarray(params["box"], dtype=np.float64),
            mask_input=mask_input,
            multimask_output=params["multimask"],
        )
        entry.low_res = low_res
        height, width = entry.original_size
        return [("predict", {"image_id": params["image_id"], "width": int(width), "height": int(height),
                             "masks": masks, "scores": scores,
                             "low_res": low_res if params["return_low_res"] else None})]


def _encode_batch(predictor: Any, images: list[np.ndarray], torch: Any) -> list[tuple]:
    """Several images through the SAM encoder in one call -> [(features, (H, W), (h, w))], as
    `predictor.set_image` would store them one by one (the same numbers, measured)."""
    transform = predictor.transform
    sizes, pixels = [], []
    for image in images:
        height, width = image.shape[:2]
        input_size = transform.get_preprocess_shape(height, width, transform.target_length)
        if min(input_size) < 1:
            raise ValueError(f"image of {width}x{height} pixels is too elongated for SAM")
        sizes.append(((height, width), (int(input_size[0]), int(input_size[1]))))
        pixels.append(transform.to_input_tensor(image, predictor.device).to(dtype=predictor.dtype))
    batch = torch.cat(pixels) if len({tensor.shape for tensor in pixels}) == 1 else pixels
    with torch.no_grad():
        features = predictor.model.encode_image(batch)

    def select(value: Any, index: int) -> Any:
        if isinstance(value, dict):
            return {name: select(item, index) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(select(item, index) for item in value)
        return value[index : index + 1].clone()

    return [(select(features, index), original, input_size) for index, (original, input_size) in enumerate(sizes)]


# ----------------------------------------------------------------------------- response bodies


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def _score(value: Any) -> float | None:
    """A score as JSON, which has no NaN: NaN -> null. (An empty automatic mask has stability
    0 / 0 = NaN, in this generator and in Meta's alike.)"""
    value = float(value)
    return value if math.isfinite(value) else None


def _encode_segmentation(result: Any) -> dict[str, Any]:
    height, width = result.image_size
    objects = []
    for index, annotation in enumerate(result.to_coco()):
        objects.append({
            "label": annotation["label"],
            "score": _score(result.scores[index]),
            "mask_score": _score(result.mask_scores[index]),
            "clip_score": None if result.clip_scores is None else _score(result.clip_scores[index]),
            "box": [float(v) for v in result.boxes[index]],
            "bbox": [float(v) for v in annotation["bbox"]],
            "area": float(annotation["area"]),
            "segmentation": annotation["segmentation"],
        })
    return {"width": int(width), "height": int(height), "mode": result.mode, "objects": objects}


def _encode_auto_masks(payload: dict[str, Any]) -> dict[str, Any]:
    masks = []
    for record in payload["records"]:
        rle = record["segmentation"]
        counts = rle["counts"]
        masks.append({
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "area": float(record["area"]),
            "bbox": [float(v) for v in record["bbox"]],
            "predicted_iou": _score(record["predicted_iou"]),
            "stability_score": _score(record["stability_score"]),
            "point_coords": [[float(v) for v in point] for point in record["point_coords"]],
            "crop_box": [float(v) for v in record["crop_box"]],
        })
    return {"width": int(payload["width"]), "height": int(payload["height"]), "masks": masks}


def _encode_prediction(payload: dict[str, Any]) -> dict[str, Any]:
    body = {
        "image_id": payload["image_id"],
        "width": payload["width"],
        "height": payload["height"],
        "masks": [_rle(mask) for mask in payload["masks"]],
        "scores": [_score(score) for score in payload["scores"]],
    }
    if payload["low_res"] is not None:
        body["low_res_masks"] = [
            base64.b64encode(np.ascontiguousarray(logits, dtype="<f4").tobytes()).decode("ascii")
            for logits in payload["low_res"]
        ]
    return body


_ENCODERS = {
    "segment": _encode_segmentation,
    "auto_masks": _encode_auto_masks,
    "image": lambda payload: payload,
    "predict": _encode_prediction,
    "stats": lambda payload: payload,
}


# ============================================================================================
# The HTTP side
# ============================================================================================


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: the API key and the body-size limit, for every route (the demo too)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key" and hmac.compare_digest(value, self.api_key):
                return True
            if name == b"authorization" and value[:7].lower() == b"bearer " and hmac.compare_digest(
                    value[7:].strip(), self.api_key):
                return True
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS and not self._authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            detail = ("missing or wrong API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'")
            await JSONResponse({"detail": detail}, status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse({"detail": f"request body is larger than this server's limit of "
                                            f"{self.max_body_bytes:,} bytes"}, status_code=413)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await too_large(scope, receive, send)


class _Routes:
    """The /v1 endpoints: parse and check a request, queue it for the worker, wait, answer."""

    def __init__(self, server: ls.LitServer, apis: dict[str, LangSAMAPI], config: ServeConfig) -> None:
        self.server = server
        self.apis = apis
        self.config = config
        self.in_flight = 0
        self.latency = 1.0  # moving average of answered requests, seconds (for Retry-After)

    # ------------------------------------------------------------------ queueing
    def _timeout(self, request: Request) -> float:
        """The server's timeout, or the client's shorter one (header X-Request-Timeout, seconds):
        a client that gives up early should not leave work queued."""
        text = request.headers.get("x-request-timeout")
        if text is None:
            return self.config.timeout
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise _HTTPError(400, f"X-Request-Timeout must be a positive number of seconds, got {text!r}")
        return min(value, self.config.timeout)

    async def _run(self, op: str, params: dict[str, Any], image: bytes | None,
                   timeout: float | None = None) -> JSONResponse:
        if self.in_flight >= self.config.max_queue:
            retry = max(1, math.ceil(self.latency * self.in_flight / self.config.max_batch_size))
            return JSONResponse({"detail": f"the server is busy ({self.in_flight} requests queued, the limit); "
                                           f"retry in {retry} s"}, status_code=503,
                                headers={"Retry-After": str(retry)})
        self.in_flight += 1
        started = time.monotonic()
        try:
            status, body = await self._submit(op, params, image, started + (timeout or self.config.timeout),
                                              timeout or self.config.timeout)
        finally:
            self.in_flight -= 1
        if status == 200:
            self.latency = 0.8 * self.latency + 0.2 * (time.monotonic() - started)
        return JSONResponse(body, status_code=status)

    async def _submit(self, op: str, params: dict[str, Any], image: bytes | None,
                      deadline: float, timeout: float) -> tuple[int, dict[str, Any]]:
        server = self.server
        uid = str(uuid.uuid4())
        event = asyncio.Event()
        server.response_buffer[uid] = ResponseBufferItem(event)
        payload = {"op": op, "params": params, "deadline": deadline, "image": image}
        api = self.apis["all"] if "all" in self.apis else self.apis[_ROLE_OF_OP[op]]
        server._get_request_queue(api.api_path).put(
            (server.app.response_queue_id, uid, time.monotonic(), payload)
        )
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            # A late answer finds no buffer entry and is dropped.
            server.response_buffer.pop(uid, None)
            return 504, {"detail": f"the request took longer than its {timeout:g} s timeout"}
        response, status = server.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR:
            detail = getattr(response, "detail", None)
            code = getattr(response, "status_code", 500)
            if code == 504:
                return 504, {"detail": "the request timed out while queued"}
            logger.error("the inference worker failed a request: %r", response)
            return 500, {"detail": str(detail) if detail else "internal error; see the server log"}
        return response

    # ------------------------------------------------------------------ parsing
    async def _image_request(self, request: Request, params_model: type[BaseModel]) -> tuple[bytes, BaseModel]:
        """multipart (an 'image' file + fields) or JSON (base64 'image' + fields) -> bytes, params."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=64)
            except _BodyTooLarge:
                raise
            except Exception as error:  # noqa: BLE001 - starlette raises several kinds on malformed forms
                raise _HTTPError(400, f"malformed multipart body ({error})") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise _HTTPError(400, "the multipart field 'image' must be an uploaded image file")
            data = await upload.read()
            fields: dict[str, Any] = {}
            for key in form.keys():
                if key == "image":
                    continue
                values = form.getlist(key)
                fields[key] = values if key == "text" and len(values) > 1 else values[-1]
        elif content_type.startswith("application/json"):
            body = await self._json(request)
            image = body.pop("image", None)
            if not isinstance(image, str):
                raise _HTTPError(400, "JSON requests need 'image': the image file as base64")
            data = _b64decode(image, "image")
            fields = body
        else:
            raise _HTTPError(415, "send multipart/form-data with an 'image' file, or application/json with a "
                                  "base64 'image'")
        if not data:
            raise _HTTPError(400, "image: the upload is empty (0 bytes)")
        return data, self._validate(params_model, fields)

    @staticmethod
    async def _json(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except _BodyTooLarge:
            raise
        except Exception:  # noqa: BLE001 - JSON and encoding errors
            raise _HTTPError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _HTTPError(400, "the JSON body must be an object")
        return body

    @staticmethod
    def _validate(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
        try:
            return model.model_validate(fields)
        except ValidationError as error:
            raise _HTTPError(422, _validation_message(error)) from None

    async def _answer(self, handler, request: Request) -> JSONResponse:
        try:
            return await handler(request)
        except _HTTPError as error:
            return JSONResponse({"detail": error.detail}, status_code=error.status)

    # ------------------------------------------------------------------ endpoints
    async def segment(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            from langsam.detector import parse_queries

            data, params = await self._image_request(request, SegmentParams)
            try:
                queries = parse_queries(params.text)
            except ValueError as error:
                raise _HTTPError(400, f"text: {error}") from None
            settings = params.model_dump(exclude={"text"})
            return await self._run("segment", {"queries": queries, **settings}, data, self._timeout(request))

        return await self._answer(handle, request)

    async def auto_masks(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            data, params = await self._image_request(request, AutoMaskParams)
            return await self._run("auto_masks", params.model_dump(exclude_none=True), data, self._timeout(request))

        return await self._answer(handle, request)

    async def images(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            data, _ = await self._image_request(request, _Strict)
            return await self._run("set_image", {}, data, self._timeout(request))

        return await self._answer(handle, request)

    async def predict(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            if not request.headers.get("content-type", "").startswith("application/json"):
                raise _HTTPError(415, "send application/json")
            params = self._validate(PredictParams, await self._json(request))
            if params.points is None and params.box is None and params.mask_input is None \
                    and params.previous_mask is None:
                raise _HTTPError(400, "give at least one prompt: points (with labels), a box or a mask")
            if (params.points is None) != (params.labels is None):
                raise _HTTPError(400, "points and labels must be given together")
            if params.points is not None and len(params.points) != len(params.labels):
                raise _HTTPError(400, f"points has {len(params.points)} entries but labels has {len(params.labels)}")
            if params.mask_input is not None and params.previous_mask is not None:
                raise _HTTPError(400, "give mask_input or previous_mask, not both")
            settings = params.model_dump()
            if params.mask_input is not None:
                settings["mask_input"] = _low_res_from_b64(params.mask_input)
            return await self._run("predict", settings, None, self._timeout(request))

        return await self._answer(handle, request)

    async def healthz(self) -> JSONResponse:
        status = self.server.workers_setup_status if hasattr(self.server, "workers_setup_status") else {}
        ready = bool(status) and all(value == WorkerSetupStatus.READY for value in status.values())
        body = {"status": "ok" if ready else "starting",
                "queue": {"in_flight": self.in_flight, "limit": self.config.max_queue}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def models(self) -> JSONResponse:
        return JSONResponse(_models_info(self.config))

    async def stats(self) -> JSONResponse:
        return await self._run("stats", {}, None)


def _public_name(value: Any) -> str | None:
    """A model setting as shown to clients: hub ids as they are, local paths by file name only."""
    if value is None:
        return None
    text = os.fspath(value)
    return os.path.basename(text.rstrip("/")) if os.path.exists(text) else text


def _models_info(config: ServeConfig) -> dict[str, Any]:
    import inspect

    from langsam import __version__
    from langsam.pipeline import LangSAM

    defaults = {name: parameter.default for name, parameter in inspect.signature(LangSAM).parameters.items()}
    models = {**defaults, **config.models}
    return {
        "version": __version__,
        "sam": {"type": models["sam_type"], "checkpoint": _public_name(models["sam_checkpoint"])},
        "detector": _public_name(models["detector"]),
        "clip": {"model": models["clip_model"], "pretrained": _public_name(models["clip_pretrained"])},
        "device": None if models["device"] is None else str(models["device"]),
        "pipeline_factory": config.pipeline_factory,
        "modes": ["grounded", "hybrid", "clip"],
        "endpoints": list(MODEL_PATHS),
        "limits": {"max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels,
                   "max_queue": config.max_queue, "timeout_s": config.timeout, "max_images": config.max_images},
        "batching": {"max_batch_size": config.max_batch_size, "batch_timeout_s": config.batch_timeout,
                     "workers": config.workers, "torch_threads": config.torch_threads},
    }


def _accelerator(device: Any) -> str:
    if device is None:
        return "auto"
    kind = str(device).split(":")[0]
    return kind if kind in ("cpu", "cuda", "mps") else "cpu"


def _request_body(schema: type[BaseModel], multipart_fields: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAPI requestBody: JSON (base64 image) and, for image endpoints, multipart."""
    content: dict[str, Any] = {"application/json": {"schema": schema.model_json_schema()}}
    if multipart_fields is not None:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}, **multipart_fields},
        }}
    return {"requestBody": {"required": True, "content": content}}


def _form_fields(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema().get("properties", {})


def build_server(config: ServeConfig) -> ls.LitServer:
    """The LitServer with langsam's routes (not started; `serve` runs it)."""
    from langsam import __version__

    if config.workers == 1:
        apis = {"all": LangSAMAPI(config)}
        workers = {_INTERNAL_PATHS["all"]: 1}
    else:
        apis = {"segment": LangSAMAPI(config, "segment"), "interactive": LangSAMAPI(config, "interactive")}
        workers = {_INTERNAL_PATHS["segment"]: config.workers, _INTERNAL_PATHS["interactive"]: 1}
    server = _LangSAMServer(
        list(apis.values()), accelerator=_accelerator(config.models.get("device")), devices=1,
        workers_per_device=workers, timeout=config.timeout, model_metadata=_models_info(config),
    )
    # uvicorn's drain on shutdown outlasts every admitted request (answered, or 504 at its deadline).
    server.uvicorn_graceful_timeout = config.timeout + 5
    app = server.app
    app.title = "langsam"
    app.version = __version__
    app.description = (
        "Text-prompted segmentation (Grounding DINO + Segment Anything). Masks are COCO RLE "
        "(`pycocotools.mask.decode`). Images go up as multipart files or base64 in JSON. "
        + ("Every endpoint but /healthz and the docs needs `X-API-Key: KEY` or `Authorization: Bearer KEY`."
           if config.api_key else "")
    )
    # The /v1 routes feed the LitAPIs' queues: LitServe's own single route per LitAPI goes.
    internal = set(_INTERNAL_PATHS.values())
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) not in internal]
    routes = _Routes(server, apis, config)
    app.state.langsam_routes = routes
    app.add_api_route(
        "/v1/segment", routes.segment, methods=["POST"], summary="Segment what the text names",
        response_model=SegmentResponse, responses=_ERRORS,
        openapi_extra=_request_body(SegmentJSON, {**_form_fields(SegmentParams),
                                                  "text": {"type": "string", "description": "queries (repeatable)"}}),
    )
    app.add_api_route(
        "/v1/auto-masks", routes.auto_masks, methods=["POST"], summary="SAM's automatic masks (everything)",
        response_model=AutoMasksResponse, responses=_ERRORS,
        openapi_extra=_request_body(AutoMasksJSON, _form_fields(AutoMaskParams)),
    )
    app.add_api_route(
        "/v1/images", routes.images, methods=["POST"], summary="Embed an image once, for /v1/predict",
        response_model=ImageResponse, responses=_ERRORS, openapi_extra=_request_body(ImageJSON, {}),
    )
    app.add_api_route(
        "/v1/predict", routes.predict, methods=["POST"], summary="Masks for clicks or a box (one decoder call)",
        response_model=PredictResponse, responses=_ERRORS, openapi_extra=_request_body(PredictParams, None),
    )
    app.add_api_route("/healthz", routes.healthz, methods=["GET"], summary="Ready when the models are loaded")
    app.add_api_route("/v1/models", routes.models, methods=["GET"], summary="Models, limits and batching")
    app.add_api_route("/v1/stats", routes.stats, methods=["GET"],
                      summary="Worker counters: batches, requests, largest batch, images stored")
    app.add_exception_handler(Exception, _internal_error)
    app.openapi_schema = None
    if config.demo:
        _mount_demo(app, config)
    app.add_middleware(_Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return server


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Any unexpected error: a JSON 500 like every other answer (Starlette's is plain text)."""
    logger.error("unexpected error answering %s", request.url.path, exc_info=error)
    return JSONResponse({"detail": f"internal error ({type(error).__name__}); see the server log"},
                        status_code=500)


def _mount_demo(app: Any, config: ServeConfig) -> None:
    """The Gradio demo at /demo, with its own lazily loaded models (in the HTTP process)."""
    import gradio as gr

    from langsam.demo import build_app

    settings = {key: value for key, value in config.models.items() if key != "dtype"}
    demo = build_app(settings, max_pixels=config.max_pixels)
    gr.mount_gradio_app(app, demo, path="/demo", max_file_size=config.max_body_bytes)


class _LangSAMServer(ls.LitServer):
    """LitServer, with a shutdown (SIGINT or SIGTERM) that drains the HTTP side first.

    LitServe's own shutdown closes the workers' answer channel before it stops uvicorn, so the
    requests still open then never get an answer; and its main process keeps a copy of the
    listening socket, which goes on accepting connections that nobody reads. Here the port
    closes as soon as the shutdown starts (new connections are refused), the open requests are
    answered by the still running workers, and only then do the workers and the manager stop."""

    def _init_manager(self, num_api_servers):
        # LitServe binds the port before it starts its manager process: a forked manager would
        # inherit the listening socket and keep the port open (accepting, never answering) while
        # it lives. A spawned one starts with no sockets.
        start_method = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method("spawn", force=True)
        try:
            return super()._init_manager(num_api_servers)
        finally:
            multiprocessing.set_start_method(start_method, force=True)

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        workers = super()._start_server(port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type,
                                        **kwargs)
        if uvicorn_worker_type == "process":
            for sock in sockets:  # the HTTP processes hold their own copies
                sock.close()
        return workers

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        processes = [worker for worker in uvicorn_workers.values() if isinstance(worker, multiprocessing.Process)]
        for worker in processes:
            if worker.is_alive():
                worker.terminate()  # uvicorn: stop listening, finish the open requests, exit
        for worker in processes:
            worker.join(self.uvicorn_graceful_timeout + 5)
            if worker.is_alive():
                logger.warning("the HTTP process %s did not stop; killing it", worker.pid)
                worker.kill()
        rest = {key: worker for key, worker in uvicorn_workers.items() if worker not in processes}
        super()._perform_graceful_shutdown(manager, rest, shutdown_reason)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main process where LitServe expects Ctrl+C."""


def _on_sigterm(main_pid: int):
    def handler(signum, frame):
        if os.getpid() != main_pid:  # a process forked from this one before it set its own handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)  # a second TERM must not interrupt the shutdown
        raise _Terminated()

    return handler


def _stop_children(timeout: float = 10.0) -> None:
    """Stop the processes this one started that are still running (a signal during start-up
    leaves LitServe's workers and manager behind)."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


def serve(config: ServeConfig) -> None:
    """Build the server and run it until interrupted (blocks).

    SIGTERM (what `docker stop`, systemd and supervisors send) stops it gracefully, and `serve`
    then returns: the port closes, the requests already admitted are answered, then every
    process of the server exits. Ctrl+C (SIGINT) does the same."""
    server = build_server(config)
    logger.warning("langsam serve: http://%s:%d (docs at /docs)%s", config.host, config.port,
                   "" if config.api_key else "; no API key, listening on 127.0.0.1 only")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    try:
        # uvicorn's own cap on open requests bounds the memory of uploads being read before the
        # queue limit applies (it answers 503 beyond it); the queue limit is the one clients meet.
        server.run(host=config.host, port=config.port, num_api_servers=1, log_level=config.log_level,
                   generate_client_file=False, limit_concurrency=config.max_queue + 32)
    except _Terminated:
        pass  # during start-up: LitServe had not begun its shutdown
    finally:
        _stop_children()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    logger.warning("langsam serve: stopped")
