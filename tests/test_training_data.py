"""sam.training.data: every input format, splits, and each bad-annotation case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam.training.data import (
    AnnotationError,
    boxes_from_masks,
    category_from_filename,
    detect_format,
    load_coco,
    load_dataset,
    load_png_folder,
    load_sa1b,
)
from sam_factory import real_photo

HEIGHT, WIDTH = 40, 60


def _masks() -> list[np.ndarray]:
    """Three objects of a 40x60 image: a rectangle, a disc, a triangle-ish polygon region."""
    rectangle = np.zeros((HEIGHT, WIDTH), bool)
    rectangle[5:15, 10:30] = True
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    disc = (ys - 28) ** 2 + (xs - 40) ** 2 <= 8 ** 2
    return [rectangle, disc]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_image(path, height=HEIGHT, width=WIDTH, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    photo = real_photo("coffee")[:height, :width]
    Image.fromarray(np.ascontiguousarray(photo)).save(path)
    return photo


@pytest.fixture()
def coco_dir(tmp_path):
    """COCO instances with one compressed RLE, one uncompressed RLE and one polygon annotation."""
    rectangle, disc = _masks()
    _write_image(tmp_path / "images" / "a.png")
    _write_image(tmp_path / "images" / "sub" / "b.png")
    uncompressed = {"size": [HEIGHT, WIDTH], "counts": _uncompressed_counts(disc)}
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
                   {"id": 9, "file_name": "sub/b.png", "height": HEIGHT, "width": WIDTH}],
        "categories": [{"id": 1, "name": "box"}, {"id": 3, "name": "ball"}],
        "annotations": [
            {"id": 100, "image_id": 7, "category_id": 1, "segmentation": _rle(rectangle), "iscrowd": 0},
            {"id": 101, "image_id": 7, "category_id": 3, "segmentation": uncompressed, "iscrowd": 0},
            # The rectangle's outline as a polygon (pixel corners).
            {"id": 102, "image_id": 9, "category_id": 1, "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]], "iscrowd": 0},
            {"id": 103, "image_id": 9, "category_id": 3, "segmentation": _rle(disc), "iscrowd": 1},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a background run (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def test_coco_rle_uncompressed_and_polygon(coco_dir):
    rectangle, disc = _masks()
    dataset = load_dataset(coco_dir / "instances.json", images=coco_dir / "images")
    assert detect_format(coco_dir / "instances.json") == "coco"
    assert dataset.categories == ["box", "ball"]
    assert [r.image_id for r in dataset] == [7, 9]
    assert dataset.num_objects == 3  # the crowd region is not a prompt target
    objects, masks = dataset.object_masks(0)
    assert [o.annotation_id for o in objects] == [100, 101] and [o.category for o in objects] == ["box", "ball"]
    np.testing.assert_array_equal(masks[0], rectangle)
    np.testing.assert_array_equal(masks[1], disc)
    objects, masks = dataset.object_masks(1)
    assert [o.annotation_id for o in objects] == [102]
    # pycocotools rasterises the polygon [10, 30] x [5, 15] to the same pixels as the RLE, up to
    # its edge convention; compare against pycocotools directly.
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[10, 5, 30, 5, 30, 15, 10, 15]], HEIGHT, WIDTH)))
    np.testing.assert_array_equal(masks[0], expected.astype(bool))
    crowd, _ = dataset.object_masks(1, include_crowd=True)
    assert [o.annotation_id for o in crowd] == [102, 103]
    image = dataset.load_image(1)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(boxes_from_masks(np.stack([rectangle]))[0], [10, 5, 29, 14])

    gt = dataset.to_coco()
    assert [c["name"] for c in gt["categories"]] == ["box", "ball"]
    assert len(gt["annotations"]) == 4 and gt["annotations"][3]["iscrowd"] == 1
    assert gt["annotations"][0]["area"] == rectangle.sum()


def test_sa1b_like_auto_masks_output(tmp_path):
    """Our `langsam auto-masks` JSON (file_name relative to the input folder, images elsewhere)."""
    rectangle, disc = _masks()
    _write_image(tmp_path / "photos" / "a" / "x.png")
    record = {"image": {"image_id": 1, "file_name": "a/x.png", "height": HEIGHT, "width": WIDTH},
              "annotations": [{"id": 1, "segmentation": _rle(rectangle), "bbox": [10, 5, 20, 10], "area": 200,
                               "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[20, 10]],
                               "crop_box": [0, 0, WIDTH, HEIGHT]},
                              {"id": 2, "segmentation": _rle(disc)}]}
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a_x.json").write_text(json.dumps(record))
    assert detect_format(tmp_path / "masks") == "sa1b"
    dataset = load_dataset(tmp_path / "masks", images=tmp_path / "photos")
    assert len(dataset) == 1 and dataset.categories == ["object"]
    objects, masks = dataset.object_masks(0)
    assert [o.annotation_id for o in objects] == [1, 2]
    np.testing.assert_array_equal(masks, np.stack([rectangle, disc]))
    # One file, images next to it (the SA-1B release layout).
    _write_image(tmp_path / "release" / "sa_1.png")
    release = dict(record, image=dict(record["image"], file_name="sa_1.png"))
    (tmp_path / "release" / "sa_1.json").write_text(json.dumps(release))
    assert load_sa1b(tmp_path / "release" / "sa_1.json").num_objects == 2


def test_png_folder(tmp_path):
    rectangle, disc = _masks()
    _write_image(tmp_path / "images" / "one.jpg")
    _write_image(tmp_path / "images" / "two.png")
    (tmp_path / "masks" / "one").mkdir(parents=True)
    Image.fromarray(rectangle.astype(np.uint8) * 255).save(tmp_path / "masks" / "one" / "mask_000_a box.png")
    Image.fromarray(disc.astype(np.uint8)).save(tmp_path / "masks" / "one" / "ball_2.png")  # 0/1 values
    assert detect_format(tmp_path) == "png"
    dataset = load_dataset(tmp_path)
    assert [r.file_name for r in dataset] == ["one.jpg", "two.png"]
    assert dataset.categories == ["ball", "a box"]
    objects, masks = dataset.object_masks(0)
    assert [o.category for o in objects] == ["ball", "a box"]
    np.testing.assert_array_equal(masks, np.stack([disc, rectangle]))
    assert dataset.object_masks(1)[1].shape == (0, HEIGHT, WIDTH)  # an image without masks
    assert category_from_filename("7") == "object" and category_from_filename("cat") == "cat"


def test_split_is_seeded_disjoint_and_by_image(tmp_path):
    for index in range(10):
        _write_image(tmp_path / "images" / f"{index}.png")
    (tmp_path / "masks").mkdir()
    dataset = load_png_folder(tmp_path)
    train, val = dataset.split(0.3, seed=4)
    again_train, again_val = dataset.split(0.3, seed=4)
    other_train, _ = dataset.split(0.3, seed=5)
    names = lambda part: [r.file_name for r in part]  # noqa: E731
    assert len(val) == 3 and len(train) == 7
    assert not set(names(train)) & set(names(val))
    assert names(train) == names(again_train) and names(val) == names(again_val)
    assert names(train) != names(other_train)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dataset.split(1.0)


# ---------------------------------------------------------------------------- bad annotations
def _coco(tmp_path, annotation, images=None, categories=None):
    _write_image(tmp_path / "a.png")
    data = {"images": images or [{"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH}],
            "categories": categories or [{"id": 1, "name": "thing"}],
            "annotations": [dict({"id": 42, "image_id": 1, "category_id": 1, "iscrowd": 0}, **annotation)]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("annotation, images, categories, message", [
    ({"segmentation": {"size": [HEIGHT + 1, WIDTH], "counts": "abc"}}, None, None,
     r"bad\.json: annotation 42: mask of wrong size: the RLE is \[41, 60\]"),
    ({"segmentation": [[0, 0, 70, 0, 70, 10]]}, None, None,
     r"bad\.json: annotation 42: polygon outside the image: point \(70, 0\)"),
    ({"segmentation": [[0, 0, 5, 0]]}, None, None, r"bad\.json: annotation 42: malformed polygon"),
    ({"segmentation": [[0, 0, 5, 0, 5, 5]]}, [{"id": 1, "file_name": "gone.png", "height": HEIGHT, "width": WIDTH}],
     None, r"bad\.json: image 1 \(gone\.png\): missing image, no file at .*gone\.png"),
    ({"segmentation": [[0, 0, 5, 0, 5, 5]], "category_id": 5}, None, None,
     r"bad\.json: annotation 42: empty category: category_id 5 is not in 'categories'"),
    ({"segmentation": [[0, 0, 5, 0, 5, 5]]}, None, [{"id": 1, "name": "  "}], r"bad\.json: category 1 has an empty name"),
    ({"segmentation": None}, None, None, r"bad\.json: annotation 42: no usable segmentation"),
    ({"segmentation": [[0, 0, 5, 0, 5, 5]], "image_id": 3}, None, None,
     r"bad\.json: annotation 42: refers to image 3, which is not in 'images'"),
])
def test_bad_coco_annotations_name_file_and_id(tmp_path, annotation, images, categories, message):
    path = _coco(tmp_path, annotation, images, categories)
    with pytest.raises(AnnotationError, match=message):
        load_coco(path)


def test_bad_masks_found_when_decoded_and_skipped_when_not_strict(tmp_path, caplog):
    # Degenerate polygon: passes the metadata checks but rasterises to nothing.
    path = _coco(tmp_path, {"segmentation": [[3, 3, 3, 3, 3, 3]]})
    dataset = load_coco(path)
    with pytest.raises(AnnotationError, match=r"bad\.json: annotation 42: mask is empty"):
        dataset.object_masks(0)
    lenient = load_coco(path, strict=False)
    objects, masks = lenient.object_masks(0)
    assert objects == [] and masks.shape == (0, HEIGHT, WIDTH)
    assert "mask is empty" in caplog.text
    # A wrong category is skipped (with a warning) when not strict.
    skipped = load_coco(_coco(tmp_path, {"segmentation": [[0, 0, 5, 0, 5, 5]], "category_id": 9}), strict=False)
    assert skipped.num_objects == 0 and "empty category" in caplog.text


def test_image_size_disagreeing_with_annotations(tmp_path):
    path = _coco(tmp_path, {"segmentation": [[0, 0, 5, 0, 5, 5]]})
    _write_image(tmp_path / "a.png", height=HEIGHT - 2)  # the file is smaller than the JSON says
    dataset = load_coco(path)
    with pytest.raises(AnnotationError, match=r"bad\.json: image 1 \(a\.png\): the file is 60x38 but the annotations say 60x40"):
        dataset.load_image(0)


def test_bad_sa1b_and_png_cases(tmp_path):
    rectangle, _ = _masks()
    (tmp_path / "sa").mkdir()
    _write_image(tmp_path / "sa" / "x.png")
    record = {"image": {"file_name": "x.png", "height": HEIGHT, "width": WIDTH + 5},
              "annotations": [{"id": 3, "segmentation": _rle(rectangle)}]}
    (tmp_path / "sa" / "x.json").write_text(json.dumps(record))
    with pytest.raises(AnnotationError, match=r"x\.json: annotation 3: mask of wrong size"):
        load_sa1b(tmp_path / "sa" / "x.json")
    record = {"image": {"file_name": "missing.png", "height": HEIGHT, "width": WIDTH},
              "annotations": [{"id": 3, "segmentation": _rle(rectangle)}]}
    (tmp_path / "sa" / "x.json").write_text(json.dumps(record))
    with pytest.raises(AnnotationError, match=r"x\.json: missing image"):
        load_sa1b(tmp_path / "sa" / "x.json")

    png = tmp_path / "png"
    _write_image(png / "images" / "p.png")
    (png / "masks" / "p").mkdir(parents=True)
    Image.fromarray(np.zeros((HEIGHT, WIDTH + 1), np.uint8)).save(png / "masks" / "p" / "dog_1.png")
    with pytest.raises(AnnotationError, match=r"masks/p/dog_1\.png: .*mask is 61x40 \(WxH\) but the image is 60x40"):
        load_png_folder(png)
    # The right size but no object pixel: found when the mask is read, named by its file.
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(png / "masks" / "p" / "dog_1.png")
    dataset = load_png_folder(png)
    with pytest.raises(AnnotationError, match=r"^masks/p/dog_1\.png: mask is empty"):
        dataset.object_masks(0)
    (png / "masks" / "p" / "dog_1.png").unlink()
    (png / "masks" / "orphan").mkdir()
    Image.fromarray(rectangle.astype(np.uint8)).save(png / "masks" / "orphan" / "1.png")
    with pytest.raises(AnnotationError, match=r"masks/orphan: missing image"):
        load_png_folder(png)
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset(png, format="voc")
