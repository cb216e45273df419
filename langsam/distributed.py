"""Ray Data: text-prompted segmentation over many images on a cluster.

Ray Data's batch-inference pattern, and nothing more: :class:`ImageWorker` loads the models
once in ``__init__`` and maps a batch of image rows to a batch of result rows in ``__call__``;
``Dataset.map_batches`` runs a fixed pool of them (``ActorPoolStrategy``) and does the
scheduling, streaming, back-pressure, progress bars and retries. A worker process that dies is
restarted by Ray and its unfinished batch runs again on a live worker, so every image yields
exactly one result row; an image that kills its worker every time is given up after
``max_retries`` retries (counted per image by a small :class:`AttemptLedger` actor) and its
row says why.

::

    import ray
    from langsam.distributed import segment_dataset

    images = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    results = segment_dataset(images, ["a dog", "a ball"], workers=8, gpus_per_worker=1)
    results.write_parquet("s3://bucket/langsam/")

Ray is an optional dependency (``pip install "langsam[distributed]"``) and is imported only
when a function here runs; nothing else in langsam imports this module or Ray. The command
line's ``--ray`` runs the same worker class (see :func:`map_images`).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from langsam.io import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "INSTALL_HINT",
    "AttemptLedger",
    "ImageWorker",
    "PipelineBuilder",
    "RayMissingError",
    "WorkerResources",
    "connect",
    "map_images",
    "plan_resources",
    "read_image",
    "require_ray",
    "segment_dataset",
]

INSTALL_HINT = 'pip install "langsam[distributed]"'

#: Columns every result row has, whatever the task: the image id (the input's ``image_id``
#: column, else its path), the path, and for a failed image the reason (``error``), whether
#: the image itself was bad (``error_kind`` ``"image"``), killed its worker process on every
#: attempt (``"crash"``) or its processing failed (``"other"``), the error's class
#: (``error_type``), ``attempts`` (how many times a worker began the image: 1 unless workers
#: died during it), and ``fatal`` when the worker could not load its models (the run cannot
#: go on).
BASE_FIELDS = ("image_id", "path", "error", "error_kind", "error_type", "attempts", "fatal")

#: Retries of an image whose worker process died while processing it (a crash, an
#: out-of-memory kill, a lost node) before the image is reported as failed; Ray Data itself
#: retries a dead worker's batch without limit.
DEFAULT_MAX_RETRIES = 2


class RayMissingError(ImportError):
    """Ray Data is not installed; the message says how to install it."""


def require_ray() -> Any:
    """Import and return ``ray`` (with ``ray.data``), or raise :class:`RayMissingError`."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise RayMissingError(
            f"running on a Ray cluster needs Ray Data, which is not installed ({error}); install it with: "
            f"{INSTALL_HINT}"
        ) from None
    return ray


# ============================================================================================
# The cluster and the worker pool's size
# ============================================================================================


def connect(address: str = "local", *, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Connect this process to Ray; returns True if this call connected (then the caller ends
    the session with ``ray.shutdown()``), False if the process was connected already.

    Args:
        address: ``"local"`` starts a new single-machine cluster (with ``num_cpus`` logical CPUs;
            None: the machine's), ``"auto"`` joins the running one (``RAY_ADDRESS`` or
            ``ray start``), ``"ray://HOST:PORT"`` or ``"HOST:PORT"`` a remote head node.

    Raises:
        RayMissingError: Ray is not installed.
        ConnectionError: no cluster answers at ``address``.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.WARNING}
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)
    return True


@dataclass(frozen=True)
class WorkerResources:
    """How many model replicas run, what each reserves, and how many images each call gets."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    batch_size: int
    #: workers the cluster can hold now; the pool starts with these and grows to ``workers``
    #: if the cluster does (an autoscaling cluster), instead of waiting for all of them.
    min_workers: int = 1


def plan_resources(workers: int | None = None, gpus_per_worker: float | None = None,
                   cpus_per_worker: float | None = None, batch_size: int = 1) -> WorkerResources:
    """Fill unset sizes from the connected cluster: one GPU per worker when it has GPUs, one CPU
    per worker, and as many workers as its GPUs allow (or its CPUs less one, which stays free
    for reading and Ray Data's own tasks).

    Raises:
        ValueError: a size out of range, or more GPUs per worker than the cluster has.
    """
    for name, value, minimum in (("workers", workers, 1), ("gpus_per_worker", gpus_per_worker, 0),
                                 ("cpus_per_worker", cpus_per_worker, 0), ("batch_size", batch_size, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not np.isfinite(value) or value < minimum):
            raise ValueError(f"{name} must be a number of at least {minimum}, got {value!r}")
    if workers is not None and int(workers) != workers or int(batch_size) != batch_size:
        raise ValueError(f"workers and batch_size must be whole numbers, got {workers!r} and {batch_size!r}")
    ray = require_ray()
    cluster = ray.cluster_resources()
    cluster_gpus = float(cluster.get("GPU", 0.0))
    cluster_cpus = float(cluster.get("CPU", 1.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpus >= 1 else 0.0
    if gpus_per_worker > 0 and gpus_per_worker > cluster_gpus:
        raise ValueError(f"gpus_per_worker={gpus_per_worker:g} but the cluster has {cluster_gpus:g} GPUs")
    if cpus_per_worker is None:
        cpus_per_worker = 1.0
    if workers is None:
        if gpus_per_worker > 0:
            workers = int(cluster_gpus // gpus_per_worker)
        else:
            workers = int((cluster_cpus - 1) // cpus_per_worker) if cpus_per_worker > 0 else int(cluster_cpus)
    workers = max(1, int(workers))
    fits = workers
    if cpus_per_worker > 0:
        fits = min(fits, int(cluster_cpus // cpus_per_worker))
    if gpus_per_worker > 0:
        fits = min(fits, int(cluster_gpus // gpus_per_worker))
    if fits < workers:
        logger.warning("the cluster holds %d of the %d workers asked for now (%g CPUs, %g GPUs); the others "
                       "start if it grows", max(fits, 1), workers, cluster_cpus, cluster_gpus)
    return WorkerResources(workers=workers, gpus_per_worker=float(gpus_per_worker),
                           cpus_per_worker=float(cpus_per_worker), batch_size=int(batch_size),
                           min_workers=max(1, fits))


# ============================================================================================
# The worker: models once per process, a batch of rows in, a batch of rows out
# ============================================================================================


class PipelineBuilder:
    """Builds a :class:`~langsam.pipeline.LangSAM` inside a worker and loads the models
    ``mode`` needs (``"grounded"``, ``"hybrid"``, ``"clip"``, or anything else for SAM alone).
    Holds only settings, so it pickles to the cluster; ``model_kwargs`` are ``LangSAM``'s."""

    def __init__(self, mode: str = "grounded", **model_kwargs: Any) -> None:
        self.mode = mode
        self.model_kwargs = dict(model_kwargs)

    def __call__(self) -> Any:
        from langsam.pipeline import LangSAM

        pipeline = LangSAM(**self.model_kwargs)
        pipeline.load_models(self.mode)  # SAM + Grounding DINO, or SAM 3 with model="sam3"
        return pipeline


def read_image(row: Mapping[str, Any], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 RGB image of a dataset row: its ``bytes`` (encoded file
    contents) if present, else the file at ``path``, a local path or a URI pyarrow reads
    (``s3://``, ``gs://``, ``hdfs://``, ``file://``). Local paths go through
    :func:`~langsam.io.load_image` exactly as in a local run.

    Raises:
        ImageLoadError: missing, unreadable, corrupt or too large; the message names the image.
    """
    path = row.get("path")
    name = str(path if path is not None else row.get("image_id", "image"))
    data = row.get("bytes")
    if data is None:
        if path is None:
            raise ImageLoadError(f"{name}: the row has neither a 'path' nor a 'bytes' column")
        if "://" not in str(path):
            return load_image(str(path), max_pixels=max_pixels)
        data = _read_uri(str(path))
    return _decode(bytes(data), name, max_pixels)


def _read_uri(uri: str) -> bytes:
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.readall()
    except (OSError, ValueError) as error:  # pyarrow's ArrowIOError / ArrowInvalid subclass these
        raise ImageLoadError(f"{uri}: cannot read ({error})") from None


def _decode(data: bytes, name: str, max_pixels: int | None) -> np.ndarray:
    """Encoded image bytes -> RGB array, refusing what ``load_image`` refuses for files."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # reads the header only
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise ImageLoadError(
                        f"{name}: image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                        f"more than the limit of {max_pixels} (pass a larger max_pixels to allow it)")
                image.load()
                return load_image(image, max_pixels=max_pixels)
    except ImageLoadError as error:
        raise ImageLoadError(str(error).replace("PIL image", name, 1)) from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({error})") from None


Process = Callable[[Any, np.ndarray, Mapping[str, Any]], Mapping[str, Any]]


class ImageWorker:
    """A Ray Data actor: ``__init__`` builds the pipeline once, ``__call__`` maps a batch.

    Args:
        build: ``() -> pipeline``, run once per worker process (e.g. :class:`PipelineBuilder`).
        process: ``(pipeline, image, row) -> {column: value}`` for one readable image (``image``
            is ``(H, W, 3)`` uint8 RGB, ``row`` the input row); its columns are ``fields``.
        fields: ``[(name, pyarrow type)]`` of ``process``'s columns; with :data:`BASE_FIELDS`
            they make the output schema, fixed so that every batch (empty results included)
            has the same Arrow types and the dataset writes to Parquet as is.
        max_pixels: images above this many pixels are refused (None: no limit).
        threads: torch threads per worker (None: leave Ray's setting).
        ledger, max_retries: an :class:`AttemptLedger` actor and how many times an image may be
            begun again after its worker died during it (None: no ledger, no bound).

    A bad image or a failure on one image becomes that row's ``error``; the batch goes on. A
    pipeline that cannot load becomes ``fatal`` on every row, so the driver stops at once
    instead of Ray restarting a worker that can never start. An image that kills its worker
    process (Ray then restarts the worker and runs the batch again) is begun at most
    ``max_retries + 1`` times; after that its row says so (``error_kind`` ``"crash"``)
    without touching the image again, and the rest of the batch goes on.
    """

    def __init__(self, build: Callable[[], Any], process: Process, fields: Sequence[tuple[str, Any]],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, threads: int | None = None, ledger: Any = None,
                 max_retries: int | None = None) -> None:
        import pyarrow as pa

        _allow_pixels(max_pixels)
        if threads is not None:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        self.process = process
        self.max_pixels = max_pixels
        self.ledger = ledger
        self.max_retries = max_retries
        self.schema = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("error", pa.string()),
                                 ("error_kind", pa.string()), ("error_type", pa.string()), ("attempts", pa.int64()),
                                 ("fatal", pa.string()), *fields])
        self.pipeline = None
        self.load_error: str | None = None
        try:
            self.pipeline = build()
        except (ValueError, RuntimeError, OSError, ImportError) as error:
            self.load_error = f"cannot load the models: {error}"

    def __call__(self, batch: Any) -> Any:
        """``batch``: a ``pyarrow.Table`` of input rows -> a ``pyarrow.Table``, one row each."""
        import pyarrow as pa

        rows = []
        for row in batch.to_pylist():
            path = row.get("path")
            image_id = row.get("image_id")
            result: dict[str, Any] = {
                "image_id": str(image_id if image_id is not None else path),
                "path": None if path is None else str(path),
                "fatal": self.load_error,
            }
            if self.load_error is None:
                result.update(self._attempt(result["image_id"], row))
            rows.append(result)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _attempt(self, key: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """One image's columns, unless workers already died on it more often than allowed."""
        if self.ledger is None or self.max_retries is None:
            return {**self._one(row), "attempts": 1}
        attempt = self._begin(key)
        if attempt > self.max_retries + 1:
            attempt = self.max_retries + 1
            name = row.get("path") or key
            outcome = {"error": f"{name}: the worker process died while processing this image, on each of its "
                                f"{attempt} attempt{'s' if attempt > 1 else ''} (a crash or an out-of-memory kill "
                                f"in decoding or segmenting it); given up after {self.max_retries} "
                                f"retr{'ies' if self.max_retries != 1 else 'y'}",
                       "error_kind": "crash", "error_type": "WorkerDiedError"}
        else:
            outcome = self._one(row)
        self.ledger.end.remote(key)  # ordered before this worker's next begin (one caller, one actor)
        return {**outcome, "attempts": attempt}

    def _begin(self, key: str) -> int:
        import ray

        try:
            return int(ray.get(self.ledger.begin.remote(key)))
        except ray.exceptions.RayError as error:  # the ledger is gone: carry on, unbounded
            logger.warning("cannot count the attempts at %s (%s); retrying it without a bound", key, error)
            return 1

    def _one(self, row: Mapping[str, Any]) -> dict[str, Any]:
        try:
            image = read_image(row, self.max_pixels)
            return dict(self.process(self.pipeline, image, row))
        except ImageLoadError as error:
            return {"error": str(error), "error_kind": "image", "error_type": type(error).__name__}
        except (ValueError, RuntimeError, OSError, MemoryError) as error:
            # A model error on this one image, an unreadable file; the batch goes on.
            return {"error": f"{type(error).__name__}: {error}", "error_kind": "other",
                    "error_type": type(error).__name__}


class AttemptLedger:
    """A Ray actor (see :func:`map_images`): per image id, how many times a worker began the
    image without ending it. A worker that dies mid-image never ends it, so when Ray runs the
    batch again the count says how many processes that image has killed; an image that ends
    (processed or failed normally) starts from zero if it is ever begun again."""

    def __init__(self) -> None:
        self.unfinished: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Count one more attempt at ``key``; returns the attempts not ended, this one included."""
        self.unfinished[key] = self.unfinished.get(key, 0) + 1
        return self.unfinished[key]

    def end(self, key: str) -> None:
        self.unfinished.pop(key, None)


def _start_ledger(ray: Any) -> Any:
    """An :class:`AttemptLedger` actor, on the driver's node where Ray can place it there (a
    worker node may be lost mid-run; the driver's node lives as long as the run)."""
    options: dict[str, Any] = {"num_cpus": 0}
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True)
    except (ImportError, AttributeError, RuntimeError, ValueError):  # a Ray client driver has no node
        pass
    return ray.remote(AttemptLedger).options(**options).remote()


def _allow_pixels(max_pixels: int | None) -> None:
    """Raise Pillow's own bomb guard in this process to ``max_pixels`` (None: off), as the CLI does."""
    from PIL import Image

    if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def map_images(ds: Any, build: Callable[[], Any], process: Process, fields: Sequence[tuple[str, Any]],
               resources: WorkerResources, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_retries: int | None = DEFAULT_MAX_RETRIES) -> Any:
    """``ds.map_batches`` with a fixed pool of :class:`ImageWorker` s (lazy: nothing runs until
    the result is consumed). ``ds`` rows need a ``path`` or a ``bytes`` column; an
    ``image_id`` column is passed through, and should be unique: it names the image to the
    attempt count.

    ``max_retries``: how many times an image whose worker process died during it is begun
    again before its row reports the failure (None: without limit, Ray Data's own behaviour;
    an image that kills every process that touches it then stalls the run)."""
    ray = require_ray()
    max_retries = _check_max_retries(max_retries)
    threads = int(resources.cpus_per_worker) if resources.cpus_per_worker >= 1 else None
    # Ray Data's actor defaults restart a dead worker and run its unfinished batches again
    # without limit (max_restarts=-1, max_task_retries=-1; setting them through map_batches
    # is deprecated since Ray 2.60). The bound is per image instead, kept by the ledger: it
    # also spares the good images of a batch that holds a poison one.
    ledger = _start_ledger(ray) if max_retries is not None else None
    return ds.map_batches(
        ImageWorker,
        fn_constructor_kwargs={"build": build, "process": process, "fields": list(fields),
                               "max_pixels": max_pixels, "threads": threads, "ledger": ledger,
                               "max_retries": max_retries},
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=(ray.data.ActorPoolStrategy(size=resources.workers) if resources.min_workers >= resources.workers
                 else ray.data.ActorPoolStrategy(min_size=resources.min_workers, max_size=resources.workers)),
        num_cpus=resources.cpus_per_worker,
        num_gpus=resources.gpus_per_worker,
    )


def _check_max_retries(max_retries: int | None) -> int | None:
    if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int)
                                    or max_retries < 0):
        raise ValueError(f"max_retries must be a whole number of at least 0 or None, got {max_retries!r}")
    return max_retries


# ============================================================================================
# segment_dataset: the Python API
# ============================================================================================


def _segment_fields() -> list[tuple[str, Any]]:
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])
    return [
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("boxes", pa.list_(pa.list_(pa.float64()))),
        ("scores", pa.list_(pa.float64())),
        ("mask_scores", pa.list_(pa.float64())),
        ("clip_scores", pa.list_(pa.float64())),
        ("segmentation", pa.list_(rle)),
    ]


def segment_row(pipeline: Any, image: np.ndarray, row: Mapping[str, Any], *, text: Sequence[str],
                options: Mapping[str, Any]) -> dict[str, Any]:
    """One image's :meth:`LangSAM.segment` as result columns (see :func:`segment_dataset`)."""
    result = pipeline.segment(image, list(text), **options)
    annotations = result.to_coco(image_id=0) if len(result) else []
    height, width = image.shape[:2]
    return {
        "height": int(height),
        "width": int(width),
        "labels": list(result.labels),
        "boxes": [[float(v) for v in box] for box in result.boxes],
        "scores": [float(v) for v in result.scores],
        "mask_scores": [float(v) for v in result.mask_scores],
        "clip_scores": None if result.clip_scores is None else [float(v) for v in result.clip_scores],
        "segmentation": [annotation["segmentation"] for annotation in annotations],
    }


def segment_dataset(
    ds: Any,
    text: str | Sequence[str],
    *,
    mode: str = "grounded",
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    clip_threshold: float | None = None,
    top_k: int | None = None,
    multimask: bool = False,
    amg_params: Mapping[str, Any] | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    batch_size: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_retries: int | None = DEFAULT_MAX_RETRIES,
    build: Callable[[], Any] | None = None,
    **model_kwargs: Any,
) -> Any:
    """Segment what ``text`` names in every image of a Ray dataset, on the connected cluster.

    Args:
        ds: a ``ray.data.Dataset`` with a ``path`` column (local paths visible to every node, or
            URIs such as ``s3://bucket/a.jpg``) and/or a ``bytes`` column of encoded image files
            (``ray.data.read_binary_files(..., include_paths=True)`` gives both); an optional
            ``image_id`` column names the results (default: the path).
        text, mode, box_threshold, text_threshold, clip_threshold, top_k, multimask, amg_params:
            as in :meth:`langsam.LangSAM.segment`.
        workers, gpus_per_worker, cpus_per_worker: the actor pool (see :func:`plan_resources`;
            unset values come from the cluster). batch_size: images per call of a worker.
        max_pixels: refuse images larger than this (None: no limit).
        max_retries: how many times an image is begun again after its worker process died
            during it (a crash, an out-of-memory kill, a lost node) before its row reports it
            failed (None: without limit). Images need distinct ``image_id`` s (or paths).
        build: ``() -> pipeline`` run once per worker instead of ``LangSAM(**model_kwargs)``.
        **model_kwargs: :class:`~langsam.pipeline.LangSAM` arguments (``sam_type``,
            ``sam_checkpoint``, ``detector``, ``clip_model``, ``clip_pretrained``, ``device``,
            ``dtype``, ``detector_size``); checkpoint paths must be readable on every node.

    Returns:
        A lazy ``ray.data.Dataset`` with one row per input image (in no fixed order):
        ``image_id``, ``path``, ``height``, ``width``, ``labels`` (N), ``boxes`` (N x 4, xyxy in
        input-image pixels), ``scores``, ``mask_scores``, ``clip_scores`` (N, or null without
        CLIP), ``segmentation`` (N COCO RLEs ``{"size": [H, W], "counts": str}``), and for an
        image that failed ``error`` (the reason, naming the image), ``error_kind`` and
        ``error_type``; ``attempts`` counts the workers that began the image (1 unless one died
        during it). Write it with ``write_parquet`` or consume it with ``iter_rows``.

    Raises:
        RayMissingError: Ray is not installed. ValueError: bad text, options or columns.
    """
    from functools import partial

    from langsam.detector import parse_queries
    from langsam.pipeline import LangSAM, check_amg_params
    from langsam.result import MODES

    require_ray()
    queries = parse_queries(text)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold),
                        ("clip_threshold", clip_threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if amg_params is not None and mode != "clip":
        raise ValueError(f"amg_params apply only to mode='clip', not mode={mode!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    unknown = sorted(set(model_kwargs) - set(_langsam_arguments(LangSAM)))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; the model arguments are LangSAM's: "
                         f"{', '.join(_langsam_arguments(LangSAM))}")
    _check_max_retries(max_retries)
    _check_columns(ds)
    options: dict[str, Any] = {"mode": mode, "box_threshold": box_threshold, "text_threshold": text_threshold,
                               "clip_threshold": clip_threshold, "top_k": top_k, "multimask": multimask}
    if amg_params is not None:
        options["amg_params"] = check_amg_params(amg_params)
    resources = plan_resources(workers, gpus_per_worker, cpus_per_worker, batch_size)
    if build is None:
        build = PipelineBuilder(mode, **model_kwargs)
    return map_images(ds, build, partial(segment_row, text=queries, options=options), _segment_fields(),
                      resources, max_pixels, max_retries)


def _langsam_arguments(langsam_class: Any) -> list[str]:
    import inspect

    return [name for name in inspect.signature(langsam_class.__init__).parameters
            if name not in ("self", "sam_model", "detector_model", "clip_scorer", "amg_params")]


def _check_columns(ds: Any) -> None:
    """A ``ValueError`` now, not an error per row later, when ``ds`` has no image column."""
    schema = ds.schema(fetch_if_missing=False)
    if schema is None:  # unknown without running the read; every row will then say what it lacks
        return
    names = set(schema.names)
    if not names & {"path", "bytes"}:
        raise ValueError(f"the dataset needs a 'path' or a 'bytes' column of images, it has: "
                         f"{', '.join(sorted(names)) or 'no columns'}")


def local_cpus(workers: int | None, cpus_per_worker: float | None) -> int:
    """Logical CPUs for a local cluster: the machine's (or what the workers reserve, if more)
    plus one, so Ray Data's reading tasks never wait behind the actors that hold every CPU."""
    wanted = 0 if workers is None else workers * (1.0 if cpus_per_worker is None else cpus_per_worker)
    return int(max(os.cpu_count() or 1, np.ceil(wanted))) + 1
