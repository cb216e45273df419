"""`langsam label review`: the review page, a small FastAPI app of our own served by uvicorn.

Data flow: the page leases an image (lowest confidence first), fetches it and its objects by image
id, and sends every review action with a client-made idempotency key; each action is one call of
the project API (`langsam.label.project.Project`), which applies a key once. A click or a drawn box
is one call of SAM's decoder on the image's cached embedding (`MaskDecoder`): the encoder runs once
per image, when it is leased.

Security: the API key and body-size guard are `langsam serve`'s (`langsam.serve.routes._Guard`);
only the page itself (HTML, JS, CSS: no data) is answered without the key. Images are served by id
through the project, which refuses anything outside its images folder; no route takes a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlsplit

import numpy as np

_INSTALL_HINT = "the review page needs FastAPI and uvicorn: pip install 'langsam[serve]'"
try:
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as error:  # pragma: no cover - the serve extra brings it
    raise ImportError(f"{_INSTALL_HINT} ({error})") from error

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
#: The page's files: the only paths answered without the API key (they hold no project data).
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/review.js": ("review.js", "text/javascript; charset=utf-8"),
    "/static/review.css": ("review.css", "text/css; charset=utf-8"),
}
#: No inline script, nothing from elsewhere: an injected tag could not run even if escaping failed.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DEFAULT_LEASE_TTL_S = 120.0
DEFAULT_CACHE_SIZE = 8
MAX_BODY_BYTES = 1024 * 1024
MAX_POINTS = 64
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
REVIEW_STATUSES = ("proposed", "accepted", "corrected", "rejected", "added")


# ---------------------------------------------------------------------------------------- SAM
class MaskDecoder:
    """SAM's decoder on cached embeddings: `embed` runs the encoder once per image (LRU of
    `cache_size` images), `from_points` / `from_box` are one decoder call each.

    load_predictor: builds the `sam.SamPredictor` (called once, on first use).
    load_image: image id -> (H, W, 3) uint8 RGB in displayed orientation (`langsam.io.load_image`).
    Prompts are in original-image pixels (x, y). Not thread-safe: the server calls it from one thread.
    """

    def __init__(self, load_predictor: Callable[[], Any], load_image: Callable[[int], np.ndarray],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive integer, got {cache_size!r}")
        self._load_predictor = load_predictor
        self._load_image = load_image
        self._predictor: Any = None
        self.cache_size = cache_size
        self._embeddings: OrderedDict[int, tuple[Any, tuple[int, int], tuple[int, int]]] = OrderedDict()

    @property
    def predictor(self) -> Any:
        if self._predictor is None:
            self._predictor = self._load_predictor()
        return self._predictor

    def embed(self, image_id: int) -> None:
        """Make `image_id` the predictor's image: from the cache, or one encoder pass."""
        predictor = self.predictor
        cached = self._embeddings.get(image_id)
        if cached is None:
            predictor.set_image(self._load_image(image_id))
            self._embeddings[image_id] = (predictor.features, predictor.original_size, predictor.input_size)
            while len(self._embeddings) > self.cache_size:
                self._embeddings.popitem(last=False)
            return
        self._embeddings.move_to_end(image_id)
        predictor.set_embedding(*cached)

    def from_points(self, image_id: int, points: list[list[float]],
                    box: list[float] | None = None) -> tuple[np.ndarray, float]:
        """points: [[x, y, label]], label 1 = positive, 0 = negative; box: an optional xyxy prompt
        as well. One point alone is ambiguous, so SAM's three candidates are decoded and the best
        by predicted IoU kept (as SAM's demo does); otherwise a single mask. Returns the (H, W)
        bool mask and its IoU score."""
        coords = np.asarray([point[:2] for point in points], dtype=float)
        labels = np.asarray([point[2] for point in points], dtype=np.int64)
        self.embed(image_id)
        single_point = len(points) == 1 and box is None
        masks, scores, _ = self.predictor.predict(coords, labels, None if box is None else np.asarray(box, float),
                                                  multimask_output=single_point)
        best = int(np.argmax(scores))
        return masks[best], float(scores[best])

    def from_box(self, image_id: int, box: tuple[float, float, float, float]) -> tuple[np.ndarray, float]:
        """box: xyxy in original-image pixels -> the (H, W) bool mask and its IoU score."""
        self.embed(image_id)
        masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=float), multimask_output=False)
        return masks[0], float(scores[0])


def sam_predictor_loader(sam_type: str, sam_checkpoint: str | os.PathLike | None = None,
                         device: Any = None, dtype: Any = None) -> Callable[[], Any]:
    """A function that builds the `SamPredictor` (the checkpoint resolved as `LangSAM` does)."""

    def load() -> Any:
        from langsam.pipeline import resolve_device, resolve_dtype
        from langsam.weights import resolve_sam_checkpoint
        from sam import SamPredictor, build_sam

        checkpoint = resolve_sam_checkpoint(sam_type, sam_checkpoint)
        logger.info("loading SAM %s from %s", sam_type, checkpoint)
        return SamPredictor(build_sam(sam_type, checkpoint=checkpoint), device=resolve_device(device),
                            dtype=resolve_dtype(dtype))

    return load


# --------------------------------------------------------------------------------- encoding
def mask_runs(mask: np.ndarray) -> list[int]:
    """An (H, W) bool mask as row-major run lengths, starting with a run of False (maybe 0)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def _object_json(row: Any) -> dict[str, Any]:
    mask = np.asarray(row.mask, dtype=bool)
    return {
        "id": int(row.id), "image_id": int(row.image_id), "label": row.label, "status": row.status,
        "score": None if row.score is None else float(row.score), "round": row.round,
        "box": None if row.box is None else [float(value) for value in row.box],
        "points": row.points or [], "reviewer": row.reviewer, "reviewed_at": row.reviewed_at,
        "mask": {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "runs": mask_runs(mask)},
    }


# ------------------------------------------------------------------------------ the service
class _Refused(Exception):
    """An answer other than 200: status and a message for the user."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class ReviewService:
    """What the routes do, without HTTP: project calls on one database thread and SAM calls on
    one model thread, so neither blocks the event loop (nor a click waits for the database).

    project: the `langsam.label.Project` (closed by `close()`).
    load_predictor: builds the `sam.SamPredictor` on first use; images reach it through the
    project, by id only.
    lease_ttl_s: seconds a tab holds its image without a renewal (the page renews it every
    third of that while the tab is visible).
    cache_size: image embeddings kept (least recently used dropped first).
    """

    def __init__(self, project: Any, load_predictor: Callable[[], Any],
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if isinstance(lease_ttl_s, bool) or not isinstance(lease_ttl_s, (int, float)) or not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be a positive number of seconds, got {lease_ttl_s!r}")
        self.lease_ttl_s = float(lease_ttl_s)
        self._database = ThreadPoolExecutor(max_workers=1, thread_name_prefix="langsam-review-db")
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="langsam-review-sam")
        self.project = project
        self.classes = list(project.classes)
        self.decoder = MaskDecoder(load_predictor, self.load_image, cache_size)
        self._jpegs: OrderedDict[int, bytes] = OrderedDict()

    # -------------------------------------------------------------------- threads
    async def project_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        function = getattr(self.project, method)
        try:
            return await loop.run_in_executor(self._database, lambda: function(*args, **kwargs))
        except ValueError as error:  # ProjectError: an unknown label or status, an undo of a changed object
            raise _Refused(400, str(error)) from None

    async def model_call(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._model, function, *args)
        except ValueError as error:  # a prompt outside the image, an unreadable image file
            raise _Refused(400, str(error)) from None

    def load_image(self, image_id: int) -> np.ndarray:
        """The image's pixels, read through the project (model thread)."""
        from langsam.io import load_image

        return load_image(self._database.submit(self.project.image_path, image_id).result())

    def prefetch(self, image_id: int) -> None:
        """Encode a just-leased image in the background, so its first click is one decoder call."""

        def run() -> None:
            try:
                self.decoder.embed(image_id)
            except Exception:  # noqa: BLE001 - the click that needs it reports the error
                logger.warning("could not embed image %s ahead of time", image_id, exc_info=True)

        self._model.submit(run)

    def close(self) -> None:
        self._model.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._database.submit(self.project.close).result()
        self._database.shutdown(wait=True)

    # -------------------------------------------------------------------- reads
    async def image_row(self, image_id: int) -> Any:
        return await self._row("image", image_id)

    async def object_row(self, object_id: int) -> Any:
        return await self._row("object", object_id)

    async def _row(self, kind: str, row_id: int) -> Any:
        from langsam.label.project import ProjectError

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._database, getattr(self.project, kind), row_id)
        except ProjectError:
            raise _Refused(404, f"no {kind} with id {row_id} in this project") from None

    async def view(self, image_id: int) -> dict[str, Any]:
        """An image's size and objects (masks as run lengths), and the progress."""
        row = await self.image_row(image_id)
        objects = await self.project_call("objects", image_id)
        return {"image": {"id": int(row.id), "width": row.width, "height": row.height},
                "objects": [_object_json(item) for item in objects], "progress": await self.progress()}

    async def progress(self) -> dict[str, Any]:
        report = await self.project_call("progress")
        return {**report, "per_image": {str(key): list(value) for key, value in report["per_image"].items()}}

    async def jpeg(self, image_id: int) -> bytes:
        data = self._jpegs.get(image_id)
        if data is None:
            await self.image_row(image_id)
            # Not on the model thread: the page shows the image while its embedding is computed.
            loop = asyncio.get_running_loop()
            try:
                data = await loop.run_in_executor(None, lambda: _encode_jpeg(self.load_image(image_id)))
            except ValueError as error:  # outside the images folder, unreadable
                raise _Refused(400, str(error)) from None
            self._jpegs[image_id] = data
            while len(self._jpegs) > self.decoder.cache_size:
                self._jpegs.popitem(last=False)
        return data

    async def rounds(self) -> list[dict[str, Any]]:
        """The trained rounds' figures (no paths: the report's checkpoint paths stay on the server)."""
        from langsam.label.propose import round_dir
        from langsam.label.train import PLOT_NAME, all_reports

        def figures(report: dict[str, Any]) -> dict[str, Any]:
            review, evaluation = report.get("review", {}), report.get("eval", {})
            scores = ("miou_click_1", "miou_box")
            return {
                "round": int(report["round"]),
                "review": {name: review.get(name) for name in ("acceptance_rate", "corrections_per_object",
                                                               "clicks_per_mask", "proposal_miou")},
                "eval": {when: {name: (evaluation.get(when) or {}).get(name) for name in scores}
                         for when in ("before", "after")},
                "plot": (round_dir(self.project, int(report["round"])) / PLOT_NAME).is_file(),
            }

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: [figures(report) for report in all_reports(self.project)])

    async def round_plot(self, round: int) -> bytes:
        from langsam.label.propose import round_dir
        from langsam.label.train import PLOT_NAME

        path = round_dir(self.project, round) / PLOT_NAME
        if round < 1 or not path.is_file():
            raise _Refused(404, f"round {round} has no report plot")
        return path.read_bytes()

    # -------------------------------------------------------------------- leases and actions
    async def hold(self, image_id: int, holder: str) -> None:
        """Actions need the image's live lease: a tab whose lease lapsed (and maybe went to
        another annotator) must not overwrite that annotator's work."""
        if not await self.project_call("renew", image_id, holder, self.lease_ttl_s):
            raise _Refused(409, "this tab no longer holds this image (its lease expired or another annotator "
                                "has it): go to the next image")

    async def lease(self, holder: str, labels: list[str] | None, statuses: list[str] | None,
                    skip: list[int]) -> dict[str, Any]:
        """The queue's next image for this tab (`skip`: the images it moved past)."""
        image_id = await self.project_call("lease_next", holder, self.lease_ttl_s, labels or None, statuses or None,
                                           skip)
        if image_id is None:
            return {"image": None, "objects": [], "progress": await self.progress()}
        self.prefetch(int(image_id))
        return await self.view(int(image_id))

    async def object_action(self, object_id: int, holder: str, method: str, *args: Any) -> dict[str, Any]:
        """accept / reject / relabel: `method(object_id, *args)` under the image's lease."""
        row = await self.object_row(object_id)
        await self.hold(row.image_id, holder)
        await self.project_call(method, object_id, *args)
        return await self.view(row.image_id)

    async def correct(self, object_id: int, holder: str, points: list[list[float]], reviewer: str,
                      key: str) -> dict[str, Any]:
        """The object's clicks so far (the page sends them all) decoded on the cached embedding:
        a retry decodes the same mask, and the project applies its key once."""
        row = await self.object_row(object_id)
        await self.hold(row.image_id, holder)
        # An added object keeps its box as a prompt, so a click refines it instead of starting over.
        box = row.box if row.status == "added" else None
        mask, _ = await self.model_call(self.decoder.from_points, row.image_id, points, box)
        await self.project_call("correct", object_id, mask, points, reviewer, key)
        return await self.view(row.image_id)

    async def add(self, image_id: int, holder: str, label: str, box: list[float], reviewer: str,
                  key: str) -> dict[str, Any]:
        await self.image_row(image_id)
        await self.hold(image_id, holder)
        if label not in self.classes:
            raise _Refused(400, f"label must be one of the project's classes, got {label!r}")
        mask, _ = await self.model_call(self.decoder.from_box, image_id, box)
        await self.project_call("add", image_id, label, mask, box, reviewer, key)
        return await self.view(image_id)

    async def undo(self, image_id: int, holder: str, reviewer: str, key: str) -> dict[str, Any]:
        await self.image_row(image_id)
        await self.hold(image_id, holder)
        await self.project_call("undo", reviewer, key, image_id=image_id)
        return await self.view(image_id)


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- HTTP
class _Body(BaseModel):
    """Request bodies: unknown fields are refused, ids and keys are bounded strings."""

    model_config = ConfigDict(extra="forbid")
    holder: str = Field(min_length=8, max_length=128, description="the tab's random id (its leases)")


class LeaseBody(_Body):
    labels: list[str] | None = None
    statuses: list[str] | None = None
    skip: list[int] = Field(default_factory=list, max_length=100_000)


class HolderBody(_Body):
    image_id: int


class ActionBody(_Body):
    reviewer: str = Field(min_length=1, max_length=128)
    key: str = Field(min_length=8, max_length=128, description="the client's idempotency key")


class RelabelBody(ActionBody):
    label: str = Field(min_length=1, max_length=1000)


class PointsBody(ActionBody):
    points: list[tuple[float, float, Literal[0, 1]]] = Field(min_length=1, max_length=MAX_POINTS)


class AddBody(ActionBody):
    label: str = Field(min_length=1, max_length=1000)
    box: tuple[float, float, float, float]


class UndoBody(ActionBody):
    image_id: int


def build_review_app(service: ReviewService, api_key: str | None = None,
                     max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The ASGI app: FastAPI routes over `service`, behind `langsam serve`'s guard (API key,
    body size) for everything but the page's own files."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="langsam label review", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(part) for part in item.get('loc', ())) or 'body'}: {item.get('msg', 'invalid')}"
                 for item in error.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(_Refused)
    async def refused(request: Request, error: _Refused) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def page_file(file_name: str, media_type: str) -> Callable[[], Any]:
        async def page() -> Response:
            return Response((STATIC_DIR / file_name).read_bytes(), media_type=media_type)

        return page

    for path, (file_name, media_type) in PAGE_FILES.items():
        app.get(path, include_in_schema=False)(page_file(file_name, media_type))

    @app.get("/api/config")
    async def config() -> dict[str, Any]:
        return {"classes": service.classes, "statuses": list(REVIEW_STATUSES), "lease_ttl_s": service.lease_ttl_s}

    @app.get("/api/progress")
    async def progress() -> dict[str, Any]:
        return await service.progress()

    @app.get("/api/rounds")
    async def rounds() -> dict[str, Any]:
        return {"rounds": await service.rounds()}

    @app.get("/api/rounds/{round}/plot")
    async def round_plot(round: int) -> Response:
        return Response(await service.round_plot(round), media_type="image/png")

    @app.post("/api/lease")
    async def lease(body: LeaseBody) -> dict[str, Any]:
        return await service.lease(body.holder, body.labels, body.statuses, body.skip)

    @app.post("/api/renew")
    async def renew(body: HolderBody) -> dict[str, Any]:
        return {"held": bool(await service.project_call("renew", body.image_id, body.holder, service.lease_ttl_s))}

    @app.post("/api/release")
    async def release(body: HolderBody) -> dict[str, Any]:
        await service.project_call("release", body.image_id, body.holder)
        return {"released": True}

    @app.get("/api/images/{image_id}")
    async def image(image_id: int) -> dict[str, Any]:
        return await service.view(image_id)

    @app.get("/api/images/{image_id}/pixels")
    async def pixels(image_id: int) -> Response:
        return Response(await service.jpeg(image_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/objects/{object_id}/accept")
    async def accept(object_id: int, body: ActionBody) -> dict[str, Any]:
        return await service.object_action(object_id, body.holder, "accept", body.reviewer, body.key)

    @app.post("/api/objects/{object_id}/reject")
    async def reject(object_id: int, body: ActionBody) -> dict[str, Any]:
        return await service.object_action(object_id, body.holder, "reject", body.reviewer, body.key)

    @app.post("/api/objects/{object_id}/relabel")
    async def relabel(object_id: int, body: RelabelBody) -> dict[str, Any]:
        return await service.object_action(object_id, body.holder, "relabel", body.label, body.reviewer, body.key)

    @app.post("/api/objects/{object_id}/points")
    async def correct(object_id: int, body: PointsBody) -> dict[str, Any]:
        points = [[float(x), float(y), int(label)] for x, y, label in body.points]
        return await service.correct(object_id, body.holder, points, body.reviewer, body.key)

    @app.post("/api/images/{image_id}/add")
    async def add(image_id: int, body: AddBody) -> dict[str, Any]:
        x0, y0, x1, y1 = body.box
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise _Refused(422, "box: draw a box at least one pixel wide and high")
        return await service.add(image_id, body.holder, body.label, box, body.reviewer, body.key)

    @app.post("/api/undo")
    async def undo(body: UndoBody) -> dict[str, Any]:
        return await service.undo(body.image_id, body.holder, body.reviewer, body.key)

    return _PageGuard(app, api_key, max_body_bytes)


class _PageGuard:
    """`langsam serve`'s guard for every route but the page's own files (a browser loads those
    before it can send a key, and they hold no project data), after two browser-only checks:

    * another site's page must not act for the user (cross-site request forgery: a page
      elsewhere can POST to 127.0.0.1 without reading the answer): a request whose Origin is
      not this server's is refused;
    * without an API key (bound to 127.0.0.1), the Host must be a loopback name, so a DNS
      name rebound to 127.0.0.1 cannot read the project through the user's browser.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        from langsam.serve.routes import _Guard

        self.app = app
        self.keyed = api_key is not None
        self.guarded = _Guard(app, api_key, max_body_bytes)

    def _refusal(self, scope: dict) -> str | None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())}
        host = headers.get("host", "")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != host:
            return "cross-origin request refused: the review page sends its requests from its own origin"
        if not self.keyed and urlsplit(f"//{host}").hostname not in LOOPBACK_NAMES:
            return (f"this server answers only at 127.0.0.1 or localhost without an API key, not at host "
                    f"{host!r}")
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.guarded(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            from fastapi.responses import JSONResponse

            await JSONResponse({"detail": refusal}, status_code=403)(scope, receive, send)
        elif scope.get("method") in ("GET", "HEAD") and scope.get("path") in PAGE_FILES:
            await self.app(scope, receive, send)
        else:
            await self.guarded(scope, receive, send)


def check_binding(host: str | None, port: int, api_key: str | None) -> str:
    """`langsam serve`'s rule, with its errors: 127.0.0.1 unless an API key is set (then 0.0.0.0
    by default). Returns the host. port 0 picks a free port."""
    from langsam.serve.config import ServeConfig

    return ServeConfig(host=host, port=8000 if port == 0 else port, api_key=api_key).host


#: Seconds a stopping server gives the requests in flight to finish (uvicorn's graceful timeout).
SHUTDOWN_GRACE_S = 5.0


class _Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread once uvicorn has drained the requests."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port), with SO_REUSEADDR as uvicorn binds.
    Connections made once it returns wait in the backlog until the server accepts them.
    Raises OSError with the address in its message (a port in use, an unknown interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


class ReviewServer:
    """The review app under uvicorn, in this thread (`run`) or on a background one (`start`).
    The port is bound when it is made, so `url` is known (and a port in use is an OSError)
    before anything is served. A context manager: leaving it stops the server and closes the
    project.

    Stopping (SIGINT, SIGTERM, or `close()`): the port closes at once (new connections are
    refused), the requests in flight get `SHUTDOWN_GRACE_S` seconds to finish, then the
    project is closed. An action still running on the database thread when the grace ends is
    committed or not at all, never half (one transaction)."""

    def __init__(self, service: ReviewService, host: str | None = None, port: int = 8000,
                 api_key: str | None = None) -> None:
        try:
            import fastapi  # noqa: F401 - build_review_app's
            import uvicorn
        except ImportError as error:
            raise ImportError(f"{_INSTALL_HINT} ({error})") from error

        self.host = check_binding(host, port, api_key)
        self.service = service
        config = uvicorn.Config(build_review_app(service, api_key), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._server = uvicorn.Server(config)
        self._socket = _listen(self.host, port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> "ReviewServer":
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="langsam-review-http", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the review server could not start on {self.host} (see the log above)")
            self._thread.join(0.05)
        return self

    def run(self) -> None:
        """Serve in this thread until SIGINT (Ctrl+C) or SIGTERM, then return (see the class)."""
        main = threading.current_thread() is threading.main_thread()
        previous = {}
        if main:  # uvicorn drains on either signal, then raises it again: here, as _Stopped
            previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._server.run(sockets=[self._socket])
        except _Stopped:
            pass
        finally:
            if main:  # a second signal must not interrupt closing the project
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._socket.close()
            self.service.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()
        self.service.close()

    def __enter__(self) -> "ReviewServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: `LangSAM` options the review has no use for (it runs SAM alone); accepted so that a command
#: can pass its model flags through.
_UNUSED_MODEL_OPTIONS = frozenset({"detector", "detector_size", "clip_model", "clip_pretrained"})


def review_sam(project: Any, sam_type: str | None = None,
               sam_checkpoint: str | os.PathLike | None = None) -> tuple[str, str | os.PathLike | None]:
    """(sam_type, sam_checkpoint) the review decodes clicks with: the ones given; else the newest
    trained round's tuned model (the one proposing now); else the pipeline's default SAM."""
    from langsam.label.propose import CHECKPOINT_NAME, round_dir, trained_rounds
    from langsam.pipeline import DEFAULT_SAM_TYPE

    if sam_checkpoint is not None:
        return sam_type or "auto", sam_checkpoint
    if sam_type is not None:
        return sam_type, None
    rounds = trained_rounds(project)
    if rounds:
        return "auto", round_dir(project, rounds[-1]) / CHECKPOINT_NAME
    return DEFAULT_SAM_TYPE, None


def serve_review(project: Any, host: str | None = None, port: int = 8000, api_key: str | None = None,
                 sam_type: str | None = None, sam_checkpoint: str | os.PathLike | None = None,
                 device: Any = None, dtype: Any = None, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
                 cache_size: int = DEFAULT_CACHE_SIZE, predictor: Any = None, block: bool = True,
                 **model_options: Any) -> ReviewServer:
    """Serve the review page of `project` (a `Project`, or its folder) until Ctrl+C.

    host: None binds 127.0.0.1 without an API key and 0.0.0.0 with one (`langsam serve`'s rule;
    another interface needs a key). port: 1024-65535, or 0 for a free one.
    sam_type, sam_checkpoint, device, dtype: the SAM that turns clicks and boxes into masks (as
    `LangSAM`'s; by default the newest trained round's model, see `review_sam`); or pass a built
    `sam.SamPredictor` as predictor. It loads on first use. The detector and CLIP options of
    `LangSAM` are accepted and unused.
    lease_ttl_s: how long a tab keeps its image without renewing (the page renews while shown).
    cache_size: image embeddings kept (SAM 2.1: 16 MiB each in float32).
    block: False starts the server on a background thread and returns it (use as a context
    manager, or call `close()`); True serves until SIGINT (Ctrl+C) or SIGTERM, then returns the
    stopped server (see `ReviewServer` for what a stop keeps). Raises OSError if the port is taken.
    """
    from langsam.label.project import Project

    unknown = sorted(set(model_options) - _UNUSED_MODEL_OPTIONS)
    if unknown:
        raise TypeError(f"serve_review() got unknown option(s) {', '.join(unknown)}")
    host = check_binding(host, port, api_key)
    project = project if isinstance(project, Project) else Project.open(project)
    if predictor is not None:
        load_predictor = lambda: predictor  # noqa: E731
    else:
        sam_type, sam_checkpoint = review_sam(project, sam_type, sam_checkpoint)
        load_predictor = sam_predictor_loader(sam_type, sam_checkpoint, device, dtype)
    service = ReviewService(project, load_predictor, lease_ttl_s, cache_size)
    try:
        server = ReviewServer(service, host, port, api_key)
    except BaseException:  # the port is taken: nothing was served, the project is closed
        service.close()
        raise
    if not block:
        return server.start()
    logger.warning("langsam label review: %s (project %s; Ctrl+C to stop)", server.url, project.path)
    server.run()
    logger.warning("langsam label review: stopped")
    return server
