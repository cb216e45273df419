"""Bad or unusual input to SamPredictor: conversions that are announced, and clear ValueErrors."""

import numpy as np
import pytest
import torch
from sam_factory import make_tiny_sam, real_photo

from sam import ImageNotSetError, SamPredictor


@pytest.fixture(scope="module")
def model():
    return make_tiny_sam(seed=11)


@pytest.fixture(scope="module")
def predictor(model):
    predictor = SamPredictor(model)
    predictor.set_image(real_photo("coffee"))
    return predictor


@pytest.fixture(scope="module")
def gray_image():
    return real_photo("chelsea")[:, :, 1].copy()


def test_grayscale_image_is_replicated_with_a_warning(model, gray_image):
    expected = SamPredictor(model)
    expected.set_image(np.repeat(gray_image[:, :, None], 3, axis=2))
    predictor = SamPredictor(model)
    with pytest.warns(UserWarning, match="grayscale"):
        predictor.set_image(gray_image)
    torch.testing.assert_close(predictor.features, expected.features, atol=0, rtol=0)


def test_rgba_and_float_and_bgr_images_convert_to_the_same_embedding(model):
    image = real_photo("chelsea")
    expected = SamPredictor(model)
    expected.set_image(image)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 128, np.uint8)], axis=2)
    cases = {
        "alpha": (rgba, "RGB"),
        "float": (image.astype(np.float32) / 255.0, "RGB"),
    }
    for note, (variant, image_format) in cases.items():
        predictor = SamPredictor(model)
        with pytest.warns(UserWarning, match=note):
            predictor.set_image(variant, image_format=image_format)
        torch.testing.assert_close(predictor.features, expected.features, atol=0, rtol=0)
    bgr = SamPredictor(model)
    bgr.set_image(np.ascontiguousarray(image[:, :, ::-1]), image_format="BGR")
    torch.testing.assert_close(bgr.features, expected.features, atol=0, rtol=0)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4, 2), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((2, 3, 4, 3), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), 300.0, np.float32), r"\[0, 1\] or \[0, 255\]"),
        (np.full((8, 8, 3), -1, np.int32), r"\[0, 255\]"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images_raise_value_error(model, image, message):
    with pytest.raises(ValueError, match=message):
        SamPredictor(model).set_image(image)


def test_bad_image_format_is_rejected(model):
    with pytest.raises(ValueError, match="image_format"):
        SamPredictor(model).set_image(real_photo("chelsea"), image_format="HSV")


def test_predict_before_set_image(model):
    predictor = SamPredictor(model)
    with pytest.raises(ValueError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 10, 10]))
    with pytest.raises(ImageNotSetError):
        predictor.get_image_embedding()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(point_coords=np.array([[10, 10], [20, 20], [30, 30]]), point_labels=np.array([1, 0])),
         "3 points but point_labels has 2"),
        (dict(point_coords=np.array([[10, 10]])), "together"),
        (dict(point_coords=np.array([[10, 10, 3]]), point_labels=np.array([1])), r"\(N, 2\)"),
        (dict(point_coords=np.array([[10, 10]]), point_labels=np.array([2])), "foreground"),
        (dict(point_coords=np.array([[np.nan, 10]]), point_labels=np.array([1])), "NaN"),
        (dict(point_coords=np.array([[-5, 10]]), point_labels=np.array([1])), "outside"),
        (dict(point_coords=np.array([[10, 9999]]), point_labels=np.array([1])), "outside"),
        (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty"),
        (dict(box=np.array([1, 2, 3])), "4 numbers"),
        (dict(box=np.array([[1, 2, 3, 4], [1, 2, 3, 4]])), "4 numbers"),
        (dict(box=np.array([50, 10, 20, 40])), "x1 >= x0"),
        (dict(box=np.array([0, 0, np.inf, 10])), "infinite"),
        (dict(box=np.array([0, 0, 10, 10]), mask_input=np.zeros((1, 64, 64))), r"\(1, 256, 256\)"),
    ],
)
def test_bad_prompts_raise_value_error(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_predict_torch_checks_batch_consistency(predictor):
    with pytest.raises(ValueError, match="batch sizes disagree"):
        predictor.predict_torch(
            torch.zeros(2, 1, 2), torch.ones(2, 1), boxes=torch.tensor([[0.0, 0, 10, 10]] * 3)
        )
    with pytest.raises(ValueError, match=r"point_labels must have shape \(2, 1\)"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(3, 1))


def test_points_on_the_image_border_are_accepted(predictor):
    height, width = predictor.original_size
    masks, iou, low_res = predictor.predict(
        point_coords=np.array([[0.0, 0.0], [width, height]]), point_labels=np.array([1, 0])
    )
    assert masks.shape == (3, height, width) and np.isfinite(iou).all() and np.isfinite(low_res).all()
