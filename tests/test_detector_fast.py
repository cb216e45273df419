"""langsam.gdino_fast: the fast Grounding DINO forward equals transformers' on the same weights.

Kernels against transformers' own modules on random inputs; whole forward passes against
``model(**inputs)`` with each speed-up on and off; the detector (post-processing, labels) against
transformers' forward + post-processing; ``detect_batch`` against one image at a time; the
caches; ``detector_size``; bad arguments. Tiny models with every parameter drawn at random
(tests/tiny_gdino.randomize_grounding_dino), real photos, several input sizes.

Everything here runs on one thread: the tiny models make hundreds of small ops, and on a
shared 2-core machine each multi-threaded op can wait for a busy core.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from langsam.detector import GroundingDinoDetector
from langsam.gdino_fast import (FastGroundingDino, Speedups, fused_image_text_attention,
                                multi_scale_deformable_attention, sdpa_attention, unsupported_reason)
from langsam.gdino_fast.attention import additive_mask
from langsam.gdino_fast.runner import phrase_attention, sine_embedding
from sam_factory import real_photo
from tiny_gdino import make_processor, reference_detection, save_tiny_grounding_dino

LOGIT_SCALE = 0.01  # decoder norm x0.01: token probabilities spread over ~0.49-0.52, all distinct
NUM_QUERIES = 20
QUERIES_8 = ["a cat", "a dog", "a remote control", "a sofa", "a red blanket", "a cup", "a person", "a tree"]
BOX_TOLERANCE = 1e-3  # pixels
SCORE_TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino_fast"), seed=3, logit_scale=LOGIT_SCALE,
                                    randomize=True, num_queries=NUM_QUERIES)


@pytest.fixture(scope="module")
def detector(gdino_dir):
    return GroundingDinoDetector(str(gdino_dir), device="cpu").load()


@pytest.fixture(scope="module")
def model(detector):
    return detector.model


@pytest.fixture(scope="module")
def processor(detector):
    return detector.processor


def _inputs(processor, photo, caption):
    return dict(processor(images=photo, text=caption, return_tensors="pt"))


def _assert_outputs_close(ours, reference, image_size):
    finite = torch.isfinite(reference.logits)
    assert torch.equal(finite, torch.isfinite(ours.logits)), "-inf (non-token) positions differ"
    torch.testing.assert_close(ours.logits[finite], reference.logits[finite], rtol=0, atol=1e-5)
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    assert ((ours.pred_boxes - reference.pred_boxes).abs() * scale).max() < BOX_TOLERANCE


# ---------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deformable_attention_matches_grid_sample_path(dtype):
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 11), (4, 6), (3, 1), (1, 1)]  # odd sizes, a single column, a single pixel
    batch, heads, channels, queries, points = 2, 3, 5, 37, 3
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, channels, generator=generator, dtype=dtype)
    # Points inside, on the edges, partly outside (one pixel beyond) and far outside the maps.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0], dtype=dtype)
    locations[0, 0, 0, :, 1] = torch.tensor([1.0, 1.0], dtype=dtype)
    locations[0, 1, :, :, :, 0] = -5.0
    locations[1, 2, :, :, :, 1] = 7.5
    weights = torch.softmax(torch.randn(batch, queries, heads, len(shapes) * points, generator=generator,
                                        dtype=dtype), -1).view(batch, queries, heads, len(shapes), points)
    spatial = torch.tensor(shapes)
    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    expected = MultiScaleDeformableAttention()(value, spatial, shapes, starts, locations, weights, 64)
    ours = multi_scale_deformable_attention(value, shapes, locations, weights)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ours, expected, rtol=0, atol=tolerance)
    assert ours[0, 1].abs().max() == 0 and ours[1, 2].abs().max() == 0  # fully outside: zeros
    chunked = multi_scale_deformable_attention(value, shapes, locations, weights, chunk_queries=5)
    torch.testing.assert_close(chunked, ours, rtol=0, atol=0)


def test_deformable_attention_rejects_mismatched_shapes():
    value = torch.zeros(1, 10, 2, 4)
    locations = torch.zeros(1, 3, 2, 2, 1, 2)
    weights = torch.zeros(1, 3, 2, 2, 1)
    with pytest.raises(ValueError, match="spatial shapes cover"):
        multi_scale_deformable_attention(value, [(2, 2), (2, 2)], locations, weights)
    with pytest.raises(ValueError, match="2 sampling levels"):
        multi_scale_deformable_attention(value, [(2, 5)], locations, weights)


def _randomized(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def test_fused_image_text_attention_matches_module():
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoBiMultiHeadAttention

    from tiny_gdino import make_tiny_gdino_config

    module = _randomized(GroundingDinoBiMultiHeadAttention(make_tiny_gdino_config()), seed=1).double()
    generator = torch.Generator().manual_seed(2)
    vision = torch.randn(2, 50, 32, generator=generator, dtype=torch.float64)
    text = torch.randn(2, 9, 32, generator=generator, dtype=torch.float64)
    vision_padding = torch.zeros(2, 50, dtype=torch.bool)
    vision_padding[1, 35:] = True
    text_padding = torch.zeros(2, 9, dtype=torch.bool)
    text_padding[0, 6:] = True
    with torch.no_grad():
        (vision_expected, _), (text_expected, _) = module(vision, text, vision_padding, text_padding)
        vision_ours, text_ours = fused_image_text_attention(module, vision, text, vision_padding, text_padding)
        torch.testing.assert_close(vision_ours, vision_expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(text_ours, text_expected, rtol=0, atol=1e-12)
        # No padding at all.
        (vision_expected, _), (text_expected, _) = module(vision, text, None, None)
        vision_ours, text_ours = fused_image_text_attention(module, vision, text, None, None)
        torch.testing.assert_close(vision_ours, vision_expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(text_ours, text_expected, rtol=0, atol=1e-12)


def test_sdpa_attention_matches_module():
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMultiheadAttention

    from tiny_gdino import make_tiny_gdino_config

    module = _randomized(GroundingDinoMultiheadAttention(make_tiny_gdino_config(), num_attention_heads=4), seed=3)
    generator = torch.Generator().manual_seed(4)
    queries, keys = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 5, 32, generator=generator)
    allowed = torch.rand(2, 1, 7, 5, generator=generator) > 0.3
    allowed[..., 0] = True  # every query may attend somewhere
    mask = additive_mask(allowed, torch.float32)
    with torch.no_grad():
        expected = module(queries, keys, keys, attention_mask=mask.expand(-1, 4, -1, -1))[0]
        torch.testing.assert_close(sdpa_attention(module, queries, keys, keys, mask), expected, rtol=0, atol=1e-5)
        expected = module(queries, keys, keys)[0]
        torch.testing.assert_close(sdpa_attention(module, queries, keys, keys), expected, rtol=0, atol=1e-5)


def test_phrase_attention_and_sine_embedding_match_transformers():
    import inspect

    from transformers.models.grounding_dino import modeling_grounding_dino as reference

    special = torch.tensor([101, 102, 1012, 1029])
    cases = torch.tensor([
        [101, 1037, 4937, 1012, 1037, 3899, 1012, 102, 0, 0],  # two phrases, padding
        [101, 1037, 4937, 1012, 1012, 2054, 1029, 2003, 102, 0],  # empty phrase, "?", tail without dot
        [101, 2000, 2001, 2002, 2003, 2004, 2005, 2006, 2007, 102],  # no dot at all
    ])
    masks_and_positions = reference.generate_masks_with_special_tokens_and_transfer_map
    old_signature = len(inspect.signature(masks_and_positions).parameters) == 1  # transformers 4.x
    mask, positions = phrase_attention(cases, special)
    for row in range(len(cases)):  # one caption at a time (4.x mixes rows up in a batch)
        ids = cases[row:row + 1]
        expected_mask, expected_positions = (masks_and_positions(ids) if old_signature
                                             else masks_and_positions(ids, special))
        assert torch.equal(mask[row:row + 1], expected_mask) and torch.equal(positions[row:row + 1], expected_positions)

    coordinates = torch.rand(2, 5, 4)
    for count, features in ((4, 64), (2, 16), (1, 32)):
        if hasattr(reference, "encode_sinusoidal_position_embedding"):
            expected = reference.encode_sinusoidal_position_embedding(coordinates[..., :count], num_pos_feats=features)
        else:  # transformers 4.x
            expected = reference.get_sine_pos_embed(coordinates[..., :count], num_pos_feats=features,
                                                    exchange_xy=count > 1)
        torch.testing.assert_close(sine_embedding(coordinates[..., :count], features), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- whole forward
SWITCHES = {
    "none": Speedups.none(),
    "deformable_attention": Speedups.none().but(deformable_attention=True),
    "fused_fusion": Speedups.none().but(fused_fusion=True),
    "sdpa": Speedups.none().but(sdpa=True),
    "proposals_first": Speedups.none().but(proposals_first=True),
    "caches": Speedups.none().but(text_cache=4, geometry_cache=4),
    "all": Speedups(),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_forward_matches_transformers_per_switch(model, processor, name):
    fast = FastGroundingDino(model, SWITCHES[name])
    for photo_name, caption in (("chelsea", "a cat."), ("coffee", " ".join(q + "." for q in QUERIES_8))):
        photo = real_photo(photo_name)
        inputs = _inputs(processor, photo, caption)
        with torch.inference_mode():
            expected = model(**inputs)
            ours = fast(**inputs)
            again = fast(**inputs)  # from the caches where they are on
        if name == "none":  # every step is transformers': the same numbers
            assert torch.equal(ours.logits, expected.logits) and torch.equal(ours.pred_boxes, expected.pred_boxes)
        _assert_outputs_close(ours, expected, photo.shape[:2])
        assert torch.equal(again.logits, ours.logits) and torch.equal(again.pred_boxes, ours.pred_boxes)


def test_forward_with_padded_batch_matches_transformers(model, processor):
    # transformers' processor pads two differently sized photos to one batch (pixel_mask 0 on
    # padding) and pads the shorter caption: the masked paths of every step.
    photos = [real_photo("chelsea"), real_photo("rocket")]
    inputs = dict(processor(images=photos, text=["a cat. a remote control.", "a rocket."], padding=True,
                            return_tensors="pt"))
    assert not inputs["pixel_mask"].bool().all() and not inputs["attention_mask"].bool().all()
    with torch.inference_mode():
        expected = model(**inputs)
        ours = FastGroundingDino(model)(**inputs)
    _assert_outputs_close(ours, expected, (640, 640))


# ---------------------------------------------------------------------- detector
def _assert_detections_match(detections, reference):
    assert len(detections) == len(reference["boxes"])
    np.testing.assert_allclose(detections.boxes, reference["boxes"].numpy(), rtol=0, atol=BOX_TOLERANCE)
    np.testing.assert_allclose(detections.scores, reference["scores"].numpy(), rtol=0, atol=SCORE_TOLERANCE)
    assert detections.phrases == list(reference["text_labels"])


def _split_threshold(probabilities):
    """A box threshold between two well-separated scores near the median: some boxes kept,
    some dropped, none within float rounding of the threshold."""
    scores = probabilities.max(dim=-1).values.sort().values
    low, high = len(scores) // 4, 3 * len(scores) // 4
    gaps = scores[low + 1:high + 1] - scores[low:high]
    best = int(gaps.argmax())
    assert gaps[best] > 1e-4, "scores too close together to place a threshold"
    return float(scores[low + best] + scores[low + best + 1]) / 2


@pytest.mark.parametrize("photo_name, queries", [
    ("chelsea", ["a cat"]),
    ("astronaut", QUERIES_8),
    ("rocket", ["a rocket", "smoke"]),
])
def test_detect_matches_transformers_post_processing(detector, photo_name, queries):
    photo = real_photo(photo_name)
    reference_detector = GroundingDinoDetector(model=detector.model, processor=detector.processor, fast=False)
    caption = " ".join(q.lower() + "." for q in queries)
    _, probabilities, _ = reference_detection(detector.processor, detector.model, photo, caption, 0.0, 0.25)
    threshold = _split_threshold(probabilities)
    _, _, reference = reference_detection(detector.processor, detector.model, photo, caption, threshold, 0.5)
    assert 0 < len(reference["boxes"]) < NUM_QUERIES
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecated "labels" key stays unread
        ours = detector.detect(photo, queries, box_threshold=threshold, text_threshold=0.5)
        plain = reference_detector.detect(photo, queries, box_threshold=threshold, text_threshold=0.5)
    _assert_detections_match(ours, reference)
    assert ours.labels == plain.labels and ours.label_ids.tolist() == plain.label_ids.tolist()
    np.testing.assert_array_equal(plain.boxes, reference["boxes"].numpy())  # fast=False is transformers' forward


def test_long_caption_split_matches_transformers(tmp_path):
    folder = save_tiny_grounding_dino(tmp_path / "short", seed=5, logit_scale=LOGIT_SCALE, randomize=True,
                                      num_queries=NUM_QUERIES, max_text_len=16)
    fast = GroundingDinoDetector(str(folder)).load()
    plain = GroundingDinoDetector(model=fast.model, processor=fast.processor, fast=False)
    queries = ["a cat", "a dog", "a red car", "a tree", "a blue sky", "a house", "green grass"]
    assert len(fast.build_captions(queries)) > 1
    photo = real_photo("coffee")
    ours, expected = fast.detect(photo, queries, box_threshold=0.0), plain.detect(photo, queries, box_threshold=0.0)
    assert fast.forward_passes == plain.forward_passes == len(fast.build_captions(queries))
    np.testing.assert_allclose(ours.boxes, expected.boxes, rtol=0, atol=BOX_TOLERANCE)
    np.testing.assert_allclose(ours.scores, expected.scores, rtol=0, atol=SCORE_TOLERANCE)
    assert ours.labels == expected.labels and ours.phrases == expected.phrases
    # Batched: the split captions of two images in one pass each.
    batched = fast.detect_batch([photo, photo[:, ::-1]], queries, box_threshold=0.0, batch_size=4)
    np.testing.assert_allclose(batched[0].boxes, ours.boxes, rtol=0, atol=BOX_TOLERANCE)
    assert batched[0].labels == ours.labels


def test_detect_batch_equals_one_image_at_a_time(detector):
    chelsea, coffee = real_photo("chelsea"), real_photo("coffee")
    images = [chelsea, coffee, np.ascontiguousarray(chelsea[:, ::-1]), chelsea, real_photo("astronaut")]
    queries = [["a cat"], QUERIES_8, ["a cat", "a remote control"], ["a cat", "a dog"], ["a person"]]
    singles = [detector.detect(image, query, box_threshold=0.49) for image, query in zip(images, queries)]
    before = detector.forward_passes
    batched = detector.detect_batch(images, queries, box_threshold=0.49, batch_size=3)
    # Same-size inputs share passes: the three chelsea images (one pass), coffee, astronaut.
    assert detector.forward_passes - before == 3
    assert sum(len(d) for d in singles) > 0
    for single, batch in zip(singles, batched):
        np.testing.assert_allclose(batch.boxes, single.boxes, rtol=0, atol=BOX_TOLERANCE)
        np.testing.assert_allclose(batch.scores, single.scores, rtol=0, atol=SCORE_TOLERANCE)
        assert batch.labels == single.labels and batch.phrases == single.phrases and batch.queries == single.queries
    # One text for all images (a string, or a list of queries); on CPU one image per pass.
    before = detector.forward_passes
    same_text = detector.detect_batch(images[:2], "a cat", box_threshold=0.49)
    assert detector.forward_passes - before == 2
    np.testing.assert_allclose(same_text[0].boxes, singles[0].boxes, rtol=0, atol=BOX_TOLERANCE)
    same_list = detector.detect_batch([images[2]], ["a cat", "a remote control"], box_threshold=0.49)
    np.testing.assert_allclose(same_list[0].boxes, singles[2].boxes, rtol=0, atol=BOX_TOLERANCE)
    assert detector.detect_batch([], "a cat") == []


def test_detect_batch_with_transformers_forward(detector):
    plain = GroundingDinoDetector(model=detector.model, processor=detector.processor, fast=False)
    chelsea = real_photo("chelsea")
    images, queries = [chelsea, chelsea[::-1]], [["a cat"], QUERIES_8]  # padded captions in one pass
    singles = [plain.detect(image, query, box_threshold=0.49) for image, query in zip(images, queries)]
    batched = plain.detect_batch(images, queries, box_threshold=0.49, batch_size=2)
    for single, batch in zip(singles, batched):
        np.testing.assert_allclose(batch.boxes, single.boxes, rtol=0, atol=BOX_TOLERANCE)
        assert batch.labels == single.labels


def test_text_and_geometry_caches_are_reused_and_bounded(model, processor):
    fast = FastGroundingDino(model, Speedups(text_cache=2, geometry_cache=1))
    detector = GroundingDinoDetector(model=model, processor=processor, fast=fast.speedups)
    detector._fast_model = fast
    photos = [real_photo("chelsea"), real_photo("coffee"), real_photo("chelsea")[::-1]]
    for photo in photos:
        detector.detect(photo, "a cat. a dog")
    assert fast.text_encodings == 1  # one caption, three images
    for caption in ("a cup", "a spoon", "a plate"):
        detector.detect(photos[0], caption)
    assert fast.text_encodings == 4 and len(fast._text_cache) == 2 and len(fast._geometry_cache) == 1
    detector.detect(photos[0], "a plate")  # still cached
    assert fast.text_encodings == 4
    detector.clear_cache()
    detector.detect(photos[0], "a plate")
    assert fast.text_encodings == 5
    off = FastGroundingDino(model, Speedups(text_cache=0, geometry_cache=0))
    inputs = _inputs(processor, photos[0], "a cat.")
    with torch.inference_mode():
        off(**inputs), off(**inputs)
    assert off.text_encodings == 2 and not off._text_cache and not off._geometry_cache


def test_detector_size(detector):
    photo = real_photo("coffee")  # 400 x 600
    small = GroundingDinoDetector(model=detector.model, processor=detector.processor, detector_size=256)
    assert max(small._image_inputs(photo)["pixel_values"].shape[-2:]) == 256
    assert max(detector._image_inputs(photo)["pixel_values"].shape[-2:]) == 480  # the processor's own resize
    # The same as transformers with a processor resizing to 256 on the longest side.
    processor_256 = make_processor(256, 256)
    _, _, reference = reference_detection(processor_256, detector.model, photo, "a cup. a spoon.", 0.45, 0.25)
    _assert_detections_match(small.detect(photo, ["a cup", "a spoon"], box_threshold=0.45), reference)
    for bad in (10, 63, 256.0, "256", True):
        with pytest.raises(ValueError, match="detector_size"):
            GroundingDinoDetector(model=detector.model, processor=detector.processor, detector_size=bad)


def test_bad_arguments(detector, model):
    photo = real_photo("chelsea")
    with pytest.raises(ValueError, match="fast must be"):
        GroundingDinoDetector(model=detector.model, processor=detector.processor, fast="yes")
    with pytest.raises(ValueError, match="unknown speed-up"):
        Speedups().but(turbo=True)
    with pytest.raises(ValueError, match="2 images but 3 per-image"):
        detector.detect_batch([photo, photo], [["a"], ["b"], ["c"]])
    with pytest.raises(ValueError, match="one list of query strings per image"):
        detector.detect_batch([photo, photo], [["a"], "b"])
    with pytest.raises(ValueError, match="batch_size"):
        detector.detect_batch([photo], "a cat", batch_size=0)
    with pytest.raises(ValueError, match="text is empty"):
        detector.detect_batch([photo, photo], [["a cat"], [" . "]])
    with pytest.raises(ValueError, match="queries must be"):
        detector.detect_batch([photo], 42)
    fast = FastGroundingDino(model)
    inputs = _inputs(detector.processor, photo, "a cat.")
    with pytest.raises(ValueError, match="expected pixel_values"):
        fast(inputs["pixel_values"][0], inputs["input_ids"])
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        fast(inputs["pixel_values"], inputs["input_ids"].repeat(2, 1))
    model.train()
    try:
        with pytest.raises(ValueError, match="inference"):
            FastGroundingDino(model)(**_inputs(detector.processor, photo, "a cat."))
    finally:
        model.eval()


def test_unsupported_model_falls_back_to_transformers(caplog, model, processor):
    import copy

    # A model whose config says one-stage (transformers' one-stage Grounding DINO cannot be
    # built in every version, so the outer config is swapped on a shallow copy; the inner model
    # still runs two-stage).
    one_stage = copy.copy(model)
    one_stage.config = copy.deepcopy(model.config)
    one_stage.config.two_stage = False
    assert "two-stage" in unsupported_reason(one_stage)
    with pytest.raises(ValueError, match="two-stage"):
        FastGroundingDino(one_stage)
    assert "not a transformers" in unsupported_reason(torch.nn.Linear(2, 2))
    detector = GroundingDinoDetector(model=one_stage, processor=processor)
    photo = real_photo("chelsea")
    with caplog.at_level("WARNING", logger="langsam.detector"):
        detections = detector.detect(photo, "a cat", box_threshold=0.0)
    assert detector.fast_model is None and "fast Grounding DINO path off" in caplog.text
    _, _, reference = reference_detection(processor, model, photo, "a cat.", 0.0, 0.25)
    np.testing.assert_array_equal(detections.boxes, reference["boxes"].numpy())
