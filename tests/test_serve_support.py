"""Helpers for tests/test_serve.py (no tests here): a server runner and a micro pipeline.

`python tests/test_serve_support.py CONFIG_JSON` runs `langsam.serve.serve(ServeConfig(**CONFIG))`
until SIGINT (LitServe spawns its worker, so the runner needs the `__main__` guard).

`soak` sends mixed requests from concurrent clients to a served instance (the load test
runs a few hundred; `benchmarks/bench_serve.py --soak` 2,000).

`make_micro_pipeline` builds, in the server's worker, a `LangSAM` whose SAM is far smaller than
the tiny checkpoint models (a 32-wide decoder instead of SAM's 256-wide one) and whose detector
returns fixed boxes. The load test uses it to send hundreds of requests in seconds on two CPU
cores; what it checks (queueing, batching, errors, memory) does not depend on the model size.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


GATE_ENV = "LANGSAM_TEST_GATE"


class FixedBoxes:
    """A detector that finds every query at fixed fractions of the image (two boxes).

    While the file named by $LANGSAM_TEST_GATE exists, `detect` waits (at most a minute): the
    queue test holds the worker with it, so that requests pile up without any timing guesswork.
    """

    BOXES = ((0.1, 0.1, 0.6, 0.7), (0.4, 0.3, 0.95, 0.9))

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        from langsam.detector import Detections, parse_queries

        gate = os.environ.get(GATE_ENV)
        deadline = time.monotonic() + 60
        while gate and os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)

        queries = parse_queries(queries)
        height, width = np.asarray(image).shape[:2]
        boxes = np.array([[x0 * width, y0 * height, x1 * width, y1 * height] for x0, y0, x1, y1 in self.BOXES],
                         dtype=np.float32)
        labels = [queries[index % len(queries)] for index in range(len(boxes))]
        return Detections(boxes, np.array([0.9, 0.8], np.float32), labels, np.arange(len(boxes)) % len(queries),
                          list(labels), list(queries))


def make_micro_sam(seed: int = 0, empty_candidate: int | None = None):
    """A random SAM 1 at the real 1024-px input with a 16-wide encoder and a 32-wide decoder.

    empty_candidate: k in 1..3 makes the k-th multimask candidate empty for every prompt (its
    logits are -15 everywhere), so that its stability score is 0 / 0 = NaN; the others stay random."""
    import torch

    from sam.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from sam.sam1 import ImageEncoderViT, Sam
    from sam_factory import randomize_parameters

    torch.manual_seed(seed)
    width = 32
    encoder = ImageEncoderViT(embed_dim=16, depth=1, num_heads=1, out_chans=width, window_size=14,
                              global_attn_indexes=(0,))
    prompt_encoder = PromptEncoder(embed_dim=width, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                   mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=width,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=width, num_heads=2, mlp_dim=64),
                          iou_head_hidden_dim=width)
    sam = randomize_parameters(Sam(encoder, prompt_encoder, decoder), seed).eval()
    if empty_candidate is not None:
        with torch.no_grad():
            # Channel 0 of the upscaled embedding becomes GELU(3) ~ 3 everywhere; candidate k
            # reads only that channel, with weight -5.
            last_upscaling = sam.mask_decoder.output_upscaling[3]
            last_upscaling.weight[:, 0] = 0.0
            last_upscaling.bias[0] = 3.0
            hypernetwork = sam.mask_decoder.output_hypernetworks_mlps[empty_candidate].layers[-1]
            hypernetwork.weight.zero_()
            hypernetwork.bias.zero_()
            hypernetwork.bias[0] = -5.0
    return sam


def make_micro_pipeline(**settings):
    """`ServeConfig.pipeline_factory` for the load test: micro SAM + fixed boxes."""
    from langsam.pipeline import LangSAM

    return LangSAM(sam_model=make_micro_sam(), detector_model=FixedBoxes(), device=settings.get("device", "cpu"))


def make_empty_candidate_pipeline(**settings):
    """Micro SAM whose second candidate is always empty (NaN stability) + fixed boxes."""
    from langsam.pipeline import LangSAM

    return LangSAM(sam_model=make_micro_sam(empty_candidate=2), detector_model=FixedBoxes(),
                   device=settings.get("device", "cpu"))


def make_tiny_sam_pipeline(**settings):
    """The tiny test SAM 1 (`sam_factory.make_tiny_sam`: full-size decoder) + fixed boxes."""
    from sam_factory import make_tiny_sam

    from langsam.pipeline import LangSAM

    return LangSAM(sam_model=make_tiny_sam(), detector_model=FixedBoxes(), device=settings.get("device", "cpu"))


def make_sam2_pipeline(**settings):
    """A tiny SAM 2.1 + fixed boxes (the worker-level SAM 2 test)."""
    from sam2_factory import make_tiny_sam2

    from langsam.pipeline import LangSAM

    return LangSAM(sam_model=make_tiny_sam2(), detector_model=FixedBoxes(), device=settings.get("device", "cpu"))


# ============================================================================================
# The soak: mixed requests from concurrent clients (the load test, and bench_serve.py --soak)
# ============================================================================================

#: The statuses each kind of soak request may get; anything else is an unexpected error. An
#: image_id may have been dropped from the store by other clients' uploads (404: upload again).
SOAK_EXPECTED = {"images": {200}, "predict": {200, 404}, "segment": {200}, "auto_masks": {200}, "corrupt": {400}}
#: One client's cycle of 16 requests: 10 clicks, 2 uploads, 2 segment, 1 auto-masks, 1 corrupt upload.
_SOAK_CYCLE = ("images", "predict", "predict", "predict", "segment", "predict", "predict", "predict",
               "images", "predict", "auto_masks", "predict", "segment", "predict", "predict", "corrupt")


@dataclass
class SoakReport:
    """What `soak` saw. rss: the server's memory (bytes) after the warm-up phase and after each
    later phase; answers: client -> [(image index, click, /v1/predict body)] of its 200s."""

    statuses: dict[str, Counter]
    unexpected: list[tuple[str, int, str]]
    rss: list[int]
    answers: dict[int, list[tuple[int, list[float], dict]]]
    seconds: float
    stats: dict
    models: dict

    @property
    def requests(self) -> int:
        return sum(sum(counter.values()) for counter in self.statuses.values())

    @property
    def growth(self) -> int:
        """Memory at the end over memory after the warm-up, bytes."""
        return self.rss[-1] - self.rss[0]

    @property
    def largest_growth(self) -> int:
        """Largest memory increase over the end of the warm-up, bytes (noisier: the workers'
        allocators hold a few tens of MiB more or less from round to round)."""
        return max(self.rss[1:]) - self.rss[0]


def soak_click(client: int, step: int, image: np.ndarray) -> list[float]:
    height, width = image.shape[:2]
    return [float((37 * client + 53 * step) % width), float((29 * client + 71 * step) % height)]


def soak(url: str, images: list[np.ndarray], requests: int = 2000, clients: int = 16, phases: int = 5,
         warmup_uploads: int = 2, rss=None, timeout: float = 120) -> SoakReport:
    """`requests` mixed requests (see `_SOAK_CYCLE`) from `clients` concurrent clients, in
    `phases` rounds; `rss()` (the server's memory) is read between rounds, while no request is
    open. The first round is the warm-up: each client starts it with `warmup_uploads` more
    (upload, click) pairs, so that the image store is full (at its bounded size) after it."""
    import io
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from PIL import Image

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    uploads = [png(image) for image in images]
    steps = requests // clients // phases
    statuses: dict[str, Counter] = {kind: Counter() for kind in SOAK_EXPECTED}
    unexpected: list[tuple[str, int, str]] = []
    answers: dict[int, list] = {client: [] for client in range(clients)}
    state = {client: {"image_id": None, "image": client % len(images), "uploads": 0} for client in range(clients)}
    lock = threading.Lock()

    def one(http: httpx.Client, client: int, step: int, kind: str | None = None) -> None:
        own = state[client]
        if own["image_id"] is None:
            kind = "images"
        kind = kind or _SOAK_CYCLE[(step + client) % len(_SOAK_CYCLE)]
        image = uploads[own["image"]]
        if kind == "images":
            own["image"] = (client + own["uploads"]) % len(images)
            own["uploads"] += 1
            response = http.post("/v1/images", files={"image": ("i.png", uploads[own["image"]], "image/png")})
            if response.status_code == 200:
                own["image_id"] = response.json()["image_id"]
        elif kind == "predict":
            point = soak_click(client, step, images[own["image"]])
            response = http.post("/v1/predict", json={"image_id": own["image_id"], "points": [point], "labels": [1]})
            if response.status_code == 200:
                answers[client].append((own["image"], point, response.json()))
            elif response.status_code == 404:
                own["image_id"] = None
        elif kind == "segment":
            response = http.post("/v1/segment", data={"text": "a cat"}, files={"image": ("i.png", image, "image/png")})
        elif kind == "auto_masks":
            response = http.post("/v1/auto-masks", data={"points_per_side": "2"},
                                 files={"image": ("i.png", image, "image/png")})
        else:
            response = http.post("/v1/segment", data={"text": "a cat"},
                                 files={"image": ("i.png", b"not an image", "image/png")})
        with lock:
            statuses[kind][response.status_code] += 1
            if response.status_code not in SOAK_EXPECTED[kind]:
                unexpected.append((kind, response.status_code, response.text[:300]))

    def run_client(client: int, phase: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            if phase == 0:
                for step in range(-warmup_uploads, 0):
                    one(http, client, step, "images")
                    one(http, client, step, "predict")
            for step in range(phase * steps, (phase + 1) * steps):
                one(http, client, step)

    memory = []
    started = time.monotonic()
    for phase in range(phases):
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda client: run_client(client, phase), range(clients)))
        if rss is not None:
            memory.append(rss())
    seconds = time.monotonic() - started
    with httpx.Client(base_url=url, timeout=timeout) as http:
        stats, models = http.get("/v1/stats").json(), http.get("/v1/models").json()
    return SoakReport(statuses, unexpected, memory, answers, seconds, stats, models)


def main(argv: list[str]) -> None:
    import logging

    from langsam.serve import ServeConfig, serve

    logging.basicConfig(level=logging.WARNING)
    serve(ServeConfig(**json.loads(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
