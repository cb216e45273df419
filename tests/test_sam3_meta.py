"""SAM 3 image model (sam.sam3) against Meta's own `sam3` 0.1.4 on the same tiny random weights.

Meta's model is assembled from its own classes at the tiny sizes of tests/sam3_factory.py and made to
run on CPU by tests/meta_sam3_shim.py (see its docstring: no CUDA precomputation, `pin_memory` a
no-op while Meta's code runs, triton's edt stubbed where triton is missing, open_clip's BPE file, no
hub download). It loads, strictly, a checkpoint in Meta's `sam3.pt` layout: the factory's detector
plus Meta's point-prompt projections (transformers has none, so they get their own random values
here). Meta's `Sam3Processor` runs end to end (its resize, its decoder, its post-processing: logits
resized, then sigmoid > 0.5) on a small non-square photo; its raw decoder outputs are captured too.
The factory's rescaled layers keep scores apart and masks textured, and each test checks that
Meta's outputs are not trivial.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meta_sam3_shim import build_meta_sam3_image, load_meta_weights, meta_cpu, with_point_projections  # before any `sam3`
from PIL import Image
from sam3_factory import save_tiny_sam3
from skimage import data

from sam.sam3 import Sam3Predictor, load_sam3

pytest.importorskip("sam3.model.sam3_image_processor")  # Meta's sam3 (README's test command installs it)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, HEIGHT = 160, 120
TEXTS = ("a dog", "the astronaut's helmet")
POSITIVE, NEGATIVE = (40.0, 20.0, 104.0, 90.0), (110.0, 60.0, 150.0, 110.0)  # xyxy pixels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The factory's transformers directory, and its Meta file with the point projections added."""
    root = tmp_path_factory.mktemp("sam3meta")
    saved = save_tiny_sam3(root)
    full = with_point_projections(saved["meta"], root / "meta_full")
    assert sum(k.startswith("detector.geometry_encoder.points_") for k in torch.load(full, weights_only=True)["model"]) == 6
    return {"meta": full, "transformers": saved["transformers"]}


@pytest.fixture(scope="module")
def meta(checkpoints):
    """Meta's Sam3Image with the same weights; every decoder output it produces is kept in `.outputs`."""
    model = load_meta_weights(build_meta_sam3_image(load_sam3(checkpoints["meta"]).config), checkpoints["meta"])
    model.outputs = []
    forward_grounding = model.forward_grounding

    def recording(*args, **kwargs):
        out = forward_grounding(*args, **kwargs)
        model.outputs.append(out)
        return out

    model.forward_grounding = recording
    return model


@pytest.fixture(scope="module")
def ours(checkpoints):
    return load_sam3(checkpoints["meta"])


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.fromarray(data.astronaut()).resize((WIDTH, HEIGHT), Image.BILINEAR))


@pytest.fixture(scope="module")
def processor(meta, ours):
    from sam3.model.sam3_image_processor import Sam3Processor

    return Sam3Processor(meta, resolution=ours.config.image_size, device="cpu", confidence_threshold=0.0)


@pytest.fixture(scope="module")
def meta_state(processor, photo):
    with meta_cpu():
        return processor.set_image(Image.fromarray(photo))  # a PIL image: Meta misreads (H, W, 3) arrays' size


@pytest.fixture(scope="module")
def predictor(ours, photo):
    predictor = Sam3Predictor(ours)
    predictor.set_image(photo)
    return predictor


def _cxcywh(box):
    x0, y0, x1, y1 = box
    return [(x0 + x1) / 2 / WIDTH, (y0 + y1) / 2 / HEIGHT, (x1 - x0) / WIDTH, (y1 - y0) / HEIGHT]


def _run_meta(processor, meta, state, text=None, exemplars=()):
    """Meta's processor on a fresh prompt: (its post-processed state, its raw decoder outputs)."""
    processor.reset_all_prompts(state)
    meta.outputs.clear()
    with meta_cpu():
        if text is not None:
            state = processor.set_text_prompt(text, state)
        for box, positive in exemplars:  # each call appends the box and reruns the heads
            state = processor.add_geometric_prompt(_cxcywh(box), positive, state)
    return state, meta.outputs[-1]


def _ours_raw(predictor, text, exemplars=()):
    tokens, valid = predictor._text(text)
    boxes = labels = None
    if exemplars:
        boxes, labels = predictor._exemplars(exemplars)
    with torch.no_grad():
        return predictor.model.decode(predictor._features, tokens, valid, boxes, labels)


def _assert_matches_meta(state, raw, result, ours_raw):
    scores, masks = state["scores"].numpy(), state["masks"][:, 0].numpy()
    # Meta's outputs are not trivial: scores spread, every mask neither empty nor full.
    assert len(scores) == raw["pred_logits"].shape[1] and scores.max() - scores.min() > 0.1, scores
    fill = masks.mean(axis=(1, 2))
    assert ((fill > 0.05) & (fill < 0.95)).all(), fill
    # Raw decoder outputs.
    np.testing.assert_allclose(ours_raw["logits"].numpy(), raw["pred_logits"][..., 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_raw["presence"].numpy(), raw["presence_logit_dec"].reshape(-1).numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_raw["boxes"].numpy(), raw["pred_boxes"].numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_raw["masks"].numpy(), raw["pred_masks"].numpy(), atol=1e-3)
    # Post-processed at image resolution, every query kept (threshold 0 on both sides).
    assert len(result) == len(scores)
    np.testing.assert_allclose(result.scores, scores, atol=1e-4)
    np.testing.assert_allclose(result.presence, raw["presence_logit_dec"].sigmoid().item(), atol=1e-4)
    np.testing.assert_allclose(result.boxes, state["boxes"].numpy(), atol=1e-3)
    ious = [(a & b).sum() / (a | b).sum() for a, b in zip(result.masks, masks)]
    assert min(ious) >= 0.99, ious


@pytest.mark.parametrize("text", TEXTS)
def test_text_prompt_matches_meta(processor, meta, meta_state, predictor, text):
    state, raw = _run_meta(processor, meta, meta_state, text=text)
    result = predictor.predict(text=text, threshold=0.0)
    _assert_matches_meta(state, raw, result, _ours_raw(predictor, text))


def test_exemplar_alone_matches_meta(processor, meta, meta_state, predictor):
    """Without text Meta prompts with the placeholder "visual", as Sam3Predictor does."""
    exemplars = [(POSITIVE, True)]
    state, raw = _run_meta(processor, meta, meta_state, exemplars=exemplars)
    result = predictor.predict(exemplars=exemplars, threshold=0.0)
    _assert_matches_meta(state, raw, result, _ours_raw(predictor, "visual", exemplars))


def test_exemplars_with_text_match_meta(processor, meta, meta_state, predictor):
    exemplars = [(POSITIVE, True), (NEGATIVE, False)]
    state, raw = _run_meta(processor, meta, meta_state, text="a face", exemplars=exemplars)
    result = predictor.predict(text="a face", exemplars=exemplars, threshold=0.0)
    _assert_matches_meta(state, raw, result, _ours_raw(predictor, "a face", exemplars))
    # The exemplars matter: the same text without them scores otherwise.
    _, text_only = _run_meta(processor, meta, meta_state, text="a face")
    assert (text_only["pred_logits"] - raw["pred_logits"]).abs().max() > 1e-2


def test_meta_and_transformers_layouts_give_identical_outputs(checkpoints, ours, photo):
    """The same weights from Meta's full sam3.pt and from transformers' directory. transformers has
    no point projections (the model loaded from it has none); text and box prompts never use them."""
    from_hf = load_sam3(checkpoints["transformers"])
    a, b = ours.state_dict(), from_hf.state_dict()
    points = {k for k in a if k.startswith("geometry_encoder.points_")}
    assert len(points) == 6 and set(b) == set(a) - points
    assert all(torch.equal(a[k], b[k]) for k in b)
    first, second = Sam3Predictor(ours), Sam3Predictor(from_hf)
    first.set_image(photo)
    second.set_image(photo)
    for kwargs in (dict(text="a dog"), dict(text="a face", exemplars=[(POSITIVE, True), (NEGATIVE, False)])):
        x, y = first.predict(threshold=0.0, **kwargs), second.predict(threshold=0.0, **kwargs)
        assert len(x) > 0 and np.array_equal(x.scores, y.scores) and np.array_equal(x.boxes, y.boxes)
        assert np.array_equal(x.masks, y.masks)


def test_shim_leaves_pin_memory_alone():
    original = torch.Tensor.pin_memory
    with meta_cpu():
        tensor = torch.zeros(2)
        assert tensor.pin_memory() is tensor
    assert torch.Tensor.pin_memory is original
