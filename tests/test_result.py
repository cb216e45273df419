"""langsam.result.Segmentation: validation, indexing, COCO export, overlay, save."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from langsam.result import Segmentation, label_color


def _sample(with_image: bool = True) -> Segmentation:
    height, width = 12, 16
    masks = np.zeros((3, height, width), dtype=bool)
    masks[0, 2:5, 3:7] = True  # 3 x 4 = 12 px
    masks[1, 6:12, 0:2] = True  # 6 x 2 = 12 px
    masks[2, 0:1, 15:16] = True  # 1 px
    image = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3) if with_image else None
    return Segmentation(
        masks=masks,
        boxes=np.array([[3, 2, 7, 5], [0, 6, 2, 12], [15, 0, 16, 1]], dtype=np.float64),
        scores=[0.9, 0.5, 0.7],
        mask_scores=[0.8, 0.6, 0.4],
        labels=["a cat", "a dog", "a cat"],
        image_size=(height, width),
        image=image,
    )


def test_post_init_converts_and_validates():
    seg = _sample()
    assert seg.boxes.dtype == np.float32 and seg.scores.dtype == np.float32 and seg.masks.dtype == bool
    good = dict(masks=seg.masks, boxes=seg.boxes, scores=seg.scores, mask_scores=seg.mask_scores,
                labels=seg.labels, image_size=(12, 16))
    for field, bad, message in [
        ("masks", seg.masks[:, :5], r"masks must have shape \(N, 12, 16\)"),
        ("boxes", seg.boxes[:2], r"boxes must have shape \(3, 4\)"),
        ("scores", seg.scores[:2], "scores must have 3 entries"),
        ("mask_scores", np.zeros(4), "mask_scores must have 3 entries"),
        ("labels", ["x"], "labels must have 3 entries"),
        ("image_size", (0, 16), "image_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            Segmentation(**{**good, field: bad})
    with pytest.raises(ValueError, match="mode"):
        Segmentation(**good, mode="magic")
    with pytest.raises(ValueError, match="clip_scores"):
        Segmentation(**good, clip_scores=[0.1])
    with pytest.raises(ValueError, match="image must be"):
        Segmentation(**good, image=np.zeros((16, 12, 3), np.uint8))


def test_empty_has_zero_objects_with_right_shapes():
    seg = Segmentation.empty((5, 7), mode="hybrid", with_clip_scores=True)
    assert len(seg) == 0 and list(seg) == []
    assert seg.masks.shape == (0, 5, 7) and seg.boxes.shape == (0, 4) and seg.clip_scores.shape == (0,)
    assert seg.to_coco() == []
    assert seg.mode == "hybrid"


def test_iteration_and_indexing():
    seg = _sample()
    records = list(seg)
    assert [r["label"] for r in records] == ["a cat", "a dog", "a cat"]
    assert [r["area"] for r in records] == [12, 12, 1]
    assert records[1]["box"] == [0.0, 6.0, 2.0, 12.0]
    assert seg[-1]["index"] == 2 and seg[1]["score"] == pytest.approx(0.5)
    with pytest.raises(IndexError):
        seg[3]
    cats = seg[np.array([label == "a cat" for label in seg.labels])]
    assert isinstance(cats, Segmentation) and cats.labels == ["a cat", "a cat"]
    np.testing.assert_array_equal(cats.masks, seg.masks[[0, 2]])
    confident = seg[seg.scores > 0.6]
    np.testing.assert_allclose(confident.scores, [0.9, 0.7])
    reordered = seg[[2, 0]]
    np.testing.assert_array_equal(reordered.boxes, seg.boxes[[2, 0]])
    assert seg[1:].labels == ["a dog", "a cat"] and seg[1:].image is seg.image
    assert len(seg[np.zeros(3, dtype=bool)]) == 0
    with pytest.raises(IndexError):
        seg[np.ones(2, dtype=bool)]


def test_to_coco_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    seg = _sample()
    annotations = seg.to_coco(image_id=7)
    assert [a["category_id"] for a in annotations] == [1, 2, 1]
    assert annotations[0]["bbox"] == [3.0, 2.0, 4.0, 3.0]
    assert [a["area"] for a in annotations] == [12.0, 12.0, 1.0]
    for annotation, mask in zip(annotations, seg.masks):
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    json.dumps(annotations)  # plain JSON types only

    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": 7, "height": 12, "width": 16}],
        "categories": [{"id": 1, "name": "a cat"}, {"id": 2, "name": "a dog"}],
        "annotations": [],
    }
    ground_truth.createIndex()
    detections = ground_truth.loadRes(annotations)
    assert len(detections.getAnnIds(imgIds=[7], catIds=[1])) == 2
    loaded = detections.loadAnns(detections.getAnnIds(catIds=[2]))[0]
    np.testing.assert_array_equal(detections.annToMask(loaded).astype(bool), seg.masks[1])

    custom = seg.to_coco(category_ids={"a cat": 17, "a dog": 3})
    assert [a["category_id"] for a in custom] == [17, 3, 17]
    with pytest.raises(ValueError, match="'a dog'"):
        seg.to_coco(category_ids={"a cat": 1})


def test_overlay_tints_masks_only_and_keeps_size():
    seg = _sample()
    plain = np.asarray(seg.overlay(alpha=0.5, draw_boxes=False))
    assert plain.shape == seg.image.shape
    outside = ~seg.masks.any(axis=0)
    np.testing.assert_array_equal(plain[outside], seg.image[outside])
    color = np.array(label_color("a dog"), dtype=np.float64)
    expected = 0.5 * seg.image[seg.masks[1]].astype(np.float64) + 0.5 * color
    assert np.abs(plain[seg.masks[1]].astype(np.float64) - expected).max() <= 1.0
    assert label_color("a cat") == label_color("a cat") != label_color("a dog")
    boxed = seg.overlay()
    assert boxed.size == (16, 12) and boxed.mode == "RGB"
    with pytest.raises(ValueError, match="no image"):
        _sample(with_image=False).overlay()
    with pytest.raises(ValueError, match="HxW"):
        seg.overlay(np.zeros((4, 4, 3), np.uint8))


def test_save_writes_masks_overlay_and_json(tmp_path):
    seg = _sample()
    seg.labels[1] = "../../escape"
    out = seg.save(tmp_path / "result")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["mask_000_a_cat.png", "mask_001_escape.png", "mask_002_a_cat.png", "overlay.jpg", "result.json"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
    for index, name in enumerate(names[:3]):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)) > 127, seg.masks[index])
    data = json.loads((out / "result.json").read_text())
    assert data["count"] == 3 and data["image_size"] == [12, 16]
    assert data["objects"][1]["label"] == "../../escape" and data["objects"][1]["mask_file"] == "mask_001_escape.png"
    assert Image.open(out / "overlay.jpg").size == (16, 12)
    bare = _sample(with_image=False).save(tmp_path / "bare")
    assert not (bare / "overlay.jpg").exists()
