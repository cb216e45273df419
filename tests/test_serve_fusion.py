"""Fused decoder calls for `/v1/predict` (`ServeConfig.fuse_decoder`, `SamPredictor.predict_fused`).

The prompt sets of one batch, each on its own image, share mask decoder calls (one per number
of prompt tokens). Every test compares the fused answers with the unfused ones (one decoder
call per prompt set, the path tests/test_serve.py checks against `SamPredictor.predict`): bit
for bit, on the tiny SAM 1 (full-size decoder) and the tiny SAM 2.1, with mixed click counts,
boxes, mask prompts and multimask settings. A bad job fails alone, with the status and message
it gets unfused. The LitAPI's verbs are called directly (no HTTP), as in test_serve.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from langsam.serve import LangSAMAPI, ServeConfig
from sam import SamPredictor
from sam.modeling.mask_decoder import MaskDecoder
from sam_factory import real_photo

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

FACTORIES = {"sam1": "test_serve_support:make_tiny_sam_pipeline", "sam2.1": "test_serve_support:make_sam2_pipeline"}


@pytest.fixture(scope="module")
def images():
    photo = real_photo("chelsea")  # 300 x 451
    return [photo, np.ascontiguousarray(photo[::2, ::3]), np.ascontiguousarray(photo[40:, :200][::-1])]


class Worker:
    """A fused and an unfused LitAPI over one pipeline and one image store."""

    def __init__(self, factory: str, images: list[np.ndarray], fuse: bool | None = True) -> None:
        self.fused = LangSAMAPI(ServeConfig(pipeline_factory=factory, models={"device": "cpu"}, fuse_decoder=fuse))
        self.fused.setup("cpu")
        self.unfused = LangSAMAPI(ServeConfig(pipeline_factory=factory, models={"device": "cpu"},
                                              fuse_decoder=False))
        self.unfused.pipeline, self.unfused.images = self.fused.pipeline, self.fused.images
        predictor = self.fused.pipeline.predictor
        self.ids, self.sizes = [], []
        for image in images:
            predictor.set_image(image)
            self.ids.append(self.fused.images.add(_stored(predictor)))
            self.sizes.append(image.shape[:2])

    def run(self, api: LangSAMAPI, params: list[dict], low_res: dict | None = None) -> list[tuple[int, dict]]:
        """One batch of /v1/predict jobs; each image's kept logits set to `low_res` first."""
        for image_id, value in (low_res or {}).items():
            self.fused.images.get(image_id).low_res = value
        deadline = time.monotonic() + 600
        jobs = [api.decode_request({"op": "predict", "params": p, "deadline": deadline}) for p in params]
        return [api.encode_response(output) for output in api.predict(jobs)]


def _stored(predictor: SamPredictor):
    from langsam.serve.images import _StoredImage

    return _StoredImage(predictor.features, predictor.original_size, predictor.input_size)


@pytest.fixture(scope="module", params=list(FACTORIES))
def worker(request, images):
    return Worker(FACTORIES[request.param], images)


def click(image_id: str, **prompts) -> dict:
    return {"image_id": image_id, "points": None, "labels": None, "box": None, "mask_input": None,
            "previous_mask": None, "multimask": True, "return_low_res": True, **prompts}


@pytest.fixture
def decoder_calls(monkeypatch):
    """How many times the mask decoder runs (`predict_masks`)."""
    calls = []
    original = MaskDecoder.predict_masks

    def counted(self, *args, **kwargs):
        calls.append(args[2].shape[0])  # prompt sets in this call
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MaskDecoder, "predict_masks", counted)
    return calls


def mixed_batch(worker: Worker) -> list[dict]:
    """Good and bad jobs on three images: 1-3 clicks, boxes, both, mask prompts, previous_mask."""
    a, b, c = worker.ids
    (ha, wa), (hb, wb), (hc, wc) = worker.sizes
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(256, 256)) * 4).astype(np.float32)
    return [
        click(a, points=[[120.0, 90.0]], labels=[1]),
        click(b, points=[[30.0, 40.0], [100.0, 60.0]], labels=[1, 0], multimask=False),
        click(a, box=[60.0, 40.0, 330.0, 260.0]),
        click(b, points=[[50.0, 50.0]], labels=[1], box=[10.0, 10.0, wb - 5.0, hb - 5.0], multimask=False),
        click(c, points=[[20.0, 30.0]], labels=[1], mask_input=logits[None]),
        click(a, previous_mask=2, points=[[200.0, 150.0]], labels=[0], multimask=False),  # after job 0 and 2
        click(b, points=[[wb + 40.0, 10.0]], labels=[1]),                            # outside the image: 400
        click("no-such-image", points=[[10.0, 10.0]], labels=[1]),                   # 404
        click(c, box=[100.0, 10.0, 50.0, 60.0]),                                     # x1 < x0: 400
        click(a, points=[[10.0, 10.0]]),                                             # points without labels: 400
        click(c, mask_input=np.zeros((1, 64, 64), np.float32)),                      # mask of the wrong size: 400
        click(c, points=[[wc / 2, hc / 2], [5.0, 5.0], [wc - 1.0, hc - 1.0]], labels=[1, 1, 0]),
        click(b, box=[0.0, 0.0, wb, hb], multimask=False, return_low_res=False),
    ]


def assert_same_answers(fused: list[tuple[int, dict]], unfused: list[tuple[int, dict]]) -> None:
    assert [status for status, _ in fused] == [status for status, _ in unfused]
    for (status, got), (_, expected) in zip(fused, unfused):
        assert got.keys() == expected.keys()
        if status != 200:
            assert got == expected
            continue
        assert [m["counts"] for m in got["masks"]] == [m["counts"] for m in expected["masks"]]
        np.testing.assert_array_equal(np.array(got["scores"], np.float32), np.array(expected["scores"], np.float32))
        assert got.get("low_res_masks") == expected.get("low_res_masks")  # base64 of float32 logits: bit for bit


def test_fused_batch_equals_one_at_a_time(worker, decoder_calls):
    batch = mixed_batch(worker)
    unfused = worker.run(worker.unfused, batch, low_res={image_id: None for image_id in worker.ids})
    unfused_kept = [worker.fused.images.get(image_id).low_res for image_id in worker.ids]
    unfused_calls = list(decoder_calls)
    decoder_calls.clear()
    fused = worker.run(worker.fused, batch, low_res={image_id: None for image_id in worker.ids})
    fused_kept = [worker.fused.images.get(image_id).low_res for image_id in worker.ids]
    assert [status for status, _ in unfused] == [200, 200, 200, 200, 200, 200, 400, 404, 400, 400, 400, 200, 200]
    assert "outside the" in unfused[6][1]["detail"] and "unknown image_id" in unfused[7][1]["detail"]
    assert_same_answers(fused, unfused)
    # Unfused: one call per good job. Fused: one per token count in the first wave (jobs 0-4,
    # 11, 12), then the previous_mask job, which reuses job 2's answer, alone.
    assert unfused_calls == [1] * 8
    assert sum(decoder_calls) == 8 and len(decoder_calls) < 7 and max(decoder_calls) >= 2
    # Each image keeps the logits of its last answer (for a later previous_mask), as unfused.
    for got, expected in zip(fused_kept, unfused_kept):
        np.testing.assert_array_equal(got, expected)


def test_previous_mask_chain_in_one_batch(worker):
    """Three refinements of one image in one batch: each uses the answer before it."""
    a, b, _ = worker.ids
    batch = [click(a, points=[[100.0, 80.0]], labels=[1]),
             click(b, points=[[40.0, 30.0]], labels=[1]),
             click(a, previous_mask=0, points=[[150.0, 100.0]], labels=[1]),
             click(a, points=[[300.0, 200.0]], labels=[0], multimask=False),
             click(a, previous_mask=2, multimask=False),                       # refers to a 1-candidate answer: 400
             click(b, previous_mask=1, points=[[60.0, 30.0]], labels=[1], multimask=False)]
    start = {a: None, b: None}
    unfused = worker.run(worker.unfused, batch, low_res=start)
    fused = worker.run(worker.fused, batch, low_res=start)
    assert [status for status, _ in unfused] == [200, 200, 200, 200, 400, 200]
    assert_same_answers(fused, unfused)


def test_a_failing_fused_call_falls_back_to_one_at_a_time(worker, monkeypatch):
    batch = mixed_batch(worker)[:5]
    unfused = worker.run(worker.unfused, batch, low_res={image_id: None for image_id in worker.ids})
    predictor = worker.fused.pipeline.predictor

    def broken(prompt_sets, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(predictor, "predict_fused", broken)
    fused = worker.run(worker.fused, batch, low_res={image_id: None for image_id in worker.ids})
    assert_same_answers(fused, unfused)


def test_predict_fused_equals_predict(worker):
    """The predictor on its own: logits (return_logits), scores and low-res logits of every set
    equal `set_embedding` + `predict`, also when groups are split (max_batch)."""
    predictor = worker.fused.pipeline.predictor
    stored = [(entry.features, entry.original_size, entry.input_size)
              for entry in (worker.fused.images.get(image_id) for image_id in worker.ids[:2])]
    rng = np.random.default_rng(0)
    prompts = []
    for index, count in enumerate([1, 2, 1, 0, 1]):
        height, width = stored[index % 2][1]
        prompts.append({
            "point_coords": np.c_[rng.uniform(0, width, count), rng.uniform(0, height, count)] if count else None,
            "point_labels": rng.integers(0, 2, count) if count else None,
            "box": np.array([5.0, 8.0, width * 0.6, height * 0.9]) if index in (2, 3) else None,
            "mask_input": (rng.normal(size=(1, 256, 256)) * 3).astype(np.float32) if index == 4 else None,
            "multimask_output": index % 3 != 1,
        })
    expected = []
    for index, prompt in enumerate(prompts):
        predictor.set_embedding(*stored[index % 2])
        expected.append(predictor.predict(**prompt, return_logits=True))
    sets = [predictor.prompt_set(*stored[index % 2], **prompt) for index, prompt in enumerate(prompts)]
    for max_batch in (None, 2):
        got = predictor.predict_fused(sets, return_logits=True, max_batch=max_batch)
        for (logits, scores, low_res), (want_logits, want_scores, want_low_res) in zip(got, expected):
            np.testing.assert_array_equal(logits, want_logits)
            np.testing.assert_array_equal(scores, want_scores)
            np.testing.assert_array_equal(low_res, want_low_res)
    # Bad prompts are refused when the set is made, with predict's message.
    height, width = stored[0][1]
    with pytest.raises(ValueError, match="lie outside the"):
        predictor.prompt_set(*stored[0], point_coords=[[width + 1.0, 0.0]], point_labels=[1])
    with pytest.raises(ValueError, match="features"):
        predictor.prompt_set(np.zeros(3), *stored[0][1:], box=[0, 0, 5, 5])


def test_switch(monkeypatch, worker, decoder_calls):
    monkeypatch.delenv("LANGSAM_SERVE_FUSE", raising=False)
    assert ServeConfig().fuse_decoder is True  # on by default (see the README)
    monkeypatch.setenv("LANGSAM_SERVE_FUSE", "0")
    assert ServeConfig().fuse_decoder is False
    assert ServeConfig(fuse_decoder=True).fuse_decoder is True  # an explicit setting wins
    monkeypatch.setenv("LANGSAM_SERVE_FUSE", "1")
    assert ServeConfig().fuse_decoder is True
    assert ServeConfig(fuse_decoder=False).fuse_decoder is False
    monkeypatch.setenv("LANGSAM_SERVE_FUSE", "maybe")
    with pytest.raises(ValueError, match="LANGSAM_SERVE_FUSE must be 1 or 0"):
        ServeConfig()
    with pytest.raises(ValueError, match="fuse_decoder must be"):
        ServeConfig(fuse_decoder="yes")
    # Switched off by the environment, a worker decodes each job alone: the same answers.
    monkeypatch.setenv("LANGSAM_SERVE_FUSE", "0")
    api = LangSAMAPI(ServeConfig(pipeline_factory=FACTORIES["sam1"], models={"device": "cpu"}))
    assert api.config.fuse_decoder is False
    api.pipeline, api.images = worker.fused.pipeline, worker.fused.images
    batch = [click(worker.ids[0], points=[[100.0, 100.0]], labels=[1]),
             click(worker.ids[1], points=[[30.0, 20.0]], labels=[1])]
    decoder_calls.clear()
    off = worker.run(api, batch)
    assert decoder_calls == [1, 1]
    decoder_calls.clear()
    on = worker.run(worker.fused, batch)
    assert decoder_calls == [2]
    assert_same_answers(on, off)
