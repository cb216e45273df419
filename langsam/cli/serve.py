"""``langsam serve``: the HTTP API (:mod:`langsam.serve`, on LitServe).

The model options are the shared ones (``--sam-type``, ``--detector``, ... and their
``LANGSAM_*`` variables). The API key is read only from ``LANGSAM_API_KEY``, never from a flag
(command lines are visible to every user of the machine). litserve is an optional extra: it is
imported only when the server starts, and a missing install is one clear message.
"""

from __future__ import annotations

import argparse
import sys

from langsam.cli.options import (
    EXIT_FAILURES,
    EXIT_OK,
    UsageError,
    add_model_arguments,
    model_kwargs_from_args,
    number,
    validate_model_arguments,
)

NAME = "serve"

EPILOG = """\
endpoints (JSON answers, masks as COCO RLE; interactive docs at /docs):
  POST /v1/segment     an image (multipart file or base64 JSON) + text -> objects
  POST /v1/auto-masks  an image -> SAM's automatic masks
  POST /v1/images      an image -> image_id (its embedding is kept)
  POST /v1/predict     image_id + points / box / mask -> masks (the clicks of one batch
                       share decoder calls; LANGSAM_SERVE_FUSE=0: one call each)
  GET  /healthz  /v1/models  /v1/stats

timeouts: --timeout bounds every request; a client may ask for less with the header
'X-Request-Timeout: SECONDS' (504 when exceeded; queued work is skipped).

security: without LANGSAM_API_KEY the server listens on 127.0.0.1 only. With it, every
request but /healthz and the docs must send 'X-API-Key: KEY' (or 'Authorization: Bearer KEY'),
and --host 0.0.0.0 (the default then) opens it to the network.

stopping: Ctrl+C or SIGTERM (docker stop, systemd) closes the port, answers the requests
already admitted, then stops every process of the server.

exit status: 0 stopped normally, 1 the server or its models failed to start, 2 usage error.

examples:
  langsam serve --sam-type vit_b --port 8000
  LANGSAM_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') langsam serve --device cuda
  langsam serve --sam-checkpoint sam_vit_b_01ec64.pth --detector ./grounding-dino-tiny --demo
  curl -F image=@cat.jpg -F text='a cat' http://127.0.0.1:8000/v1/segment
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam serve`` and its options."""
    parser = commands.add_parser(
        NAME, help="serve the HTTP API (LitServe; batching, queue limits, API key)",
        description="Serve text-prompted segmentation over HTTP: /v1/segment, /v1/auto-masks,\n"
                    "/v1/images + /v1/predict, with request batching, a bounded queue and limits.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    network = parser.add_argument_group("network")
    network.add_argument("--host", choices=("127.0.0.1", "0.0.0.0", "::"), default=None,
                         help="interface to listen on; default 127.0.0.1, or 0.0.0.0 when LANGSAM_API_KEY is set "
                              "(any other interface needs the key)")
    network.add_argument("--port", type=number(int, 1024), default=8000, help="port (default 8000)")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch-size", type=number(int, 1), default=8, metavar="N",
                        help="requests the worker takes together (default 8)")
    limits.add_argument("--batch-timeout", type=number(float, 0.0), default=0.01, metavar="S",
                        help="seconds the worker waits for a batch to fill (default 0.01)")
    limits.add_argument("--max-queue", type=number(int, 1), default=64, metavar="N",
                        help="requests admitted at once; more get 503 with Retry-After (default 64)")
    limits.add_argument("--timeout", type=number(float, 0.1), default=60.0, metavar="S",
                        help="seconds a request may take, queue included, before 504 (default 60)")
    limits.add_argument("--max-body-size", type=number(float, 0.001), default=20.0, metavar="MB",
                        help="largest request body in MiB (default 20)")
    limits.add_argument("--max-pixels", type=number(int, 1), default=40_000_000, metavar="N",
                        help="largest image, width x height (default 40 million)")
    limits.add_argument("--max-images", type=number(int, 1), default=32, metavar="N",
                        help="image embeddings kept for /v1/predict, least recently used dropped (default 32)")
    limits.add_argument("--workers", type=number(int, 1), default=1, metavar="N",
                        help="worker processes for /v1/segment and /v1/auto-masks, each with its own models; "
                             "with N > 1, /v1/images and /v1/predict get one more (default 1: one for all)")
    limits.add_argument("--encoder-batch-size", type=number(int, 1), default=None, metavar="N",
                        help="new images per SAM encoder call (default: 1 on the CPU, the whole batch on a GPU)")
    limits.add_argument("--threads", type=number(int, 1), default=None, metavar="N",
                        help="CPU threads of each model worker (default: one per core, divided among --workers); "
                             "fewer on a busy machine")
    add_model_arguments(parser)
    extra = parser.add_argument_group("more")
    extra.add_argument("--demo", action="store_true",
                       help="also mount the Gradio demo at /demo (not with LANGSAM_API_KEY; loads its own models)")
    extra.add_argument("--pipeline-factory", metavar="MODULE:FUNCTION", default=None,
                       help="build the pipeline with this function (called with the model options) instead "
                            "of LangSAM(...)")
    extra.add_argument("-v", "--verbose", action="store_true", help="log requests and model loading")
    parser.set_defaults(handler=run, parser=parser)
    return parser


def config_from_args(args: argparse.Namespace):
    """A :class:`langsam.serve.ServeConfig` from parsed arguments (:class:`UsageError` if invalid)."""
    from langsam.serve import ServeConfig, api_key_from_env

    try:
        return ServeConfig(
            models=model_kwargs_from_args(args),
            host=args.host,
            port=args.port,
            api_key=api_key_from_env(),
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            max_queue=args.max_queue,
            timeout=args.timeout,
            max_body_bytes=int(args.max_body_size * 1024 * 1024),
            max_pixels=args.max_pixels,
            max_images=args.max_images,
            demo=args.demo,
            pipeline_factory=args.pipeline_factory,
            torch_threads=args.threads,
            workers=args.workers,
            encoder_batch_size=args.encoder_batch_size,
            log_level="info" if args.verbose else "warning",
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Run ``langsam serve`` with parsed ``args`` until interrupted; returns the exit status."""
    validate_model_arguments(args.parser, args)
    try:
        import litserve  # noqa: F401
    except ImportError as error:
        print(f"langsam serve: error: the server needs litserve ({error}); install it with: "
              "pip install 'langsam[serve]'", file=sys.stderr)
        return EXIT_FAILURES
    config = config_from_args(args)
    from langsam import serve as server

    try:
        server.serve(config)
    except KeyboardInterrupt:
        return EXIT_OK
    except (RuntimeError, OSError) as error:  # a worker failed to load its models; the port is taken
        print(f"langsam serve: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK
