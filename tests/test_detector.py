"""langsam.detector: parity with transformers' own Grounding DINO post-processing, one forward
pass per caption, query labels, long-caption splitting. Tiny random model, real photo.

The detector runs the fast forward by default (langsam.gdino_fast, equal up to float rounding:
boxes within 1e-3 px, scores within 1e-6); with ``fast=False`` it runs transformers' own forward
and must match it exactly. tests/test_detector_fast.py covers the fast path in depth."""

from __future__ import annotations

import numpy as np
import pytest

from langsam.detector import GroundingDinoDetector, parse_queries, post_process, query_token_spans
from sam_factory import real_photo
from tiny_gdino import reference_detection, save_tiny_grounding_dino

# logit_scale 0.1: token probabilities spread over ~0.5-0.8, so box_threshold 0.6 keeps some
# boxes and drops others (both paths are exercised).
LOGIT_SCALE = 0.1
NUM_QUERIES = 8


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino"), logit_scale=LOGIT_SCALE, num_queries=NUM_QUERIES)


@pytest.fixture(scope="module")
def detector(gdino_dir):
    return GroundingDinoDetector(str(gdino_dir), device="cpu").load()


def assert_same_detections(detector, detections, reference):
    """Exact with transformers' forward; up to float rounding with the fast one."""
    if detector.speedups is None:
        np.testing.assert_array_equal(detections.boxes, reference["boxes"].numpy())
        np.testing.assert_array_equal(detections.scores, reference["scores"].numpy())
    else:
        np.testing.assert_allclose(detections.boxes, reference["boxes"].numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose(detections.scores, reference["scores"].numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def photo():
    return real_photo("chelsea")


def _reference(detector, photo, caption, box_threshold, text_threshold):
    return reference_detection(detector.processor, detector.model, photo, caption, box_threshold, text_threshold)


def _query_positions(tokenizer, input_ids, query):
    """Token positions of `query` inside the caption ids, found by sub-sequence search."""
    ids = tokenizer(query.lower(), add_special_tokens=False)["input_ids"]
    for start in range(len(input_ids) - len(ids) + 1):
        if input_ids[start:start + len(ids)] == ids:
            return list(range(start, start + len(ids)))
    raise AssertionError(f"{query!r} not in caption")


def test_parse_queries():
    assert parse_queries("a dog. a cat.") == ["a dog", "a cat"]
    assert parse_queries(["A Dog", "  a   cat ", "a dog", ""]) == ["A Dog", "a cat"]
    assert parse_queries("  remote control ") == ["remote control"]
    for empty in ["", "   ", " . . ", [], ["", "  "]]:
        with pytest.raises(ValueError, match="text is empty"):
            parse_queries(empty)
    with pytest.raises(ValueError, match="string"):
        parse_queries(42)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "transformers"])
def test_detect_matches_transformers_and_labels_come_from_user_queries(detector, photo, fast):
    detector = GroundingDinoDetector(model=detector.model, processor=detector.processor, fast=fast)
    queries = ["A Cat", "a remote control"]
    before = detector.forward_passes
    detections = detector.detect(photo, queries, box_threshold=0.6, text_threshold=0.25)
    assert detector.forward_passes == before + 1  # both queries in one caption, one pass

    input_ids, probabilities, reference = _reference(detector, photo, "a cat. a remote control.", 0.6, 0.25)
    assert 0 < len(detections) < NUM_QUERIES, "threshold should keep some boxes and drop others"
    assert_same_detections(detector, detections, reference)
    assert detections.phrases == list(reference["text_labels"])

    # Each box's label: the query whose tokens reach the highest probability, spelled as the user did.
    kept = probabilities[probabilities.max(dim=-1).values > 0.6]
    positions = [_query_positions(detector.processor.tokenizer, input_ids, q) for q in queries]
    best = [int(np.argmax([row[p].max().item() for p in positions])) for row in kept]
    assert detections.labels == [queries[i] for i in best]
    assert detections.label_ids.tolist() == best
    assert set(detections.labels) <= set(queries)


def test_no_detections_gives_empty_arrays(detector, photo):
    detections = detector.detect(photo, "a cat", box_threshold=1.0)
    assert len(detections) == 0 and detections.boxes.shape == (0, 4) and detections.labels == []


def test_bad_thresholds_and_text(detector, photo):
    with pytest.raises(ValueError, match="box_threshold"):
        detector.detect(photo, "a cat", box_threshold=1.5)
    with pytest.raises(ValueError, match="text is empty"):
        detector.detect(photo, " . ")


def test_long_caption_split_into_passes_not_truncated(tmp_path, photo):
    # max_text_len 16 (instead of 256) makes a 7-query caption too long for one pass.
    folder = save_tiny_grounding_dino(tmp_path / "short", logit_scale=LOGIT_SCALE, num_queries=NUM_QUERIES, max_text_len=16)
    detector = GroundingDinoDetector(str(folder))
    queries = ["a cat", "a dog", "a red car", "a tree", "a blue sky", "a house", "green grass"]
    groups = detector.build_captions(queries)
    assert [i for group in groups for i in group] == list(range(len(queries)))
    assert len(groups) > 1
    tokenizer = detector.processor.tokenizer
    for group in groups:  # each caption fits: [CLS] + tokens + [SEP] <= 16
        caption = " ".join(queries[i] + "." for i in group)
        assert len(tokenizer(caption)["input_ids"]) <= 16

    detections = detector.detect(photo, queries, box_threshold=0.0)
    assert detector.forward_passes == len(groups)
    assert set(detections.labels) - {"a cat", "a dog", "a red car", "a tree", "a blue sky", "a house", "green grass"} == set()
    # Every pass is an ordinary detection of its own queries; together they are the result.
    offset = 0
    for group in groups:
        part = detector.detect(photo, [queries[i] for i in group], box_threshold=0.0)
        np.testing.assert_array_equal(detections.boxes[offset:offset + len(part)], part.boxes)
        assert detections.labels[offset:offset + len(part)] == part.labels
        offset += len(part)
    assert offset == len(detections)
    with pytest.raises(ValueError, match="tokens long"):
        detector.detect(photo, "a very long description of a cat sitting on a red mat next to a dog")


def test_post_process_supports_old_box_threshold_name():
    calls = {}

    class OldProcessor:  # transformers < 4.51 spelled the first threshold box_threshold
        def post_process_grounded_object_detection(self, outputs, input_ids=None, box_threshold=0.25,
                                                   text_threshold=0.25, target_sizes=None):
            calls.update(box_threshold=box_threshold, text_threshold=text_threshold, target_sizes=target_sizes)
            return ["ok"]

    class NewProcessor:
        def post_process_grounded_object_detection(self, outputs, input_ids=None, threshold=0.25,
                                                   text_threshold=0.25, target_sizes=None, text_labels=None):
            calls.update(threshold=threshold)
            return ["new"]

    assert post_process(OldProcessor(), None, None, 0.4, 0.2, [(5, 6)]) == ["ok"]
    assert calls == {"box_threshold": 0.4, "text_threshold": 0.2, "target_sizes": [(5, 6)]}
    assert post_process(NewProcessor(), None, None, 0.35, 0.2, [(5, 6)]) == ["new"]
    assert calls["threshold"] == 0.35


def test_constructor_checks_and_lazy_load(gdino_dir):
    lazy = GroundingDinoDetector(str(gdino_dir))
    assert "not loaded" in repr(lazy)
    with pytest.raises(ValueError, match="together"):
        GroundingDinoDetector(model=object())


def test_query_token_spans_with_and_without_offsets(detector):
    tokenizer = detector.processor.tokenizer
    caption, pieces = "a cat. a remote control.", ["a cat", "a remote control"]
    # [CLS] a cat . a remote control . [SEP]  ->  "a cat" = tokens 1-2, "a remote control" = 4-6
    assert query_token_spans(tokenizer, caption, pieces) == [(1, 3), (4, 7)]

    class SlowTokenizer:  # no offset mapping: spans come from per-query token counts
        is_fast = False

        def __call__(self, text, **kwargs):
            kwargs.pop("return_offsets_mapping", None)
            return tokenizer(text, **kwargs)

    assert query_token_spans(SlowTokenizer(), caption, pieces) == [(1, 3), (4, 7)]
