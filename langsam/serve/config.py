"""`langsam serve`'s configuration: `ServeConfig` (checked when made), the API key and the paths."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

API_KEY_ENV = "LANGSAM_API_KEY"
#: ``LANGSAM_SERVE_FUSE=0`` turns off fused decoder calls for /v1/predict (ServeConfig.fuse_decoder; on by default).
FUSE_ENV = "LANGSAM_SERVE_FUSE"
_FLAG_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}
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


def api_key_from_env() -> str | None:
    """The API key from ``LANGSAM_API_KEY`` (None when unset or blank)."""
    value = os.environ.get(API_KEY_ENV, "").strip()
    return value or None


@dataclass
class ServeConfig:
    """Everything `build_server` / `serve` need; checked when made.

    models: `LangSAM` keyword arguments (sam_type, sam_checkpoint, detector, detector_size,
        clip_model, clip_pretrained, device, dtype, model, sam3_checkpoint).
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
    fuse_decoder: the `/v1/predict` jobs of one batch share mask decoder calls
        (`SamPredictor.predict_fused`: each keeps its own image embedding; jobs whose prompts
        make the same number of tokens go together), with the same answers as one call each.
        None (the default): on, unless the environment has ``LANGSAM_SERVE_FUSE=0``.
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
    fuse_decoder: bool | None = None
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
        if self.fuse_decoder is None:
            text = os.environ.get(FUSE_ENV, "1").strip().lower() or "1"
            if text not in _FLAG_VALUES:
                raise ValueError(f"{FUSE_ENV} must be 1 or 0 (fused decoder calls on or off), got {text!r}")
            self.fuse_decoder = _FLAG_VALUES[text]
        elif not isinstance(self.fuse_decoder, bool):
            raise ValueError(f"fuse_decoder must be True, False or None, got {self.fuse_decoder!r}")
        if self.workers > 1 and self.torch_threads is None:
            # Workers share the cores; each using all of them would make them wait on each other.
            self.torch_threads = max(1, (os.cpu_count() or 1) // self.workers)
        if self.pipeline_factory is not None:
            _resolve_factory(self.pipeline_factory)  # fail here, not in the worker
        unknown = sorted(set(self.models) - {"sam_type", "sam_checkpoint", "detector", "detector_size", "clip_model",
                                              "clip_pretrained", "device", "dtype", "model", "sam3_checkpoint"})
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
