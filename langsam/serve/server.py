"""The builder: `build_server` (LitServe's server with our routes) and `serve`, with a graceful
shutdown on SIGTERM and Ctrl+C."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import litserve as ls
from pydantic import BaseModel

from langsam.serve.api import LangSAMAPI
from langsam.serve.config import _INTERNAL_PATHS, ServeConfig
from langsam.serve.routes import _Guard, _internal_error, _models_info, _Routes
from langsam.serve.schemas import (
    _ERRORS,
    AutoMaskParams,
    AutoMasksJSON,
    AutoMasksResponse,
    ImageJSON,
    ImageResponse,
    PredictParams,
    PredictResponse,
    SegmentJSON,
    SegmentParams,
    SegmentResponse,
)

logger = logging.getLogger(__name__)

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
