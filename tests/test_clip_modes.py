"""LangSAM mode="clip" and mode="hybrid" end to end, scores checked against open_clip itself.

Tiny random SAM (official .pth layout) and tiny random CLIP (open_clip state dict). A random tiny
SAM's automatic mask generator yields one or no mask on a photo, so most tests hand the pipeline
real-looking automatic-mask records (SLIC superpixels in SAM's record format) through
``auto_masks``; one test runs the real generator end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from skimage.segmentation import slic

import tiny_clip
from langsam.clip_scorer import DEFAULT_BACKGROUND_PROMPTS, DEFAULT_TEMPLATES, ClipScorer
from langsam.detector import Detections
from langsam.pipeline import LangSAM
from sam_factory import real_photo

QUERIES = ["a cat", "a sofa", "a remote control"]


class NoDetector:
    """mode="clip" must not touch the detector."""

    def detect(self, *args, **kwargs):
        raise AssertionError("the detector was called in clip mode")


class FixedDetector:
    def __init__(self, boxes, labels, scores):
        self.boxes = np.asarray(boxes, dtype=np.float32)
        self.labels, self.scores = list(labels), np.asarray(scores, dtype=np.float32)

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        label_ids = np.array([list(queries).index(label) for label in self.labels], dtype=np.int64)
        return Detections(self.boxes, self.scores, list(self.labels), label_ids, list(self.labels), list(queries))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("clip_modes"), seed=1)


@pytest.fixture(scope="module")
def scorer(clip_files):
    return ClipScorer(clip_files.model_name, pretrained=clip_files.weights_path, device="cpu")


@pytest.fixture(scope="module")
def reference(clip_files):
    return tiny_clip.load_reference_clip(clip_files)


@pytest.fixture(scope="module")
def photo():
    return real_photo("chelsea")


@pytest.fixture(scope="module")
def sam_predictor(tiny_sam_checkpoint):
    from sam import SamPredictor, build_sam

    return SamPredictor(build_sam("auto", checkpoint=tiny_sam_checkpoint), device="cpu")


def superpixel_records(image, segments=24, tiny=True):
    """SamAutomaticMaskGenerator-style records: superpixels (alternately bool and coco_rle), plus a
    25-pixel mask that is below the scorer's minimum area."""
    labels = slic(image, n_segments=segments, start_label=0, compactness=10)
    masks = [labels == label for label in range(labels.max() + 1)]
    if tiny:
        small = np.zeros(image.shape[:2], dtype=bool)
        small[5:10, 5:10] = True
        masks.append(small)
    records = []
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        segmentation = mask
        if index % 2:
            segmentation = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation["counts"] = segmentation["counts"].decode()
        records.append({
            "segmentation": segmentation, "area": int(mask.sum()),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())],
            "predicted_iou": float(0.6 + 0.01 * index), "stability_score": 0.95,
        })
    return masks, records


@pytest.fixture(scope="module")
def auto(photo):
    return superpixel_records(photo)


def clip_pipeline(sam_predictor, scorer, monkeypatch, records, detector=None):
    """A LangSAM whose automatic masks are ``records``; returns (pipeline, list counting AMG runs)."""
    pipe = LangSAM(sam_model=sam_predictor, detector_model=detector or NoDetector(), clip_scorer=scorer)
    calls = []
    monkeypatch.setattr(pipe, "auto_masks", lambda image, **kwargs: calls.append(image.shape) or records)
    return pipe, calls


def cut_between(scores):
    """A threshold keeping about half of ``scores``, far from every score (the widest gap in the
    middle half), so tolerance-level differences cannot move a score across it."""
    ordered = np.sort(np.asarray(scores))
    quarter = max(1, len(ordered) // 4)
    gaps = np.diff(ordered)[quarter - 1:len(ordered) - quarter]
    low = quarter - 1 + int(np.argmax(gaps))
    assert ordered[low + 1] - ordered[low] > 1e-4
    return float(ordered[low] + ordered[low + 1]) / 2


def expected_clip_result(reference, photo, masks, queries, threshold, top_k=None):
    """(mask indices, labels, scores) by the documented rule, from open_clip's own probabilities."""
    kept, probabilities = tiny_clip.reference_probabilities(
        reference, photo, masks, queries, DEFAULT_TEMPLATES, DEFAULT_BACKGROUND_PROMPTS)
    best = probabilities[:, :-1].argmax(axis=1)
    scores = probabilities[np.arange(len(kept)), best]
    rows = [r for r in np.argsort(-scores, kind="stable") if threshold is None or scores[r] >= threshold]
    rows = rows[:top_k] if top_k is not None else rows
    return kept[rows], [queries[best[r]] for r in rows], scores[rows]


# ----------------------------------------------------------------------------------------------------
# mode="clip"


def test_clip_mode_equals_open_clip_on_the_auto_masks(sam_predictor, scorer, reference, photo, auto, monkeypatch):
    masks, records = auto
    pipe, _ = clip_pipeline(sam_predictor, scorer, monkeypatch, records)
    _, _, all_scores = expected_clip_result(reference, photo, masks, QUERIES, None)
    threshold = cut_between(all_scores)                 # keeps about half: both sides of the cut are tested
    result = pipe.segment(photo, QUERIES, mode="clip", clip_threshold=threshold)

    expected_ids, expected_labels, expected_scores = expected_clip_result(reference, photo, masks, QUERIES, threshold)
    assert result.mode == "clip"
    assert 0 < len(result) == len(expected_ids) < len(masks) - 1
    # every returned mask IS one of the automatic masks, the one the reference picked
    np.testing.assert_array_equal(result.masks, np.stack([masks[i] for i in expected_ids]))
    assert result.labels == expected_labels and set(result.labels) <= set(QUERIES)
    np.testing.assert_allclose(result.clip_scores, expected_scores, atol=2e-5)
    np.testing.assert_allclose(result.scores, expected_scores, atol=2e-5)
    assert np.all(np.diff(result.clip_scores) <= 0) and np.all(result.clip_scores >= threshold - 1e-6)
    np.testing.assert_allclose(result.mask_scores, [records[i]["predicted_iou"] for i in expected_ids], atol=1e-6)
    x, y, w, h = records[expected_ids[0]]["bbox"]
    np.testing.assert_array_equal(result.boxes[0], [x, y, x + w, y + h])


def test_second_query_on_the_same_image_does_no_image_work(sam_predictor, scorer, photo, auto, monkeypatch):
    pipe, amg_calls = clip_pipeline(sam_predictor, scorer, monkeypatch, auto[1])
    crop_passes, text_passes = [], []
    hooks = [scorer.model.visual.register_forward_hook(lambda *_: crop_passes.append(1)),
             scorer.model.token_embedding.register_forward_hook(lambda *_: text_passes.append(1))]
    try:
        pipe.segment(photo, "a striped cat", mode="clip", clip_threshold=0.0)
        assert len(amg_calls) == 1 and len(crop_passes) == 1     # 24 crops: one batch
        first_text = len(text_passes)

        second = pipe.segment(photo, ["a sleeping animal", "a blanket"], mode="clip", top_k=2, clip_threshold=0.0)
        third = pipe.segment(photo.copy(), "a striped cat", mode="clip", clip_threshold=0.0)  # same content
        assert len(amg_calls) == 1 and len(crop_passes) == 1     # no new SAM, no new CLIP image work
        assert len(text_passes) == first_text + 1                 # only the new queries' text pass
        assert len(second) == 2 and third.mode == "clip"

        pipe.segment(photo[:, ::-1].copy(), "a striped cat", mode="clip")   # another image: new index
        assert len(amg_calls) == 2 and len(crop_passes) == 2
    finally:
        for hook in hooks:
            hook.remove()


def test_top_k_and_threshold(sam_predictor, scorer, reference, photo, auto, monkeypatch):
    masks, records = auto
    pipe, _ = clip_pipeline(sam_predictor, scorer, monkeypatch, records)
    top = pipe.segment(photo, QUERIES, mode="clip", clip_threshold=0.0, top_k=3)
    expected_ids, expected_labels, expected_scores = expected_clip_result(reference, photo, masks, QUERIES, 0.0, 3)
    assert len(top) == 3 and top.labels == expected_labels
    np.testing.assert_array_equal(top.masks, np.stack([masks[i] for i in expected_ids]))
    np.testing.assert_allclose(top.clip_scores, expected_scores, atol=2e-5)

    nothing = pipe.segment(photo, QUERIES, mode="clip", clip_threshold=1.0)
    assert len(nothing) == 0 and nothing.mode == "clip"
    assert nothing.masks.shape == (0,) + photo.shape[:2] and nothing.clip_scores.shape == (0,)


def test_single_query_and_many_queries(sam_predictor, scorer, reference, photo, auto, monkeypatch):
    masks, records = auto
    pipe, _ = clip_pipeline(sam_predictor, scorer, monkeypatch, records)
    single = pipe.segment(photo, "a cat", mode="clip", clip_threshold=0.5)
    expected_ids, _, expected_scores = expected_clip_result(reference, photo, masks, ["a cat"], 0.5)
    assert single.labels == ["a cat"] * len(expected_ids)
    np.testing.assert_allclose(single.clip_scores, expected_scores, atol=2e-5)

    many = [f"thing {i}" for i in range(30)]
    result = pipe.segment(photo, many, mode="clip", clip_threshold=0.0)
    expected_ids, expected_labels, expected_scores = expected_clip_result(reference, photo, masks, many, 0.0)
    assert len(result) == len(expected_ids) == len(masks) - 1   # every judged mask once, the tiny one skipped
    assert result.labels == expected_labels and set(result.labels) <= set(many)
    np.testing.assert_allclose(result.clip_scores, expected_scores, atol=2e-5)


def test_no_auto_masks_and_all_masks_too_small(sam_predictor, scorer, clip_files, photo, auto, monkeypatch):
    pipe, calls = clip_pipeline(sam_predictor, scorer, monkeypatch, [])
    empty = pipe.segment(photo, QUERIES, mode="clip", clip_threshold=0.0)
    assert len(empty) == 0 and empty.mode == "clip" and calls == [photo.shape]

    strict = ClipScorer(clip_files.model_name, pretrained=clip_files.weights_path, device="cpu",
                        min_mask_area=photo.shape[0] * photo.shape[1] + 1)
    pipe, _ = clip_pipeline(sam_predictor, strict, monkeypatch, auto[1])
    too_small = pipe.segment(photo, QUERIES, mode="clip", clip_threshold=None)
    assert len(too_small) == 0 and too_small.mode == "clip"


def test_real_automatic_mask_generator_feeds_clip_mode(sam_predictor, scorer, photo):
    """The generator's own records (tiny random SAM, a 2x2 point grid, no quality filters), its
    settings given to the pipeline as ``amg_params``."""
    from sam import SamAutomaticMaskGenerator

    amg_params = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    pipe = LangSAM(sam_model=sam_predictor, detector_model=NoDetector(), clip_scorer=scorer, amg_params=amg_params)
    encoder_calls = []
    hook = sam_predictor.model.image_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        result = pipe.segment(photo, QUERIES, mode="clip", clip_threshold=0.0)
        again = pipe.segment(photo, ["a dog"], mode="clip", clip_threshold=0.0)
    finally:
        hook.remove()
    assert len(encoder_calls) == 1                      # SAM ran once for both queries
    records = SamAutomaticMaskGenerator(sam_predictor.model, **amg_params).generate(photo)
    auto_masks = [r["segmentation"] for r in records if r["area"] >= scorer.min_mask_area]
    assert len(result) == len(again) == len(auto_masks) >= 1
    for mask in list(result.masks) + list(again.masks):
        assert any(np.array_equal(mask, candidate) for candidate in auto_masks)
    assert set(result.labels) <= set(QUERIES) and again.labels == ["a dog"] * len(again)


def test_generator_settings_reach_clip_mode_and_key_its_cache(sam_predictor, scorer, photo, auto, monkeypatch):
    pipe, _ = clip_pipeline(sam_predictor, scorer, monkeypatch, auto[1])
    seen = []
    monkeypatch.setattr(pipe, "auto_masks", lambda image, **kwargs: seen.append(kwargs) or auto[1])
    pipe.amg_params = {"points_per_side": 8}
    pipe.segment(photo, QUERIES, mode="clip")
    pipe.segment(photo, QUERIES, mode="clip")                                   # cached
    pipe.segment(photo, QUERIES, mode="clip", amg_params={"points_per_side": 4, "pred_iou_thresh": 0.5})
    pipe.segment(photo, QUERIES, mode="clip", amg_params={"pred_iou_thresh": 0.5, "points_per_side": 4})  # cached
    assert seen == [{"points_per_side": 8}, {"points_per_side": 4, "pred_iou_thresh": 0.5}]

    with pytest.raises(ValueError, match="only to mode='clip'"):
        pipe.segment(photo, QUERIES, mode="grounded", amg_params={"points_per_side": 4})
    with pytest.raises(ValueError, match="unknown amg_params.*points_per_sid"):
        pipe.segment(photo, QUERIES, mode="clip", amg_params={"points_per_sid": 4})
    with pytest.raises(ValueError, match="unknown amg_params.*device"):
        LangSAM(sam_model=sam_predictor, amg_params={"device": "cpu"})
    with pytest.raises(ValueError, match="must be a dict"):
        LangSAM(sam_model=sam_predictor, amg_params=[("points_per_side", 4)])
    with pytest.raises(ValueError, match="point_grids"):
        pipe.segment(photo, QUERIES, mode="clip", amg_params={"point_grids": [np.zeros((4, 2))]})


# ----------------------------------------------------------------------------------------------------
# mode="hybrid"


def test_hybrid_scores_and_drops_by_clip(sam_predictor, scorer, reference, photo):
    boxes = [[40, 60, 260, 290], [0, 0, 120, 90], [300, 150, 450, 299], [100, 100, 200, 200], [200, 20, 330, 140]]
    labels = ["a cat", "a remote control", "a cat", "a sofa", "a sofa"]
    detector = FixedDetector(boxes, labels, [0.9, 0.8, 0.7, 0.6, 0.5])
    pipe = LangSAM(sam_model=sam_predictor, detector_model=detector, clip_scorer=scorer)
    grounded = pipe.segment(photo, QUERIES)
    kept, probabilities = tiny_clip.reference_probabilities(
        reference, photo, grounded.masks, QUERIES, DEFAULT_TEMPLATES, DEFAULT_BACKGROUND_PROMPTS)
    expected = np.zeros(len(grounded), dtype=np.float32)
    expected[kept] = probabilities[np.arange(len(kept)), [QUERIES.index(grounded.labels[i]) for i in kept]]

    everything = pipe.segment(photo, QUERIES, mode="hybrid", clip_threshold=0.0)
    assert everything.mode == "hybrid" and len(everything) == len(grounded) == 5
    np.testing.assert_allclose(everything.clip_scores, expected, atol=2e-5)
    np.testing.assert_allclose(everything.scores, grounded.scores)          # detector scores stay separate
    np.testing.assert_allclose(everything.mask_scores, grounded.mask_scores)  # and so do SAM's

    cut = cut_between(expected)
    verified = pipe.segment(photo, QUERIES, mode="hybrid", clip_threshold=cut)
    keep = expected >= cut
    assert 0 < len(verified) == keep.sum() < len(grounded)
    np.testing.assert_array_equal(verified.masks, grounded.masks[keep])
    assert verified.labels == [label for label, k in zip(grounded.labels, keep) if k]
    np.testing.assert_allclose(verified.clip_scores, expected[keep], atol=2e-5)
    assert verified.clip_scores.min() >= cut - 1e-6
