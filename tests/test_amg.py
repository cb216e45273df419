"""Automatic mask generator: parity with Meta's reference on identical random weights and real
photos, plus exact checks of the building blocks (grids, crops, RLE, boxes, small regions)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils
from sam_factory import make_reference_sam, real_photo
from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
from segment_anything.utils import amg as reference_amg

from sam import SamPredictor, build_sam
from sam import amg_utils
from sam.automatic_mask_generator import SamAutomaticMaskGenerator

# Random weights give low, spread-out quality scores and low-contrast logits: these settings let
# a good number of masks through every filter so that the comparison means something.
LOOSE = dict(pred_iou_thresh=0.2, stability_score_thresh=0.2, stability_score_offset=0.5)


def _fake_cv2() -> types.ModuleType:
    """Stand-in for OpenCV's connected components (the reference imports cv2 for
    min_mask_region_area, which is not installed): scipy labels 8-connected regions in the
    same row-major order."""
    from scipy import ndimage

    def connected_components_with_stats(image, connectivity):
        assert connectivity == 8
        labels, n_labels = ndimage.label(image, structure=np.ones((3, 3), dtype=int))
        stats = np.zeros((n_labels + 1, 5), dtype=np.int32)
        stats[:, 4] = np.bincount(labels.ravel(), minlength=n_labels + 1)
        return n_labels + 1, labels.astype(np.int32), stats, np.zeros((n_labels + 1, 2))

    module = types.ModuleType("cv2")
    module.connectedComponentsWithStats = connected_components_with_stats
    return module


@pytest.fixture(autouse=True)
def fake_cv2(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", _fake_cv2())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sam_factory import save_tiny_sam_checkpoint

    checkpoint = save_tiny_sam_checkpoint(tmp_path_factory.mktemp("amg") / "tiny.pth", seed=0)
    ours = build_sam("auto", checkpoint=checkpoint)
    return ours, make_reference_sam(ours)


def _resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _decode(segmentation) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation
    if isinstance(segmentation["counts"], str):
        return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()}).astype(bool)
    return reference_amg.rle_to_mask(segmentation)


def _assert_same_records(ours: list[dict], reference: list[dict], min_masks: int) -> int:
    """Same number of masks; each reference mask has a partner from the same prompt point and
    crop with mask IoU >= 0.99 and equal scores. Returns how many masks are bit-identical."""
    assert len(reference) >= min_masks, f"only {len(reference)} reference masks survived; loosen the thresholds"
    assert len(ours) == len(reference)
    unmatched = list(range(len(ours)))
    identical = 0
    for ref in reference:
        ref_mask = _decode(ref["segmentation"])
        best, best_iou = None, -1.0
        for index in unmatched:
            candidate = ours[index]
            if candidate["crop_box"] != ref["crop_box"] or not np.allclose(
                candidate["point_coords"], ref["point_coords"], atol=1e-6
            ):
                continue
            mask = _decode(candidate["segmentation"])
            iou = (mask & ref_mask).sum() / max((mask | ref_mask).sum(), 1)
            if iou > best_iou:
                best, best_iou = index, iou
        assert best is not None and best_iou >= 0.99, f"no match for reference mask {ref['bbox']} (IoU {best_iou})"
        unmatched.remove(best)
        match = ours[best]
        assert match["predicted_iou"] == pytest.approx(ref["predicted_iou"], abs=1e-4)
        assert match["stability_score"] == pytest.approx(ref["stability_score"], abs=2e-3)
        assert match["area"] == pytest.approx(ref["area"], rel=0.01)
        assert np.allclose(match["bbox"], ref["bbox"], atol=2)
        identical += int(best_iou == 1.0 and match["bbox"] == ref["bbox"] and match["area"] == ref["area"])
    return identical


def _run_both(models, image, **params):
    ours, reference = models
    return (
        SamAutomaticMaskGenerator(ours, **params).generate(image),
        ReferenceGenerator(reference, **params).generate(image),
    )


def _assert_identical_records(ours: list[dict], reference: list[dict]) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert np.array_equal(_decode(a["segmentation"]), _decode(b["segmentation"]))
        assert {k: v for k, v in a.items() if k != "segmentation"} == {
            k: v for k, v in b.items() if k != "segmentation"
        }


# ----------------------------------------------------------------------------------- parity


def test_parity_full_image_1024(models):
    # Long side 1024: the final resize is the identity, which we skip. The two decoders differ
    # in the last float bits, which flips a few pixels of some masks, hence IoU >= 0.99.
    image = _resize_long_side(real_photo("coffee"), 1024)
    ours, reference = _run_both(
        models, image, points_per_side=3, box_nms_thresh=1.0, output_mode="uncompressed_rle", **LOOSE
    )
    _assert_same_records(ours, reference, min_masks=5)
    for record in ours:
        assert isinstance(record["segmentation"]["counts"], list)
        assert isinstance(record["area"], int) and all(isinstance(v, int) for v in record["bbox"])


def test_parity_with_crops_nms_and_cleanup(models):
    # A 32x32 photo: crop edges inside the image are within 20 px of the image edges, so masks
    # from crops survive the crop-edge filter and both NMS stages have real work to do.
    ours_model, reference_model = models
    image = _resize_long_side(real_photo("astronaut"), 32)
    params = dict(
        points_per_side=2,
        crop_n_layers=1,
        crop_n_points_downscale_factor=2,  # one point per crop keeps the test fast
        min_mask_region_area=20,
        output_mode="coco_rle",
        **LOOSE,
    )
    ours = SamAutomaticMaskGenerator(ours_model, **params).generate(image)
    reference = ReferenceGenerator(reference_model, **params).generate(image)
    _assert_same_records(ours, reference, min_masks=4)
    assert len({tuple(r["crop_box"]) for r in reference}) >= 3, "masks from crops did not survive"
    for record in ours:
        assert isinstance(record["segmentation"]["counts"], str)
    # The official pipeline run on *our* model gives exactly our records: every stage after
    # the decoder (upscaling, filters, NMS, RLE, cleanup) is bit-exact.
    _assert_identical_records(ours, ReferenceGenerator(ours_model, **params).generate(image))


def test_parity_min_mask_region_area(models):
    ours, _ = models
    image = real_photo("chelsea")  # 300x451: masks are resized down from the model frame
    params = dict(points_per_side=2, box_nms_thresh=1.0, output_mode="uncompressed_rle", **LOOSE)
    predictor = SamPredictor(ours)
    plain = SamAutomaticMaskGenerator(predictor, **params).generate(image)
    cleaned = SamAutomaticMaskGenerator(predictor, min_mask_region_area=150, **params).generate(image)
    assert len(cleaned) >= 3
    # the speckled masks of random weights really change
    assert sum(a["area"] != b["area"] for a, b in zip(plain, cleaned)) >= 3
    _assert_identical_records(cleaned, ReferenceGenerator(ours, min_mask_region_area=150, **params).generate(image))


@pytest.fixture(scope="module")
def chelsea_by_mode(models):
    ours, _ = models
    predictor = SamPredictor(ours)  # one embedding, three decodings
    return {
        mode: SamAutomaticMaskGenerator(
            predictor, points_per_side=2, box_nms_thresh=1.0, output_mode=mode, **LOOSE
        ).generate(real_photo("chelsea"))
        for mode in ("binary_mask", "uncompressed_rle", "coco_rle")
    }


def test_output_modes_agree(chelsea_by_mode):
    image = real_photo("chelsea")
    by_mode = chelsea_by_mode
    assert len(by_mode["binary_mask"]) >= 3
    for binary, raw, coco in zip(*by_mode.values()):
        mask = binary["segmentation"]
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert np.array_equal(reference_amg.rle_to_mask(raw["segmentation"]), mask)
        assert np.array_equal(_decode(coco["segmentation"]), mask)
        assert coco["segmentation"] == reference_amg.coco_encode_rle(raw["segmentation"])
        assert binary["area"] == int(mask.sum()) == raw["area"] == coco["area"]
        ys, xs = np.nonzero(mask)
        assert binary["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_sa1b_record_is_json_and_decodes(chelsea_by_mode):
    masks = chelsea_by_mode["binary_mask"]
    record = amg_utils.to_sa1b_record({"file_name": "chelsea.jpg", "height": 300, "width": 451}, masks)
    record = json.loads(json.dumps(record))
    assert record["image"] == {"file_name": "chelsea.jpg", "height": 300, "width": 451}
    assert [a["id"] for a in record["annotations"]] == list(range(1, len(masks) + 1))
    for annotation, mask in zip(record["annotations"], masks):
        coco = {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(coco).astype(bool), mask["segmentation"])
        assert annotation["area"] == int(mask_utils.area(coco)) == mask["area"]
        assert annotation["bbox"] == [float(v) for v in mask["bbox"]]
        assert annotation["point_coords"] == mask["point_coords"]
        assert set(annotation) == {
            "id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"
        }
    with pytest.raises(ValueError, match="missing height"):
        amg_utils.to_sa1b_record({"file_name": "x.jpg", "width": 451}, masks)
    with pytest.raises(ValueError, match="but the image is 10x451"):
        amg_utils.to_sa1b_record({"file_name": "x.jpg", "height": 10, "width": 451}, masks)
    # every output mode gives the same SA-1B record
    info = {"file_name": "chelsea.jpg", "height": 300, "width": 451}
    for mode in ("uncompressed_rle", "coco_rle"):
        assert amg_utils.to_sa1b_record(info, chelsea_by_mode[mode]) == record


def test_bad_parameters_raise_value_error(models):
    ours, _ = models
    with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
        SamAutomaticMaskGenerator(ours, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode must be one of"):
        SamAutomaticMaskGenerator(ours, output_mode="png")
    with pytest.raises(ValueError, match="points_per_batch must be an integer >= 1"):
        SamAutomaticMaskGenerator(ours, points_per_batch=0)
    with pytest.raises(ValueError, match="leaves no points in crop layer 2"):
        SamAutomaticMaskGenerator(ours, points_per_side=3, crop_n_layers=2, crop_n_points_downscale_factor=2)
    with pytest.raises(ValueError, match="needs 2"):
        SamAutomaticMaskGenerator(ours, points_per_side=None, point_grids=[np.full((4, 2), 0.5)], crop_n_layers=1)
    with pytest.raises(ValueError, match="normalised to"):
        SamAutomaticMaskGenerator(ours, points_per_side=None, point_grids=[np.full((4, 2), 2.0)])
    with pytest.raises(ValueError, match="model must be a sam.Sam"):
        SamAutomaticMaskGenerator("vit_b")
    with pytest.raises(ValueError, match="image must have shape"):
        SamAutomaticMaskGenerator(ours, points_per_side=1).generate(np.zeros((4, 4, 3, 1), np.uint8))


def test_explicit_grid_and_chunking_change_nothing(models):
    ours, _ = models
    image = real_photo("chelsea")
    predictor = SamPredictor(ours)
    params = dict(box_nms_thresh=1.0, output_mode="uncompressed_rle", **LOOSE)
    from_side = SamAutomaticMaskGenerator(predictor, points_per_side=2, **params).generate(image)
    grid = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    # one mask per upscaling chunk: memory budget changes nothing in the output
    from_grid = SamAutomaticMaskGenerator(
        predictor, points_per_side=None, point_grids=[grid], mask_chunk_bytes=1, **params
    ).generate(image)
    assert len(from_side) >= 2
    assert from_grid == from_side


# ----------------------------------------------------------------------------------- building blocks


def test_point_grid_hand_computed():
    expected = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    np.testing.assert_allclose(amg_utils.build_point_grid(2), expected)
    grids = amg_utils.build_all_layer_point_grids(8, 2, 2)
    assert [len(g) for g in grids] == [64, 16, 4]


def test_crop_boxes_hand_computed():
    boxes, layers = amg_utils.generate_crop_boxes((100, 200), 1, 0.5)
    # overlap = int(0.5 * 100) = 50; crop w = ceil((50 + 200) / 2) = 125, h = ceil((50 + 100) / 2) = 75
    assert boxes == [[0, 0, 200, 100], [0, 0, 125, 75], [0, 25, 125, 100], [75, 0, 200, 75], [75, 25, 200, 100]]
    assert layers == [0, 1, 1, 1, 1]


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 700),
    width=st.integers(1, 700),
    n_layers=st.integers(0, 3),
    overlap=st.floats(0.0, 0.9),
    per_side=st.integers(1, 40),
    scale=st.integers(1, 3),
)
def test_grids_and_crops_match_reference(height, width, n_layers, overlap, per_side, scale):
    assert amg_utils.generate_crop_boxes((height, width), n_layers, overlap) == reference_amg.generate_crop_boxes(
        (height, width), n_layers, overlap
    )
    if int(per_side / scale**n_layers) >= 1:
        ours = amg_utils.build_all_layer_point_grids(per_side, n_layers, scale)
        theirs = reference_amg.build_all_layer_point_grids(per_side, n_layers, scale)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


def test_stability_score_hand_computed():
    logits = torch.tensor([[[2.0, 0.5], [-0.5, -2.0]], [[-3.0, -3.0], [-3.0, -3.0]]])
    # offset 1: inner (> 1) = 1 pixel, outer (> -1) = 3 pixels
    score = amg_utils.calculate_stability_score(logits, 0.0, 1.0)
    assert score[0].item() == pytest.approx(1 / 3)
    assert torch.isnan(score[1])  # 0 / 0, as the reference


@pytest.mark.parametrize(
    "input_size, original_size",
    [
        ((1024, 1024), (1024, 1024)),
        ((681, 1024), (300, 451)),
        ((1024, 768), (4000, 3000)),
        ((999, 1024), (999, 1024)),
        ((13, 1024), (13, 1024)),
    ],
)
def test_upscale_is_bit_identical_to_postprocess_masks(models, input_size, original_size):
    ours, _ = models
    generator = torch.Generator().manual_seed(0)
    low_res = 3 * torch.randn(2, 3, 256, 256, generator=generator)
    expected = ours.postprocess_masks(low_res, input_size, original_size)
    actual = amg_utils.upscale_mask_logits(low_res, input_size, original_size, 1024)
    assert torch.equal(actual, expected)


@settings(max_examples=60, deadline=None)
@given(masks=arrays(np.bool_, st.tuples(st.integers(0, 4), st.integers(1, 9), st.integers(1, 9))), data=st.data())
def test_rle_matches_pycocotools_and_reference(masks, data):
    n, h, w = masks.shape
    full_h = data.draw(st.integers(h, h + 4))
    full_w = data.draw(st.integers(w, w + 4))
    x0, y0 = data.draw(st.integers(0, full_w - w)), data.draw(st.integers(0, full_h - h))
    full = np.zeros((n, full_h, full_w), dtype=bool)
    full[:, y0 : y0 + h, x0 : x0 + w] = masks
    rles = amg_utils.masks_to_rle(torch.from_numpy(masks), [x0, y0, x0 + w, y0 + h], (full_h, full_w))
    expected = reference_amg.mask_to_rle_pytorch(torch.from_numpy(full))
    assert len(rles) == n
    for rle, mask, want in zip(rles, full, expected):
        assert rle["size"] == [full_h, full_w]
        assert rle["counts"].tolist() == want["counts"]
        assert np.array_equal(amg_utils.rle_to_mask(rle), mask)
        assert amg_utils.area_from_rle(rle) == mask.sum()
        coco = amg_utils.coco_encode_rle(rle)
        assert coco["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert np.array_equal(amg_utils.rle_to_mask(coco), mask)
        want_box = reference_amg.batched_mask_to_box(torch.from_numpy(mask)).numpy()
        assert np.array_equal(amg_utils.rle_to_box(rle), want_box)
    want_boxes = reference_amg.batched_mask_to_box(torch.from_numpy(masks))
    assert torch.equal(amg_utils.batched_mask_to_box(torch.from_numpy(masks)), want_boxes)
    # thresholding logits straight to RLE gives the same runs, and boxes in crop pixels
    logits = torch.from_numpy(np.where(masks, 0.5, -0.5).astype(np.float32))
    from_logits, boxes = amg_utils.threshold_to_rle(logits, 0.0, [x0, y0, x0 + w, y0 + h], (full_h, full_w))
    assert [r["counts"].tolist() for r in from_logits] == [r["counts"] for r in expected]
    assert torch.equal(boxes, want_boxes)


def test_rle_round_trip_on_real_size_mask():
    image = real_photo("coffee")
    mask = image[:, :, 0] > 128  # a real, ragged mask
    rle = amg_utils.mask_to_rle(mask)
    coco = amg_utils.coco_encode_rle(rle)
    assert mask_utils.area({"size": coco["size"], "counts": coco["counts"].encode()}) == mask.sum()
    assert np.array_equal(mask_utils.decode({"size": coco["size"], "counts": coco["counts"].encode()}), mask)
    assert np.array_equal(amg_utils.rle_to_mask(rle), mask)


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(np.bool_, st.tuples(st.integers(1, 14), st.integers(1, 14))),
    area=st.integers(1, 30),
    mode=st.sampled_from(["holes", "islands"]),
)
def test_remove_small_regions_matches_reference(mask, area, mode):
    sys.modules["cv2"] = _fake_cv2()
    expected, expected_changed = reference_amg.remove_small_regions(mask, area, mode)
    actual, changed = amg_utils.remove_small_regions(mask, area, mode)
    assert changed == expected_changed
    assert np.array_equal(actual, expected)


def _spiral(size: int) -> np.ndarray:
    """A one-pixel-wide spiral: one long snake of a component, the worst case for label merging."""
    mask = np.zeros((size, size), dtype=bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        if top + 2 <= bottom:
            mask[bottom, left : right + 1] = True
        if left + 2 <= right:
            mask[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            mask[top, left - 1] = True
    return mask


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_on_long_snakes_and_real_masks(mode):
    sys.modules["cv2"] = _fake_cv2()
    coffee = real_photo("coffee")
    masks = [_spiral(61), ~_spiral(61), coffee[:, :, 0] > 120, coffee[:, :, 2] < 90]
    for mask in masks:
        for area in (5, 60, 400, 5000):
            expected, expected_changed = reference_amg.remove_small_regions(mask, area, mode)
            actual, changed = amg_utils.remove_small_regions(mask, area, mode)
            assert changed == expected_changed
            assert np.array_equal(actual, expected)


def test_remove_small_regions_hand_computed():
    mask = np.zeros((6, 7), dtype=bool)
    mask[0:4, 0:4] = True
    mask[1, 1] = False  # a 1-pixel hole
    mask[5, 6] = True  # a 1-pixel island
    mask[4, 4] = True  # touches the square diagonally: same 8-connected region
    filled, changed = amg_utils.remove_small_regions(mask, 2, "holes")
    assert changed and filled[1, 1] and filled.sum() == mask.sum() + 1
    cleaned, changed = amg_utils.remove_small_regions(filled, 2, "islands")
    assert changed and not cleaned[5, 6] and cleaned[4, 4] and cleaned.sum() == filled.sum() - 1
    untouched, changed = amg_utils.remove_small_regions(cleaned, 2, "islands")
    assert not changed and np.array_equal(untouched, cleaned)


def test_edge_filter_hand_computed():
    boxes = torch.tensor([[0, 0, 50, 50], [25, 10, 95, 60], [30, 30, 60, 60]])  # crop frame
    near = amg_utils.is_box_near_crop_edge(boxes, [100, 0, 200, 100], [0, 0, 200, 100])
    # In image pixels: the 1st starts at x=100, the crop's left edge, inside the image; the 2nd
    # is within 20 px of the crop's top and right edges, which are image edges; the 3rd is
    # away from every edge.
    assert near.tolist() == [True, False, False]
