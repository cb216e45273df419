"""The HTTP side: the /v1 routes (parse, check, queue for a worker, wait, answer) and the ASGI
guard (API key, body size)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import math
import os
import time
import uuid
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from pydantic import BaseModel, ValidationError

from langsam.serve.api import LangSAMAPI
from langsam.serve.config import _ROLE_OF_OP, LOW_RES_SIDE, MODEL_PATHS, OPEN_PATHS, ServeConfig
from langsam.serve.schemas import AutoMaskParams, PredictParams, SegmentParams, _Strict

logger = logging.getLogger(__name__)

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
                fields[key] = values if key in ("text", "exemplars") and len(values) > 1 else values[-1]
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
                # SAM 3 exemplar boxes may stand alone: empty text is then no query at all.
                texts = [params.text] if isinstance(params.text, str) else params.text
                no_text = not any(text.strip(" .") for text in texts)
                queries = [] if no_text and params.exemplars else parse_queries(params.text)
            except ValueError as error:
                raise _HTTPError(400, f"text: {error}") from None
            return await self._run("segment", params.job_settings(queries), data, self._timeout(request))

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
        "model": models["model"],
        "sam3": {"checkpoint": _public_name(models["sam3_checkpoint"])},
        "detector": _public_name(models["detector"]),
        "clip": {"model": models["clip_model"], "pretrained": _public_name(models["clip_pretrained"])},
        "device": None if models["device"] is None else str(models["device"]),
        "pipeline_factory": config.pipeline_factory,
        "modes": ["grounded", "hybrid", "clip"],
        "endpoints": list(MODEL_PATHS),
        "limits": {"max_body_bytes": config.max_body_bytes, "max_pixels": config.max_pixels,
                   "max_queue": config.max_queue, "timeout_s": config.timeout, "max_images": config.max_images},
        "batching": {"max_batch_size": config.max_batch_size, "batch_timeout_s": config.batch_timeout,
                     "workers": config.workers, "torch_threads": config.torch_threads,
                     "fuse_decoder": config.fuse_decoder},
    }

async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Any unexpected error: a JSON 500 like every other answer (Starlette's is plain text)."""
    logger.error("unexpected error answering %s", request.url.path, exc_info=error)
    return JSONResponse({"detail": f"internal error ({type(error).__name__}); see the server log"},
                        status_code=500)
