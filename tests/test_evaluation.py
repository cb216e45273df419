"""sam.evaluation (click protocol, mIoU) and langsam.evaluation (COCO mask AP)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam import SamPredictor
from sam.evaluation import (
    Click,
    click_session,
    evaluate_prompts,
    farthest_from_boundary,
    first_click,
    mask_iou,
    next_click,
)
from sam.training.data import boxes_from_masks, load_dataset
from sam.training.synthetic import make_shapes_dataset
from sam_factory import make_tiny_sam


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ---------------------------------------------------------------------------- hand-worked clicks
def _grid(height, width, rows, cols):
    mask = np.zeros((height, width), bool)
    mask[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return mask


def test_mask_iou():
    a = _grid(6, 6, (0, 1), (0, 3))  # 8 pixels
    b = _grid(6, 6, (1, 2), (0, 3))  # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0 and mask_iou(np.zeros_like(a), a) == 0.0
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0  # agree on nothing
    np.testing.assert_allclose(mask_iou(np.stack([a, b]), a), [1.0, 4 / 12])


def test_first_click_on_a_small_mask():
    # A 5x7 rectangle (rows 1-5, cols 1-7) in a 7x9 image. The distance to the nearest pixel
    # outside: min(row - 0, 6 - row, col - 0, 8 - col); its maximum, 3, is reached at row 3,
    # cols 3, 4 and 5; the first in raster order wins.
    truth = _grid(7, 9, (1, 5), (1, 7))
    assert farthest_from_boundary(truth) == (3, 3, 3.0)
    assert first_click(truth) == Click(x=3, y=3, label=1)
    # The image edge is a boundary: a full-width band of rows 0-2 peaks in its middle row.
    band = _grid(7, 9, (0, 2), (0, 8))
    assert farthest_from_boundary(band) == (1, 1, 2.0)


def test_next_click_on_the_largest_error_region():
    # 10x12 image. Truth: rows 1-8, cols 1-10. Prediction: rows 1-8, cols 1-4, plus row 9,
    # cols 0-2 (a false positive of 3 pixels). False negative: rows 1-8, cols 5-10 (48 pixels),
    # the largest region. Its distance to the boundary is min(row, 9 - row, col - 4, 11 - col):
    # at most 3, first reached at row 3, col 7 -> a positive click at (x=7, y=3).
    truth = _grid(10, 12, (1, 8), (1, 10))
    prediction = _grid(10, 12, (1, 8), (1, 4)) | _grid(10, 12, (9, 9), (0, 2))
    assert next_click(prediction, truth) == Click(x=7, y=3, label=1)
    # Grow the false positive to rows 0 and 9 completely plus col 11 (12 + 12 + 8 = 32 pixels,
    # one region) and shrink the false negative to cols 9-10 (16 pixels): now the click is
    # negative, in the false-positive ring, whose pixels are all 1 away from its boundary; the
    # first in raster order is (row 0, col 0).
    prediction = _grid(10, 12, (1, 8), (1, 8)) | _grid(10, 12, (0, 0), (0, 11)) | _grid(10, 12, (9, 9), (0, 11)) \
        | _grid(10, 12, (0, 9), (11, 11))
    assert next_click(prediction, truth) == Click(x=0, y=0, label=0)
    # Two false-negative pieces: the larger one (rows 1-8, cols 8-10; 24 px) beats the smaller
    # (rows 1-2, cols 1-4; 8 px). In it the distance min(row, 9 - row, col - 7, 11 - col) peaks
    # at 2, first at row 2, col 9.
    prediction = _grid(10, 12, (3, 8), (1, 4)) | _grid(10, 12, (1, 8), (5, 7))
    assert next_click(prediction, truth) == Click(x=9, y=2, label=1)
    assert next_click(truth, truth) is None


class ScriptedDecoder:
    """Answers decode calls with prepared masks and records what it was asked."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, points, labels, boxes, mask_input, multimask):
        self.calls.append({"points": None if points is None else np.array(points), "labels": labels,
                           "boxes": boxes, "mask_input": mask_input, "multimask": multimask})
        masks, scores = self.answers.pop(0)
        low_res = torch.as_tensor(np.asarray(masks, dtype=np.float32))  # stands in for the logits
        return np.asarray(masks, bool), np.asarray(scores, float), low_res


def test_click_session_follows_the_protocol():
    truth = _grid(10, 12, (1, 8), (1, 10))  # 80 pixels
    left = _grid(10, 12, (1, 8), (1, 4))  # 32 pixels inside the truth
    almost = _grid(10, 12, (1, 8), (1, 9))  # 72 pixels
    decoder = ScriptedDecoder([
        # Click 1: three candidates; the highest score (0.9, the middle one) is kept even though
        # the truth itself is among them (that is what the oracle measures).
        (np.stack([truth, left, np.zeros_like(truth)])[None], [[0.1, 0.9, 0.5]]),
        (almost[None, None], [[0.8]]),  # click 2
        (truth[None, None], [[0.8]]),  # click 3
    ])
    session = click_session(decoder, truth[None], num_clicks=4)
    np.testing.assert_allclose(session.ious[0], [32 / 80, 72 / 80, 1.0, 1.0])
    assert session.oracle[0] == 1.0
    first, second, third = decoder.calls
    assert first["multimask"] and first["mask_input"] is None
    # The farthest-from-boundary point of rows 1-8 x cols 1-10: min(row, 9-row, col, 11-col)
    # peaks at 4 at rows 4-5, cols 4-7; the first is (x=4, y=4).
    np.testing.assert_array_equal(first["points"], [[[4, 4]]])
    np.testing.assert_array_equal(first["labels"], [[1]])
    # Click 2 on the false negative cols 5-10 (see above): (x=7, y=3), positive; the previous
    # logits of the chosen mask go in as mask_input; one mask.
    np.testing.assert_array_equal(second["points"], [[[4, 4], [7, 3]]])
    np.testing.assert_array_equal(second["labels"], [[1, 1]])
    assert not second["multimask"]
    np.testing.assert_array_equal(second["mask_input"][0, 0].numpy(), left.astype(np.float32))
    # Click 3 on the single missing column 10, rows 1-8: every pixel is 1 from the boundary; the
    # first is (x=10, y=1).
    np.testing.assert_array_equal(third["points"][0, 2], [10, 1])
    assert session.clicks[0][2] == Click(x=10, y=1, label=1)
    assert len(decoder.calls) == 3  # exact after click 3: no more decoding, the IoU stays


@pytest.mark.parametrize("answer, expected", [("perfect", 1.0), ("empty", 0.0)])
def test_perfect_and_empty_predictors(answer, expected):
    truths = np.stack([_grid(10, 12, (1, 8), (1, 10)), _grid(10, 12, (2, 3), (2, 5))])

    def decode(points, labels, boxes, mask_input, multimask):
        count = 3 if multimask else 1
        masks = truths if answer == "perfect" else np.zeros_like(truths)
        masks = np.repeat(masks[:, None], count, axis=1)
        return masks, np.ones((len(truths), count)), torch.zeros(len(truths), count, 4, 4)

    session = click_session(decode, truths, num_clicks=3)
    np.testing.assert_array_equal(session.ious, np.full((2, 3), expected))
    from sam.evaluation import box_prompt_ious

    np.testing.assert_array_equal(box_prompt_ious(decode, truths), [expected, expected])


# ---------------------------------------------------------------------------- real predictors
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    # One image (the encoders are the slow part) with three objects of three categories.
    root = make_shapes_dataset(tmp_path_factory.mktemp("eval_shapes"), num_images=1, image_size=(96, 128), seed=3)
    return load_dataset(root)


class Features:
    """Each image encoded once, shared by both paths (the encoder is the slow part)."""

    def __init__(self, predictor, dataset):
        self.entries = []
        for index in range(len(dataset)):
            predictor.set_image(dataset.load_image(index))
            self.entries.append((predictor.features, predictor.original_size, predictor.input_size))

    def get(self, index):
        return self.entries[index]


def _reference_mious(predictor, dataset, features):
    """1-click and box mIoU through SamPredictor.predict (original-frame prompts), by hand."""
    from sam.evaluation import first_click

    click_ious, box_ious = [], []
    for index in range(len(dataset)):
        _, truths = dataset.object_masks(index)
        predictor.set_embedding(*features.get(index))
        for truth in truths:
            click = first_click(truth)
            masks, scores, _ = predictor.predict(point_coords=np.array([[click.x, click.y]]),
                                                 point_labels=np.array([1]), multimask_output=True)
            click_ious.append(mask_iou(masks[np.argmax(scores)], truth))
            masks, _, _ = predictor.predict(box=boxes_from_masks(truth[None])[0], multimask_output=False)
            box_ious.append(mask_iou(masks[0], truth))
    return np.mean(click_ious), np.mean(box_ious)


def _check_against_predict(model, dataset):
    predictor = SamPredictor(model)
    features = Features(predictor, dataset)
    evaluation = evaluate_prompts(predictor, dataset, num_clicks=2, box=True, embeddings=features)
    summary = evaluation.summary()
    click, box = _reference_mious(predictor, dataset, features)
    assert summary["objects"] == dataset.num_objects == 3
    assert summary["miou_click_1"] == pytest.approx(click, abs=1e-6)
    assert summary["miou_box"] == pytest.approx(box, abs=1e-6)
    assert summary["miou_click_1_oracle"] >= summary["miou_click_1"] - 1e-9
    per_category = evaluation.per_category()
    counts = sum(entry["objects"] for entry in per_category.values())
    assert counts == summary["objects"]
    weighted = sum(entry["objects"] * entry["miou_box"] for entry in per_category.values()) / counts
    assert weighted == pytest.approx(summary["miou_box"])
    table = evaluation.table()
    assert table.splitlines()[0].split()[:3] == ["category", "objects", "1"] and "2 clicks" in table
    return evaluation


def test_evaluate_prompts_sam1_matches_predict(shapes):
    _check_against_predict(make_tiny_sam(seed=1), shapes)


def test_evaluate_prompts_sam2_matches_predict(shapes):
    from sam2_factory import make_tiny_sam2

    _check_against_predict(make_tiny_sam2(), shapes)


# ---------------------------------------------------------------------------- COCO mask AP
class GroundTruthPipeline:
    """Stands in for LangSAM: returns chosen masks per image as a Segmentation."""

    def __init__(self, dataset, answer):
        self.dataset, self.answer, self.calls = dataset, answer, []

    def segment(self, image, queries, box_threshold, text_threshold, mode, **options):
        from langsam.result import Segmentation

        self.calls.append((mode, tuple(queries)))
        index = next(i for i in range(len(self.dataset)) if np.array_equal(self.dataset.load_image(i), image))
        objects, masks = self.dataset.object_masks(index)
        masks, labels, scores = self.answer(index, objects, masks)
        return Segmentation(masks=np.asarray(masks, bool).reshape(-1, *image.shape[:2]),
                            boxes=boxes_from_masks(np.asarray(masks, bool)).astype(np.float32).reshape(-1, 4),
                            scores=np.asarray(scores, np.float32), mask_scores=np.asarray(scores, np.float32),
                            clip_scores=None, labels=list(labels), image_size=image.shape[:2], mode=mode)


def _cocoeval(gt_dict, results, category_id=None):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_dict)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "segm")
        if category_id is not None:
            evaluator.params.catIds = [category_id]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_text_ap_perfect_empty_and_against_pycocotools(shapes):
    from langsam.evaluation import evaluate_text

    perfect = GroundTruthPipeline(shapes, lambda i, objects, masks: (masks, [o.category for o in objects],
                                                                        [0.9] * len(objects)))
    result = evaluate_text(perfect, shapes, modes=("grounded", "clip"))
    assert perfect.calls[0] == ("grounded", tuple(shapes.categories)) and perfect.calls[1][0] == "clip"
    for scores in result.modes.values():
        assert scores.ap == pytest.approx(1.0) and scores.ap50 == pytest.approx(1.0)
        present = [name for name, entry in scores.per_category.items() if entry["objects"]]
        assert present and all(scores.per_category[name]["ap"] == pytest.approx(1.0) for name in present)

    nothing = GroundTruthPipeline(shapes, lambda i, objects, masks: (masks[:0], [], []))
    empty = evaluate_text(nothing, shapes).modes["grounded"]
    assert empty.ap == 0.0 and empty.detections == 0

    def imperfect(index, objects, masks):
        # Each object: an eroded copy (IoU < 1), labelled right for even objects and with the
        # wrong category for odd ones, plus a spurious full-image mask with a high score.
        eroded = masks.copy()
        eroded[:, ::4] = False
        labels = [o.category if k % 2 == 0 else shapes.categories[(shapes.categories.index(o.category) + 1)
                                                                   % len(shapes.categories)]
                  for k, o in enumerate(objects)]
        spurious = np.ones((1, *masks.shape[1:]), bool)
        return (np.concatenate([eroded, spurious]), labels + [shapes.categories[0]],
                [0.5 + 0.01 * k for k in range(len(objects))] + [0.95])

    pipeline = GroundTruthPipeline(shapes, imperfect)
    scores = evaluate_text(pipeline, shapes).modes["grounded"]
    # The same results through pycocotools directly.
    results, ids = [], {name: k for k, name in enumerate(shapes.categories, start=1)}
    for index, record in enumerate(shapes):
        segmentation = pipeline.segment(shapes.load_image(index), shapes.categories, 0.3, 0.25, "grounded")
        results += segmentation.to_coco(image_id=record.image_id, category_ids=ids)
    stats = _cocoeval(shapes.to_coco(), results)
    assert 0.0 < scores.ap < 1.0
    assert scores.stats == pytest.approx(list(stats))
    assert (scores.ap, scores.ap50, scores.ap75) == pytest.approx((stats[0], stats[1], stats[2]))
    for name, entry in scores.per_category.items():
        direct = _cocoeval(shapes.to_coco(), results, ids[name])
        expected = None if direct[0] < 0 else direct[0]
        assert entry["ap"] == pytest.approx(expected) if expected is not None else entry["ap"] is None
        if direct[1] >= 0:
            assert entry["ap50"] == pytest.approx(direct[1])
    assert "AP50" in evaluate_text(pipeline, shapes).table()


def test_rle_ground_truth_round_trip(shapes):
    gt = shapes.to_coco()
    _, masks = shapes.object_masks(0)
    first = gt["annotations"][0]
    decoded = mask_utils.decode({"size": first["segmentation"]["size"], "counts": first["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), masks[0])
