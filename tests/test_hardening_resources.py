"""Hardening (issue 8): memory and models over many calls, threads, and whole CLI/demo runs.

* The embedding cache is an LRU of bounded length: 200 calls with distinct images in one
  process do not grow memory.
* The CLI and the demo load each model (SAM, Grounding DINO, CLIP) exactly once per process.
* LangSAM is safe to call from several threads: calls are serialised by its lock, and each
  thread gets exactly the result a lone call gives.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from langsam.detector import Detections
from langsam.pipeline import LangSAM, image_key
from sam import SamPredictor
from sam_factory import make_tiny_sam, real_photo
from tiny_clip import save_tiny_clip
from tiny_gdino import save_tiny_grounding_dino

MIB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; includes torch's allocations)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class OneBoxDetector:
    """A detector that finds one box (the middle half of the image) for the first query."""

    def __init__(self):
        self.calls = 0

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        self.calls += 1
        height, width = image.shape[:2]
        box = np.array([[width / 4, height / 4, 3 * width / 4, 3 * height / 4]], dtype=np.float32)
        return Detections(boxes=box, scores=np.array([0.9], np.float32), labels=[queries[0]],
                          label_ids=np.zeros(1, np.int64), phrases=[queries[0]], queries=list(queries))


class CheapEncoder(torch.nn.Module):
    """Stands in for the ViT where only the embedding cache is under test: a real module of the
    same input and output shapes ((1, 3, 1024, 1024) -> (1, 256, 64, 64)), 16x16 average pooling
    and a fixed 3 -> 256 channel map, so distinct images still give distinct embeddings."""

    def __init__(self, img_size: int = 1024):
        super().__init__()
        self.img_size = img_size
        self.mix = torch.nn.Conv2d(3, 256, 1)
        self.calls = 0

    def forward(self, pixels):
        self.calls += 1
        return self.mix(torch.nn.functional.avg_pool2d(pixels, 16))


def distinct_images(count: int, size=(24, 32)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------


def test_embedding_cache_is_a_bounded_lru_with_the_real_encoder():
    model = make_tiny_sam(seed=4, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=1,
                          encoder_global_attn_indexes=())
    encodes = []
    original_forward = model.image_encoder.forward
    model.image_encoder.forward = lambda pixels: encodes.append(1) or original_forward(pixels)
    pipeline = LangSAM(sam_model=model, detector_model=OneBoxDetector(), device="cpu", embedding_cache_size=2)
    a, b, c = distinct_images(3)
    keys = [pipeline.set_image(image) for image in (a, b, a, c, b)]
    # a, b miss; a hits; c evicts b (least recently used); b misses again and evicts a.
    assert len(encodes) == 4
    assert list(pipeline._embeddings) == [image_key(c), image_key(b)] and keys[0] == keys[2] == image_key(a)
    cached_b = pipeline._embeddings[image_key(b)][0]
    fresh = SamPredictor(model)
    fresh.set_image(b)
    torch.testing.assert_close(cached_b, fresh.features, rtol=0, atol=0)  # a hit is the same embedding
    assert pipeline.predictor.features is cached_b

    uncached = LangSAM(sam_model=model, detector_model=OneBoxDetector(), device="cpu", embedding_cache_size=0)
    before = len(encodes)
    uncached.set_image(a)
    uncached.set_image(a)
    assert len(encodes) - before == 2 and len(uncached._embeddings) == 0


def test_200_calls_do_not_grow_memory():
    model = make_tiny_sam(seed=4)
    model.image_encoder = CheapEncoder()
    detector = OneBoxDetector()
    pipeline = LangSAM(sam_model=model, detector_model=detector, device="cpu", embedding_cache_size=4)
    images = distinct_images(200)
    # Warm up allocator pools and lazy state, then measure: every call below is a cache miss, so
    # an unbounded cache would keep 200 embeddings of 4 MiB (800 MiB).
    for image in images[:8]:
        pipeline.set_image(image)
    gc.collect()
    start = rss_bytes()
    for image in images:
        pipeline.set_image(image)
        assert len(pipeline._embeddings) <= 4
    gc.collect()
    growth_set_image = rss_bytes() - start
    assert model.image_encoder.calls == 208
    # An unbounded cache would add 800 MiB; allocator caching alone has been seen to add ~120 MiB.
    assert growth_set_image < 256 * MIB, f"RSS grew {growth_set_image / MIB:.1f} MiB over 200 set_image calls"

    # Whole segment() calls (detector, cache, decoder, result) on fresh images: no growth either.
    for image in images[:3]:
        pipeline.segment(image, "a thing")
    gc.collect()
    start = rss_bytes()
    for image in images[3:9]:
        result = pipeline.segment(image, "a thing")
        assert len(result) == 1 and result.masks.shape == (1, *image.shape[:2])
    gc.collect()
    growth_segment = rss_bytes() - start
    assert growth_segment < 256 * MIB, f"RSS grew {growth_segment / MIB:.1f} MiB over 6 segment calls"
    assert len(pipeline._embeddings) == 4


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


def test_segment_from_several_threads_is_serialised_and_exact():
    model = make_tiny_sam(seed=6, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=1,
                          encoder_global_attn_indexes=())
    pipeline = LangSAM(sam_model=model, detector_model=OneBoxDetector(), device="cpu", embedding_cache_size=4)
    photo = real_photo("chelsea")
    images = [np.ascontiguousarray(photo[:64, :80]), np.ascontiguousarray(photo[100:164, 200:280])]
    expected = [pipeline.segment(image, "a cat").masks for image in images]
    assert not np.array_equal(expected[0], expected[1])

    # Widen the race window: between an image's embedding being restored and its decode, sleep.
    # Without a lock around the model, another thread would swap the predictor's image there.
    predictor = pipeline.predictor
    inside, most_inside = [0], [0]
    counter_lock = threading.Lock()
    original_predict_torch = predictor.predict_torch

    def slow_predict_torch(*args, **kwargs):
        with counter_lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
        time.sleep(0.05)
        try:
            return original_predict_torch(*args, **kwargs)
        finally:
            with counter_lock:
                inside[0] -= 1

    predictor.predict_torch = slow_predict_torch
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            results[index] = pipeline.segment(images[index % 2], "a cat").masks
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and len(results) == 6
    assert most_inside[0] == 1
    for index, masks in results.items():
        np.testing.assert_array_equal(masks, expected[index % 2])


# --------------------------------------------------------------------------------------------
# Models load once per process
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def load_counts(monkeypatch):
    """Count every model construction from files: SAM, Grounding DINO, CLIP."""
    import open_clip
    import sam
    from transformers import GroundingDinoForObjectDetection

    counts = {"sam": 0, "gdino": 0, "clip": 0}
    original_build = sam.build_sam
    original_gdino = GroundingDinoForObjectDetection.from_pretrained.__func__
    original_clip = open_clip.create_model_and_transforms

    def build(*args, **kwargs):
        counts["sam"] += 1
        return original_build(*args, **kwargs)

    def gdino(cls, *args, **kwargs):
        counts["gdino"] += 1
        return original_gdino(cls, *args, **kwargs)

    def clip(*args, **kwargs):
        counts["clip"] += 1
        return original_clip(*args, **kwargs)

    monkeypatch.setattr(sam, "build_sam", build)
    monkeypatch.setattr(GroundingDinoForObjectDetection, "from_pretrained", classmethod(gdino))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", clip)
    return counts


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_sam_checkpoint):
    folder = tmp_path_factory.mktemp("once_models")
    photos = folder / "photos"
    photos.mkdir()
    for index, name in enumerate(("chelsea", "coffee")):
        Image.fromarray(np.ascontiguousarray(real_photo(name)[:60, :80])).save(photos / f"{index}_{name}.png")
    clip = save_tiny_clip(folder / "clip", seed=0)
    return {
        "photos": photos,
        "settings": {"sam_type": "auto", "sam_checkpoint": str(tiny_sam_checkpoint),
                     "detector": str(save_tiny_grounding_dino(folder / "gdino", seed=0)),
                     "clip_model": clip.model_name, "clip_pretrained": str(clip.weights_path), "device": "cpu"},
    }


def test_cli_loads_each_model_once(load_counts, model_files, tmp_path):
    from langsam.cli import main

    settings = model_files["settings"]
    flags = ["--sam-type", "auto", "--sam-checkpoint", settings["sam_checkpoint"], "--detector", settings["detector"],
             "--clip-model", settings["clip_model"], "--clip-pretrained", settings["clip_pretrained"],
             "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = main(["segment", str(model_files["photos"]), "--text", "a cat", "--text", "a cup", "--mode", "hybrid",
                       "--box-threshold", "0", "--text-threshold", "0", "--clip-threshold", "0", "--top-k", "1",
                       "--out", str(tmp_path / "out"), *flags, "--quiet"])
    assert status == 0
    assert len(list((tmp_path / "out").glob("*/result.json"))) == 2
    assert load_counts == {"sam": 1, "gdino": 1, "clip": 1}


def test_demo_loads_each_model_once(load_counts, model_files):
    from langsam.demo import build_app

    app = build_app(dict(model_files["settings"]))
    assert load_counts == {"sam": 0, "gdino": 0, "clip": 0}  # nothing loads before the first request
    functions = {fn.api_name: fn.fn for fn in app.fns.values() if fn.api_name}
    paths = sorted(str(p) for p in model_files["photos"].iterdir())
    functions["segment_text"](paths[0], "a cat", "grounded", 0.0, 0.0, 0.5, False, 1)
    functions["segment_text"](paths[1], "a cup", "hybrid", 0.0, 0.0, 0.0, False, 1)
    functions["click_set_image"](paths[0])
    assert load_counts == {"sam": 1, "gdino": 1, "clip": 1}


# --------------------------------------------------------------------------------------------
# Peak memory of one segment() call on a large photo
# --------------------------------------------------------------------------------------------

_PEAK_CHILD = r"""
import json, os, resource, sys
import numpy as np, torch
from test_hardening_resources import CheapEncoder, rss_bytes
from langsam.detector import Detections
from langsam.pipeline import LangSAM
from sam_factory import make_tiny_sam

class ManyBoxes:
    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        height, width = image.shape[:2]
        count = int(sys.argv[1])
        x0 = np.arange(count, dtype=np.float32) % 8 * width / 8
        y0 = np.arange(count, dtype=np.float32) // 8 % 4 * height / 4
        boxes = np.stack([x0, y0, x0 + width / 6, y0 + height / 5], axis=1)
        return Detections(boxes=boxes, scores=np.full(count, 0.9, np.float32), labels=[queries[0]] * count,
                          label_ids=np.zeros(count, np.int64), phrases=[queries[0]] * count, queries=list(queries))

torch.manual_seed(0)
model = make_tiny_sam(seed=1)
model.image_encoder = CheapEncoder()
pipeline = LangSAM(sam_model=model, detector_model=ManyBoxes(), device="cpu")
pipeline.segment(np.zeros((64, 96, 3), np.uint8), "thing")  # warm up every code path on a small image
image = np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
def high_water_mark():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
with open("/proc/self/clear_refs", "w") as handle:  # "5": reset the peak RSS to the current RSS
    handle.write("5")
before = rss_bytes()
result = pipeline.segment(image, "thing")
peak = high_water_mark()
print(json.dumps({"objects": len(result), "working": peak - before, "masks": result.masks.nbytes}))
"""


def test_segment_peak_memory_on_a_large_photo_is_bounded():
    """32 objects on a 3000x2000 photo: the result's own masks are 32 x 6 MB; the full-resolution
    float logits of all boxes at once would add 32 x 24 MB. Working memory must stay near the
    result plus a bounded decode buffer, not grow with boxes x pixels x 4 bytes."""
    import json
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]),
           # A fixed mmap threshold: every large buffer is returned to the system when freed, so
           # the peak RSS measures live memory, not what glibc kept cached from earlier calls.
           "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}
    completed = subprocess.run([sys.executable, "-c", _PEAK_CHILD, "32"], env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["objects"] == 32
    # Decoding all 32 boxes at once needs ~850 MiB beyond the masks here; a decode buffer bounded
    # at 256 MiB of logits needs ~240 MiB.
    assert report["working"] < report["masks"] + 480 * MIB, (
        f"segment() needed {report['working'] / MIB:.0f} MiB for {report['masks'] / MIB:.0f} MiB of masks"
    )
