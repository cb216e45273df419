"""`langsam serve` end to end: real servers on 127.0.0.1, in subprocesses, with tiny models.

* The keyed server loads the tiny checkpoint SAM and the tiny Grounding DINO through the normal
  model settings (what `langsam serve --sam-checkpoint ... --detector ...` does). Each endpoint's
  answer equals `LangSAM` / `SamPredictor` run here in-process on the same files; bad input gets
  a 4xx with a clear message; without the right key, 401.
* The open server (no key, so 127.0.0.1 only) runs a micro pipeline (tests/test_serve_support.py)
  on three workers (two for /v1/segment, one for /v1/images + /v1/predict) so that a load test
  of hundreds of requests from 16 clients fits in seconds: no errors, no memory growth after
  warm-up, the image store at its size, answers not mixed up between clients, requests batched.
  Its queue holds 16: a gate in its detector holds the workers so that the queue fills
  deterministically, and the 17th request gets 503 with Retry-After. SIGTERM then stops it
  gracefully, with a request held in flight by the same gate.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from langsam.io import ImageLoadError
from langsam.pipeline import LangSAM
from langsam.serve import ServeConfig, build_server, decode_image_bytes
from sam import SamPredictor, build_sam
from sam_factory import real_photo
from test_serve_support import GATE_ENV, make_micro_sam, soak
from tiny_gdino import save_tiny_grounding_dino

KEY = "langsam-test-key-0123456789abcdef"
AUTH = {"X-API-Key": KEY}
SUPPORT = Path(__file__).with_name("test_serve_support.py")
MAX_BODY = 2 * 1024 * 1024
MAX_PIXELS = 1_000_000
QUEUE = 16


# ============================================================================================
# Servers
# ============================================================================================


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`langsam.serve.serve(ServeConfig(**config))` in a subprocess, until `stop()`."""

    def __init__(self, config: dict, log_path: Path, env: dict | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tests = str(Path(__file__).parent)
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}),
                       "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, str(SUPPORT), json.dumps({**config, "port": self.port})],
                                        env=environment, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=300)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not become ready in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        """Resident memory of the server and every process it started, in bytes."""
        total = 0
        for process in self.processes():
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        try:
            started = self.processes()
        except psutil.NoSuchProcess:
            started = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # LitServe shuts its workers down on Ctrl+C
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for process in started:  # anything the shutdown left behind
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("serve_gdino"), logit_scale=0.1, num_queries=8)


@pytest.fixture(scope="module")
def model_settings(tiny_sam_checkpoint, gdino_dir):
    return {"sam_type": "auto", "sam_checkpoint": str(tiny_sam_checkpoint), "detector": str(gdino_dir),
            "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def keyed_server(model_settings, tmp_path_factory):
    server = ServerProcess(
        {"models": model_settings, "api_key": KEY, "host": "127.0.0.1", "max_body_bytes": MAX_BODY,
         "max_pixels": MAX_PIXELS, "max_images": 4, "torch_threads": 1},
        tmp_path_factory.mktemp("serve_logs") / "keyed.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_gate") / "gate"


@pytest.fixture(scope="module")
def micro_server(gate, tmp_path_factory):
    server = ServerProcess(
        {"pipeline_factory": "test_serve_support:make_micro_pipeline", "models": {"device": "cpu"},
         "max_queue": QUEUE, "max_batch_size": 8, "max_images": 32,
         # Two workers for /v1/segment and one for /v1/images + /v1/predict (the split server).
         # One thread each: the test machine's cores are shared with pytest and the HTTP process.
         # Encoder batches of 4 (the GPU path) on the CPU: the load test checks their answers.
         "workers": 2, "torch_threads": 1, "encoder_batch_size": 4},
        tmp_path_factory.mktemp("serve_logs") / "micro.log", env={GATE_ENV: str(gate)},
    )
    yield server
    server.stop()


# ============================================================================================
# Helpers
# ============================================================================================


@pytest.fixture(scope="module")
def photo():
    return real_photo("chelsea")  # 300 x 451


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def assert_same_segmentation(body: dict, expected) -> None:
    """A /v1/segment answer equals a `Segmentation`."""
    assert (body["height"], body["width"]) == expected.image_size
    assert body["mode"] == expected.mode
    objects = body["objects"]
    assert [obj["label"] for obj in objects] == expected.labels
    np.testing.assert_array_equal(np.array([obj["box"] for obj in objects], np.float32).reshape(-1, 4),
                                  expected.boxes)
    np.testing.assert_array_equal(np.array([obj["score"] for obj in objects], np.float32), expected.scores)
    np.testing.assert_array_equal(np.array([obj["mask_score"] for obj in objects], np.float32),
                                  expected.mask_scores)
    for obj, mask in zip(objects, expected.masks):
        np.testing.assert_array_equal(decode_rle(obj["segmentation"]), mask)
        assert obj["area"] == mask.sum()


@pytest.fixture(scope="module")
def reference(model_settings):
    """The same models, in this process."""
    return LangSAM(**model_settings)


# ============================================================================================
# Keyed server: parity, errors, auth
# ============================================================================================


def test_segment_equals_langsam(keyed_server, reference, photo):
    data = png_bytes(photo)
    expected = reference.segment(photo, ["a cat", "a remote control"], box_threshold=0.6)
    assert 0 < len(expected) < 8
    with httpx.Client(base_url=keyed_server.url, headers=AUTH, timeout=120) as client:
        multipart = client.post("/v1/segment", files={"image": ("cat.png", data, "image/png")},
                                data={"text": ["a cat", "a remote control"], "box_threshold": "0.6"})
        assert multipart.status_code == 200, multipart.text
        assert_same_segmentation(multipart.json(), expected)
        # JSON with base64, one caption with '.' separators, and multimask.
        expected_multi = reference.segment(photo, "a cat. a remote control", box_threshold=0.6, multimask=True,
                                           top_k=2)
        body = client.post("/v1/segment", json={"image": base64.b64encode(data).decode(), "text":
                                                "a cat. a remote control", "box_threshold": 0.6,
                                                "multimask": True, "top_k": 2})
        assert body.status_code == 200, body.text
        assert_same_segmentation(body.json(), expected_multi)


def test_auto_masks_equal_generator(keyed_server, reference, photo):
    settings = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    expected = reference.auto_masks(photo, output_mode="coco_rle", **settings)
    assert len(expected) > 0
    response = httpx.post(keyed_server.url + "/v1/auto-masks", headers=AUTH, timeout=120,
                          json={"image": base64.b64encode(png_bytes(photo)).decode(), **settings})
    assert response.status_code == 200, response.text
    masks = response.json()["masks"]
    assert [m["segmentation"]["counts"] for m in masks] == [r["segmentation"]["counts"] for r in expected]
    for got, record in zip(masks, expected):
        assert got["bbox"] == [float(v) for v in record["bbox"]]
        assert np.float32(got["predicted_iou"]) == np.float32(record["predicted_iou"])
        assert got["point_coords"] == [[float(v) for v in p] for p in record["point_coords"]]


def test_images_then_predict_equal_sam_predictor(keyed_server, tiny_sam_checkpoint, photo):
    predictor = SamPredictor(build_sam("auto", checkpoint=tiny_sam_checkpoint))
    predictor.set_image(photo)
    with httpx.Client(base_url=keyed_server.url, headers=AUTH, timeout=120) as client:
        created = client.post("/v1/images", files={"image": ("cat.png", png_bytes(photo), "image/png")})
        assert created.status_code == 200, created.text
        image_id = created.json()["image_id"]
        assert created.json()["width"] == 451 and created.json()["height"] == 300

        def check(request: dict, masks, scores, low_res=None) -> dict:
            response = client.post("/v1/predict", json={"image_id": image_id, **request})
            assert response.status_code == 200, response.text
            body = response.json()
            np.testing.assert_array_equal(np.stack([decode_rle(rle) for rle in body["masks"]]), masks)
            np.testing.assert_array_equal(np.array(body["scores"], np.float32), scores)
            if low_res is not None:
                got = np.stack([np.frombuffer(base64.b64decode(item), "<f4").reshape(256, 256)
                                for item in body["low_res_masks"]])
                np.testing.assert_array_equal(got, low_res)
            return body

        # Two clicks, three candidates, with the low-res logits returned.
        points, labels = np.array([[120.0, 90.0], [300.0, 200.0]]), np.array([1, 0])
        masks, scores, low_res = predictor.predict(point_coords=points, point_labels=labels)
        body = check({"points": points.tolist(), "labels": labels.tolist(), "return_low_res": True},
                     masks, scores, low_res)
        # The next click refines candidate 2 of that answer, kept on the server.
        box = np.array([60.0, 40.0, 330.0, 260.0])
        refined = predictor.predict(box=box, mask_input=low_res[2:3], multimask_output=False)
        check({"box": box.tolist(), "previous_mask": 2, "multimask": False}, *refined[:2])
        # The same mask prompt sent by the client as base64 float32.
        explicit = predictor.predict(point_coords=points[:1], point_labels=labels[:1], mask_input=low_res[2:3],
                                     multimask_output=False)
        check({"points": points[:1].tolist(), "labels": [1], "mask_input": body["low_res_masks"][2],
               "multimask": False}, *explicit[:2])


def test_auth(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/healthz").status_code == 200  # open: load balancers send no key
    assert httpx.get(url + "/openapi.json").status_code == 200
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/segment"), ("POST", "/v1/predict"),
                             ("GET", "/info"), ("GET", "/v1/stats")):
            response = httpx.request(method, url + path, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert "API key" in response.json()["detail"]
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    models = httpx.get(url + "/v1/models", headers=AUTH).json()
    # Server-side paths are not shown, only file names.
    assert models["sam"] == {"type": "auto", "checkpoint": "tiny_sam.pth"}
    assert "/" not in models["detector"]
    assert models["limits"]["max_body_bytes"] == MAX_BODY


def test_bad_input_gets_clear_4xx(keyed_server, photo):
    data = png_bytes(photo)
    b64 = base64.b64encode(data).decode()
    png = ("cat.png", data, "image/png")
    big = png_bytes(np.zeros((1200, 1000, 3), np.uint8))  # small file, 1.2 million pixels
    truncated = data[: len(data) // 2]
    cases = [
        ("segment corrupt", dict(files={"image": ("x.png", b"not an image at all", "image/png")},
                                 data={"text": "a cat"}), 400, "not an image in a supported format"),
        ("segment truncated", dict(files={"image": ("x.png", truncated, "image/png")}, data={"text": "a cat"}),
         400, "corrupt or truncated"),
        ("segment empty upload", dict(files={"image": ("x.png", b"", "image/png")}, data={"text": "a cat"}),
         400, "empty"),
        ("segment empty text", dict(files={"image": png}, data={"text": " . "}), 400, "text is empty"),
        ("segment no text", dict(files={"image": png}), 400, "text is empty: give at least one query"),
        ("segment too many pixels", dict(files={"image": ("big.png", big, "image/png")}, data={"text": "a cat"}),
         400, "more than this server's limit of 1,000,000 pixels"),
        ("segment oversize body", dict(files={"image": ("x.png", b"0" * (MAX_BODY + 1), "image/png")},
                                       data={"text": "a cat"}), 413, "larger than this server's limit"),
        ("segment threshold", dict(json={"image": b64, "text": "a cat", "box_threshold": 2}), 422,
         "box_threshold: Input should be less than or equal to 1"),
        ("segment mode", dict(json={"image": b64, "text": "a cat", "mode": "magic"}), 422, "mode:"),
        ("segment unknown field", dict(json={"image": b64, "text": "a cat", "path": "/etc/passwd"}), 422,
         "path: Extra inputs are not permitted"),
        ("segment server path", dict(json={"image": "/etc/passwd", "text": "a cat"}), 400,
         "must be base64 (the file's bytes, not a path or URL)"),
        ("segment URL", dict(json={"image": "https://example.com/cat.png", "text": "a cat"}), 400,
         "must be base64"),
        ("segment not JSON", dict(content=b"{nope", headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        ("segment text/plain", dict(content=b"cat", headers={"content-type": "text/plain"}), 415,
         "multipart/form-data"),
    ]
    with httpx.Client(base_url=keyed_server.url, headers=AUTH, timeout=120) as client:
        for name, request, status, message in cases:
            response = client.post("/v1/segment", **request)
            assert response.status_code == status, (name, response.text)
            assert message in response.json()["detail"], (name, response.json())
        image_id = client.post("/v1/images", files={"image": png}).json()["image_id"]
        predict_cases = [
            ({"image_id": "no-such-image", "points": [[1, 1]], "labels": [1]}, 404, "unknown image_id"),
            ({"image_id": image_id}, 400, "give at least one prompt"),
            ({"image_id": image_id, "points": [[1, 1], [2, 2]], "labels": [1]}, 400,
             "points has 2 entries but labels has 1"),
            ({"image_id": image_id, "points": [[500, 10]], "labels": [1]}, 400, "outside the 451x300 image"),
            ({"image_id": image_id, "points": [[10, 10]], "labels": [7]}, 400, "point_labels must be 1"),
            ({"image_id": image_id, "box": [300, 10, 20, 200]}, 400, "x1 >= x0"),
            ({"image_id": image_id, "mask_input": "AAAA"}, 400, "mask_input must be 256x256 float32"),
            ({"image_id": image_id, "previous_mask": 1}, 400, "previous_mask refers to"),
            ({"image_id": image_id, "points": "here", "labels": [1]}, 422, "points"),
        ]
        for request, status, message in predict_cases:
            response = client.post("/v1/predict", json=request)
            assert response.status_code == status, (request, response.text)
            assert message in response.json()["detail"], (request, response.json())
        # The server keeps 4 images: a fifth upload drops the least recently used one.
        for _ in range(4):
            client.post("/v1/images", files={"image": png})
        evicted = client.post("/v1/predict", json={"image_id": image_id, "points": [[1, 1]], "labels": [1]})
        assert evicted.status_code == 404 and "POST the image to /v1/images again" in evicted.json()["detail"]
        # After all that, the server still answers.
        assert client.post("/v1/images", files={"image": png}).status_code == 200


def test_openapi_documents_endpoints(keyed_server):
    schema = httpx.get(keyed_server.url + "/openapi.json").json()
    for path in ("/v1/segment", "/v1/auto-masks", "/v1/images"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
        assert "image" in content["application/json"]["schema"]["properties"]
    assert "image_id" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]
    assert {"/healthz", "/v1/models", "/v1/stats"} <= set(schema["paths"])
    assert "/_langsam_internal" not in schema["paths"]  # LitServe's own route is replaced
    assert httpx.get(keyed_server.url + "/docs").status_code == 200


# ============================================================================================
# Micro server: localhost only, load, queue limit, timeouts
# ============================================================================================


def test_without_key_listens_on_localhost_only(micro_server):
    listening = set()
    for process in micro_server.processes():
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN
                      and c.laddr.port == micro_server.port}
    assert listening == {"127.0.0.1"}


def _variants(photo) -> list[np.ndarray]:
    half = np.ascontiguousarray(photo[::2, ::2])  # 150 x 226: small masks, fast answers
    return [half, np.ascontiguousarray(half[:, ::-1]), np.ascontiguousarray(half[::-1]),
            np.ascontiguousarray(half[20:130, 25:200])]


def test_load_16_clients(micro_server, photo):
    """The soak of bench_serve.py --soak, shortened: 16 clients, 192 mixed requests (clicks,
    uploads, /v1/segment, /v1/auto-masks, corrupt uploads) in 4 rounds, the first of which (the
    warm-up) also fills the image store. No unexpected status (no 503: the queue holds 16), memory flat
    after the warm-up, the image store at its configured size, answers not mixed up between
    clients, requests batched."""
    images = _variants(photo)
    report = soak(micro_server.url, images, requests=192, clients=16, phases=4, warmup_uploads=2,
                  rss=micro_server.rss)

    assert report.requests == 192 + 16 * 2 * 2
    assert report.unexpected == [], report.unexpected[:5]
    assert report.statuses["corrupt"][400] > 0 and report.statuses["auto_masks"][200] > 0
    # Memory flat after the warm-up. A leak grows in every round (a leaked embedding per request
    # would be 0.5 MiB x 48 requests a round); the workers' allocators reaching their high-water
    # mark (e.g. the first 4-image encoder batch) is one step of up to ~70 MiB, measured, in
    # whichever round it happens. So: some round after the warm-up grew by less than 24 MiB, and
    # the whole growth stays under 96 MiB.
    memory = [f"{value / 2**20:.0f} MiB" for value in report.rss]
    steps = np.diff(np.asarray(report.rss, dtype=np.int64))
    assert steps.min() < 24 * 2**20, memory
    assert report.growth < 96 * 2**20, memory
    uploads = sum(report.statuses["images"].values())
    assert uploads > report.models["limits"]["max_images"]
    assert report.stats["images_stored"] == report.models["limits"]["max_images"]
    # Each client got the answers for its own image and clicks, batching or not.
    reference = SamPredictor(make_micro_sam())
    for client_index in range(16):
        answers = report.answers[client_index]
        for image_index, point, body in (answers[0], answers[-1]):
            reference.set_image(images[image_index])
            masks, scores, _ = reference.predict(point_coords=np.array([point]), point_labels=np.array([1]))
            np.testing.assert_array_equal(np.stack([decode_rle(rle) for rle in body["masks"]]), masks)
            np.testing.assert_allclose(body["scores"], scores, rtol=1e-5, atol=1e-6)
    assert report.stats["largest_batch"] > 1 and report.stats["batches"] < report.stats["requests"]


def test_full_queue_gets_503_with_retry_after(micro_server, gate, photo):
    upload = png_bytes(photo[::4, ::4].copy())
    gate.write_text("hold")
    results: list[int] = []
    try:
        def segment() -> None:
            response = httpx.post(micro_server.url + "/v1/segment", data={"text": "a cat"},
                                  files={"image": ("i.png", upload, "image/png")}, timeout=60)
            results.append(response.status_code)

        threads = [threading.Thread(target=segment) for _ in range(QUEUE)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(micro_server.url + "/healthz").json()["queue"]["in_flight"] < QUEUE:
            assert time.monotonic() < deadline, "the queue did not fill"
            time.sleep(0.02)
        refused = httpx.post(micro_server.url + "/v1/predict", json={"image_id": "x", "points": [[1, 1]],
                                                                     "labels": [1]})
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["detail"]
    finally:
        gate.unlink(missing_ok=True)
    for thread in threads:
        thread.join()
    assert results == [200] * QUEUE  # every admitted request was answered
    assert httpx.get(micro_server.url + "/healthz").json()["queue"]["in_flight"] == 0


def test_slow_request_gets_504(micro_server, gate, photo):
    """X-Request-Timeout: the client's own, shorter timeout; its late answer is dropped."""
    upload = png_bytes(photo[::4, ::4].copy())
    request = dict(data={"text": "a cat"}, files={"image": ("i.png", upload, "image/png")}, timeout=60)
    bad = httpx.post(micro_server.url + "/v1/segment", headers={"X-Request-Timeout": "soon"}, **request)
    assert bad.status_code == 400 and "X-Request-Timeout must be a positive number" in bad.json()["detail"]
    gate.write_text("hold")
    try:
        started = time.monotonic()
        response = httpx.post(micro_server.url + "/v1/segment", headers={"X-Request-Timeout": "1.5"}, **request)
        waited = time.monotonic() - started
    finally:
        gate.unlink(missing_ok=True)
    assert response.status_code == 504 and "1.5 s timeout" in response.json()["detail"]
    assert 1.4 < waited < 10
    retry = httpx.post(micro_server.url + "/v1/segment", **request)
    assert retry.status_code == 200 and len(retry.json()["objects"]) == 2


def test_sigterm_drains_then_stops_every_process(micro_server, gate, photo):
    """SIGTERM (docker stop, systemd): the port closes at once, the request in flight (held in
    the worker by the gate) is still answered, then every process of the server exits and the
    port can be bound again. It stops the module's micro server, so it runs after its other tests."""
    upload = png_bytes(photo[::4, ::4].copy())
    processes = micro_server.processes()
    names = " ".join(" ".join(process.cmdline()) for process in processes)
    # main, the manager, the HTTP process, three model workers, the resource tracker
    assert len(processes) >= 6 and "resource_tracker" in names, names
    answers: list[httpx.Response] = []
    gate.write_text("hold")
    try:
        thread = threading.Thread(target=lambda: answers.append(httpx.post(
            micro_server.url + "/v1/segment", data={"text": "a cat"},
            files={"image": ("i.png", upload, "image/png")}, timeout=60)))
        thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(micro_server.url + "/healthz").json()["queue"]["in_flight"] < 1:
            assert time.monotonic() < deadline, "the request did not reach the server"
            time.sleep(0.02)
        micro_server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the port stops accepting while the request is still held
            try:
                httpx.get(micro_server.url + "/healthz", timeout=5)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
            time.sleep(0.02)
        assert thread.is_alive() and not answers
    finally:
        gate.unlink(missing_ok=True)
    thread.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert len(answers[0].json()["objects"]) == 2
    assert micro_server.process.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:  # do not leave them to the rest of the suite
        process.kill()
    assert not alive, [process.pid for process in alive]
    with socket.socket() as listener:  # what a restarted server does
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", micro_server.port))
        listener.listen()


# ============================================================================================
# Without a server: configuration, decoding, the demo mount, the command line
# ============================================================================================


def test_worker_serves_sam2(photo):
    """The LitAPI's verbs called directly (no HTTP) on a tiny SAM 2.1: /v1/images in one batched
    encoder call, then clicks and /v1/segment, equal to SamPredictor / LangSAM in-process."""
    from langsam.serve import LangSAMAPI
    from test_serve_support import FixedBoxes
    from sam2_factory import make_tiny_sam2

    api = LangSAMAPI(ServeConfig(pipeline_factory="test_serve_support:make_sam2_pipeline",
                                 models={"device": "cpu"}, encoder_batch_size=2))
    api.setup("cpu")
    small = np.ascontiguousarray(photo[::2, ::2])
    requests = [{"op": "set_image", "params": {}, "deadline": time.monotonic() + 600, "image": png_bytes(image)}
                for image in (photo, small)]
    answers = [api.encode_response(out) for out in api.predict([api.decode_request(r) for r in requests])]
    assert [status for status, _ in answers] == [200, 200]
    reference = SamPredictor(make_tiny_sam2())
    click = {"points": [[100.0, 80.0]], "labels": [1], "box": None, "mask_input": None, "previous_mask": None,
             "multimask": True, "return_low_res": False}
    for (_, body), image in zip(answers, (photo, small)):
        reference.set_image(image)
        request = {"op": "predict", "params": {**click, "image_id": body["image_id"]},
                   "deadline": time.monotonic() + 600}
        status, answer = api.encode_response(api.predict([api.decode_request(request)])[0])
        masks, scores, _ = reference.predict(point_coords=np.array(click["points"]), point_labels=np.array([1]))
        assert status == 200
        np.testing.assert_array_equal(np.stack([decode_rle(rle) for rle in answer["masks"]]), masks)
        np.testing.assert_allclose(answer["scores"], scores, rtol=1e-5, atol=1e-6)
    segment = {"op": "segment", "deadline": time.monotonic() + 600, "image": png_bytes(photo),
               "params": {"queries": ["a cat"], "mode": "grounded", "box_threshold": 0.3, "text_threshold": 0.25,
                          "clip_threshold": None, "top_k": None, "multimask": False}}
    status, answer = api.encode_response(api.predict([api.decode_request(segment)])[0])
    expected = LangSAM(sam_model=make_tiny_sam2(), detector_model=FixedBoxes(), device="cpu").segment(photo, "a cat")
    assert status == 200
    assert_same_segmentation(answer, expected)


def _strict_json(text: bytes | str):
    """json.loads that rejects NaN and Infinity, as a strict JSON parser does."""
    def reject(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


def test_auto_masks_nan_scores_are_null(photo):
    """An empty automatic mask has stability 0 / 0 = NaN (here as in Meta's generator). The
    worker's answer, rendered as the route sends it, is strict JSON with null there, and
    otherwise equals the generator run in-process."""
    import math

    from fastapi.responses import JSONResponse

    from langsam.serve import LangSAMAPI

    api = LangSAMAPI(ServeConfig(pipeline_factory="test_serve_support:make_empty_candidate_pipeline",
                                 models={"device": "cpu"}))
    api.setup("cpu")
    small = np.ascontiguousarray(photo[::2, ::2])
    settings = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    request = {"op": "auto_masks", "params": settings, "deadline": time.monotonic() + 600, "image": png_bytes(small)}
    status, body = api.encode_response(api.predict([api.decode_request(request)])[0])
    assert status == 200
    masks = _strict_json(JSONResponse(body, status_code=status).body)["masks"]
    reference = LangSAM(sam_model=make_micro_sam(empty_candidate=2), detector_model=object(), device="cpu")
    expected = reference.auto_masks(small, output_mode="coco_rle", **settings)
    empty = [math.isnan(record["stability_score"]) for record in expected]
    assert any(empty) and not all(empty)
    assert all(record["area"] == 0 for record, nan in zip(expected, empty) if nan)
    assert [mask["stability_score"] is None for mask in masks] == empty
    assert [mask["segmentation"]["counts"] for mask in masks] == [r["segmentation"]["counts"] for r in expected]
    for mask, record in zip(masks, expected):
        if mask["stability_score"] is not None:
            assert np.float32(mask["stability_score"]) == np.float32(record["stability_score"])
        assert np.float32(mask["predicted_iou"]) == np.float32(record["predicted_iou"])


def test_unexpected_error_is_a_json_500(monkeypatch):
    """Whatever fails unexpectedly, the answer is JSON (Starlette's own 500 is plain text)."""
    from starlette.testclient import TestClient

    from langsam.serve import routes

    server = build_server(ServeConfig())
    monkeypatch.setattr(routes, "_models_info", lambda config: {"limit": float("nan")})
    response = TestClient(server.app, raise_server_exceptions=False).get("/v1/models")
    assert response.status_code == 500
    assert _strict_json(response.text) == {"detail": "internal error (ValueError); see the server log"}


def test_config_rules():
    assert ServeConfig().host == "127.0.0.1"
    assert ServeConfig(api_key=KEY).host == "0.0.0.0"
    with pytest.raises(ValueError, match="needs an API key: set LANGSAM_API_KEY"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="at least 16 printable characters"):
        ServeConfig(api_key="short")
    with pytest.raises(ValueError, match="the demo cannot send the API key"):
        ServeConfig(api_key=KEY, demo=True)
    with pytest.raises(ValueError, match="host must be one of"):
        ServeConfig(host="192.168.1.10", api_key=KEY)
    with pytest.raises(ValueError, match="max_queue must be an integer"):
        ServeConfig(max_queue=0)
    with pytest.raises(ValueError, match="unknown model settings"):
        ServeConfig(models={"sam_model": object()})
    with pytest.raises(ValueError, match="cannot load pipeline_factory"):
        ServeConfig(pipeline_factory="no_such_module:make")


def test_decode_image_bytes(photo, tmp_path):
    np.testing.assert_array_equal(decode_image_bytes(png_bytes(photo), 10**6), photo)
    # EXIF orientation applied, as load_image does for files.
    rotated = Image.fromarray(photo)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif, quality=95)
    assert decode_image_bytes(buffer.getvalue(), 10**6).shape == (451, 300, 3)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    for data, message in ((b"", "empty"), (eps, "not an image in a supported format"),
                          (png_bytes(photo), "more than this server's limit")):
        with pytest.raises(ImageLoadError, match=message):
            decode_image_bytes(data, 1000 if message.startswith("more") else 10**6)


def test_demo_is_mounted_at_demo(model_settings):
    from starlette.testclient import TestClient

    server = build_server(ServeConfig(models=model_settings, demo=True))
    paths = {getattr(route, "path", None) for route in server.app.routes}
    assert "/demo" in paths
    page = TestClient(server.app).get("/demo/")
    assert page.status_code == 200 and "gradio" in page.text.lower()


def _serve_command(argv: list[str], monkeypatch, environment: dict | None = None):
    """`langsam serve ARGV` through the command module, with `langsam.serve.serve` replaced by
    a recorder (no server starts). Returns (status, the config it would serve, stderr)."""
    import contextlib

    from langsam import serve as serve_module
    from langsam.cli import serve
    from langsam.cli.options import EXIT_USAGE, UsageError, exit_status

    for name in ("LANGSAM_API_KEY", "LANGSAM_SAM_TYPE", "LANGSAM_SAM_CHECKPOINT", "LANGSAM_DETECTOR",
                 "LANGSAM_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (environment or {}).items():
        monkeypatch.setenv(name, value)
    served = []
    monkeypatch.setattr(serve_module, "serve", served.append)
    parser = argparse.ArgumentParser(prog="langsam")
    serve.add_parser(parser.add_subparsers(dest="command"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = parser.parse_args(["serve", *argv])
            status = args.handler(args)
        except SystemExit as exit_:
            status = exit_status(exit_)
        except UsageError as error:
            print(error, file=stderr)
            status = EXIT_USAGE
    return status, (served[0] if served else None), stderr.getvalue()


def test_serve_command(monkeypatch, tiny_sam_checkpoint):
    status, config, _ = _serve_command(
        ["--sam-type", "auto", "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cpu", "--port", "9000",
         "--max-queue", "5", "--max-body-size", "1.5", "--timeout", "30", "--threads", "1"], monkeypatch)
    assert status == 0
    assert config.host == "127.0.0.1" and config.port == 9000 and config.api_key is None
    assert config.max_queue == 5 and config.max_body_bytes == int(1.5 * 2**20) and config.timeout == 30
    assert config.torch_threads == 1
    assert config.models == {"sam_type": "auto", "sam_checkpoint": str(tiny_sam_checkpoint), "device": "cpu"}
    # The key comes from the environment only, and then the server may listen on all interfaces.
    status, config, _ = _serve_command(["--host", "0.0.0.0"], monkeypatch, {"LANGSAM_API_KEY": KEY})
    assert status == 0 and config.api_key == KEY and config.host == "0.0.0.0"
    usage = [
        (["--host", "0.0.0.0"], {}, "needs an API key"),
        (["--port", "80"], {}, "must be at least 1024"),
        (["--sam-checkpoint", "/no/such/file.pth"], {}, "is not a file"),
        (["--sam-type", "vit_q"], {}, "unknown SAM type"),
        (["--demo"], {"LANGSAM_API_KEY": KEY}, "the demo cannot send the API key"),
        ([], {"LANGSAM_API_KEY": "short"}, "at least 16 printable characters"),
    ]
    for argv, environment, message in usage:
        status, config, stderr = _serve_command(argv, monkeypatch, environment)
        assert status == 2 and config is None and message in stderr, (argv, stderr)
