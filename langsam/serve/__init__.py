"""The langsam HTTP API (`langsam serve`), on LitServe.

A LitAPI holds the models (`LangSAM`, its `SamPredictor`) and a store of image embeddings in an
inference worker process; its four verbs are LitServe's:

- `decode_request`: one queued request -> a `Job` (the uploaded bytes decoded to pixels), or a
  `Failure` (a 4xx for that request alone: LitServe fails a whole batch when a hook raises);
- `predict`: a batch of jobs (LitServe's `max_batch_size` / `batch_timeout`) -> one result each.
  `/v1/segment` jobs with the same settings go to `LangSAM.segment_batch` together; new images
  for `/v1/images` go through the SAM encoder together on a GPU (`encoder_batch_size`); the
  `/v1/predict` jobs share mask decoder calls, each on its own stored embedding
  (`SamPredictor.predict_fused`, one call per prompt-token count; `fuse_decoder`, on unless
  ``LANGSAM_SERVE_FUSE=0``), with the answers of one call per job;
- `encode_response`: a result -> `(status, JSON body)`, masks as COCO RLE.

By default one worker serves everything. With `workers=N`, `/v1/segment` and `/v1/auto-masks`
run on N workers (LitServe's workers per device, one process and one set of models each) and
`/v1/images` + `/v1/predict` on one more, which keeps the image store.

The HTTP side is LitServe's FastAPI app. LitServe gives one POST route per LitAPI; this API has
four model endpoints sharing models and one embedding store, so the routes here parse and check
each request, put it on a LitAPI's queue themselves and wait for the answer, and LitServe's own
routes are removed. Around them: `/healthz`, `/v1/models`, `/v1/stats`, the OpenAPI docs
(`/docs`), the optional Gradio demo at `/demo`, a bounded queue (503 with Retry-After when
full), a body-size limit, per-request timeouts (504), an optional API key (`LANGSAM_API_KEY`;
without one the server listens on 127.0.0.1 only) and a graceful shutdown on SIGTERM.

No endpoint reads a server-side path or fetches a URL: images arrive as uploaded bytes (multipart)
or base64 in JSON, and are decoded from memory.

Where things are:

- `config.py`: `ServeConfig` (every setting and limit, checked when made), the API key, paths;
- `schemas.py`: the request and response bodies (pydantic, for validation and the OpenAPI docs)
  and the encoding of results as those bodies (COCO RLE, NaN scores as null);
- `images.py`: decoding uploaded image files, the `ImageStore` of embeddings;
- `api.py`: `LangSAMAPI`, the worker's four verbs, and its batched queue loop;
- `routes.py`: the /v1 routes and the ASGI guard (API key, body size), in the HTTP process;
- `server.py`: `build_server` and `serve` (LitServe's server, our routes, the shutdown).

Nothing else in langsam imports this package (it needs the `serve` extra: litserve).
"""

from langsam.serve.api import Failure, Job, LangSAMAPI
from langsam.serve.config import API_KEY_ENV, ServeConfig, api_key_from_env
from langsam.serve.images import ImageStore, decode_image_bytes
from langsam.serve.server import build_server, serve

__all__ = [
    "API_KEY_ENV",
    "Failure",
    "ImageStore",
    "Job",
    "LangSAMAPI",
    "ServeConfig",
    "api_key_from_env",
    "build_server",
    "decode_image_bytes",
    "serve",
]
