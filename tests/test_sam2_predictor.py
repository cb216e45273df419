"""SAM 2.1 through the one `SamPredictor` API and the automatic mask generator, against Meta's
`SAM2ImagePredictor` / `SAM2AutomaticMaskGenerator` (the `sam2` package) on identical weights.

The model-level parity (features, decoder, memory modules) is in test_sam2_model.py; here the
public entry points users call are compared, on real photos, in original-image pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2_factory import make_reference_sam2, make_tiny_sam2
from sam_factory import real_photo

from sam import SamPredictor, make_mask_generator
from sam.automatic_mask_generator import Sam2AutomaticMaskGenerator

LOGIT_ATOL, IOU_ATOL, MAX_MASK_MISMATCH = 2e-4, 1e-5, 1e-4


@pytest.fixture(scope="module")
def models():
    ours = make_tiny_sam2("tiny", seed=5)
    return ours, make_reference_sam2(ours, "tiny")


@pytest.fixture(scope="module")
def chelsea():
    return real_photo("chelsea")  # 300 x 451


@pytest.fixture(scope="module")
def predictors(models, chelsea):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    ours, reference = models
    our_predictor, ref_predictor = SamPredictor(ours), SAM2ImagePredictor(reference)
    our_predictor.set_image(chelsea)
    ref_predictor.set_image(chelsea)
    return our_predictor, ref_predictor


def _assert_close(ours, reference):
    masks, iou, low_res = ours
    ref_masks, ref_iou, ref_low_res = reference
    assert masks.shape == ref_masks.shape and masks.dtype == bool
    np.testing.assert_allclose(iou, ref_iou, atol=IOU_ATOL, rtol=0)
    np.testing.assert_allclose(low_res, ref_low_res, atol=LOGIT_ATOL, rtol=0)
    assert (masks != ref_masks.astype(bool)).mean() <= MAX_MASK_MISMATCH
    assert 0 < ref_masks.mean() < 1  # both classes present: thresholding is really compared


PROMPTS = {
    "one point": dict(point_coords=np.array([[220.0, 150.0]]), point_labels=np.array([1])),
    "points": dict(point_coords=np.array([[220.0, 150.0], [60.0, 40.0], [400.0, 250.0]]),
                   point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([50.0, 20.0, 420.0, 290.0])),
    "box and points": dict(box=np.array([50.0, 20.0, 420.0, 290.0]),
                           point_coords=np.array([[220.0, 150.0]]), point_labels=np.array([0])),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_predict_matches_sam2_image_predictor(predictors, prompt, multimask):
    ours, reference = predictors
    ours_out = ours.predict(**PROMPTS[prompt], multimask_output=multimask)
    ref_out = reference.predict(**PROMPTS[prompt], multimask_output=multimask)
    _assert_close(ours_out, ref_out)
    assert ours_out[0].shape == (3 if multimask else 1, 300, 451)


def test_mask_input_from_a_previous_call(predictors):
    ours, reference = predictors
    first = ours.predict(**PROMPTS["one point"])
    ref_first = reference.predict(**PROMPTS["one point"])
    best = int(np.argmax(first[1]))
    assert best == int(np.argmax(ref_first[1]))
    again = ours.predict(**PROMPTS["points"], mask_input=first[2][best][None], multimask_output=False)
    ref_again = reference.predict(**PROMPTS["points"], mask_input=ref_first[2][best][None], multimask_output=False)
    _assert_close(again, ref_again)


def test_batched_boxes_in_one_decoder_call(predictors, chelsea):
    ours, reference = predictors
    rng = np.random.default_rng(1)
    corners = np.sort(rng.uniform(0, 1, size=(5, 2, 2)), axis=1) * [451, 300]
    boxes = corners.reshape(5, 4)
    masks, iou, low_res = ours.predict_torch(
        None, None, ours.transform.apply_boxes_torch(torch.as_tensor(boxes), chelsea.shape[:2]), multimask_output=True
    )
    ref_masks, ref_iou, ref_low_res = reference.predict(box=boxes, multimask_output=True)
    _assert_close((masks.numpy(), iou.numpy(), low_res.numpy()), (ref_masks, ref_iou, ref_low_res))
    assert ours.get_image_embedding().shape == (1, 256, 64, 64)


def test_set_image_batch_and_predict_batch_match_the_reference(models):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    ours_model, reference_model = models
    images = [real_photo("chelsea"), np.ascontiguousarray(real_photo("rocket").transpose(1, 0, 2))]
    ours, reference = SamPredictor(ours_model), SAM2ImagePredictor(reference_model)
    ours.set_image_batch(images)
    reference.set_image_batch(images)
    points = [np.array([[100.0, 80.0]]), np.array([[200.0, 300.0], [50.0, 60.0]])]
    labels = [np.array([1]), np.array([1, 0])]
    for name in ("image_embed",):
        for index in range(2):
            torch.testing.assert_close(ours._batch[index][0][name], reference._features[name][index:index + 1],
                                       atol=1e-4, rtol=0)
    masks, ious, lows = ours.predict_batch(points, labels, multimask_output=True)
    ref_masks, ref_ious, ref_lows = reference.predict_batch(points, labels, multimask_output=True)
    for index in range(2):
        _assert_close((masks[index], ious[index], lows[index]), (ref_masks[index], ref_ious[index], ref_lows[index]))
    boxes = [np.array([10.0, 20.0, 200.0, 290.0]), np.array([[10.0, 20.0, 200.0, 300.0], [100.0, 100.0, 400.0, 600.0]])]
    masks, ious, lows = ours.predict_batch(box_batch=boxes, multimask_output=False)
    ref_masks, ref_ious, ref_lows = reference.predict_batch(box_batch=boxes, multimask_output=False)
    for index in range(2):
        _assert_close((masks[index], ious[index], lows[index]), (ref_masks[index], ref_ious[index], ref_lows[index]))


def test_cached_features_restore_without_the_encoder(predictors, chelsea):
    ours, _ = predictors
    features, original, input_size = ours.features, ours.original_size, ours.input_size
    expected = ours.predict(**PROMPTS["box"])
    other = SamPredictor(ours.model)
    calls = []
    hook = ours.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        other.set_embedding(features, original, input_size)
        restored = other.predict(**PROMPTS["box"])
    finally:
        hook.remove()
    assert calls == []
    for got, want in zip(restored, expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="SAM 2 features"):
        other.set_embedding(features["image_embed"], original, input_size)


# ------------------------------------------------------------------------------------ generator
# Random weights predict low IoU and low-contrast logits; these settings let masks through.
AMG_SETTINGS = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.3, stability_score_offset=0.5,
                    box_nms_thresh=1.0)  # 1.0: no NMS, every mask is compared


def _match(ours, reference):
    """Same number of masks, each matched at IoU >= 0.99, same scores (order may differ by ties)."""
    assert len(ours) == len(reference) >= 2
    unmatched = list(range(len(reference)))
    for record in ours:
        best, best_iou = None, 0.0
        for index in unmatched:
            a, b = record["segmentation"], reference[index]["segmentation"]
            iou = np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)
            if iou > best_iou:
                best, best_iou = index, iou
        assert best_iou >= 0.99
        assert abs(record["predicted_iou"] - reference[best]["predicted_iou"]) <= 1e-4
        assert abs(record["stability_score"] - reference[best]["stability_score"]) <= 1e-3
        assert record["crop_box"] == reference[best]["crop_box"]
        np.testing.assert_allclose(record["point_coords"], reference[best]["point_coords"], atol=1e-3)
        unmatched.remove(best)


# The decoder dominates (it runs once per point on every crop), so the m2m and crop cases use fewer
# points: 3x3 for m2m, and 2x2 per crop layer (crop_n_points_downscale_factor=2) for the crops.
@pytest.mark.parametrize("extra", [{}, {"use_m2m": True, "points_per_side": 3},
                                   {"multimask_output": False, "crop_n_layers": 1, "crop_nms_thresh": 1.0,
                                    "crop_n_points_downscale_factor": 2}],
                         ids=["default", "m2m", "single-mask-crops"])
def test_generator_matches_sam2_automatic_mask_generator(models, extra):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    ours_model, reference_model = models
    image = real_photo("coffee")[::2, ::2]  # 200 x 300
    settings = {**AMG_SETTINGS, **extra}
    ours = make_mask_generator(ours_model, **settings).generate(image)
    reference = SAM2AutomaticMaskGenerator(reference_model, **settings).generate(image)
    _match(ours, reference)


def test_generator_defaults_follow_the_family(models, tiny_sam_checkpoint):
    from sam import SamAutomaticMaskGenerator, build_sam

    ours_model, _ = models
    sam2_generator = make_mask_generator(ours_model)
    assert type(sam2_generator) is Sam2AutomaticMaskGenerator and sam2_generator.pred_iou_thresh == 0.8
    sam1_generator = make_mask_generator(build_sam("auto", checkpoint=tiny_sam_checkpoint))
    assert type(sam1_generator) is SamAutomaticMaskGenerator and sam1_generator.pred_iou_thresh == 0.88
    with pytest.raises(ValueError, match="unknown automatic mask generator settings"):
        make_mask_generator(ours_model, points_per_sid=4)
