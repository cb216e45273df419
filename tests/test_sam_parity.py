"""Numerical parity of our SAM with Meta's reference on identical random weights and real photos."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as ReferencePredictor
from segment_anything.utils.transforms import ResizeLongestSide as ReferenceResize
from sam_factory import make_reference_sam, make_tiny_sam, real_photo

from sam import ResizeLongestSide, SamPredictor

LOGIT_ATOL = 2e-4
EMBED_ATOL = 1e-4
MAX_MASK_MISMATCH = 1e-4  # fraction of pixels allowed to flip where a logit sits at ~0


def _images():
    chelsea = real_photo("chelsea")  # 300x451
    rocket = real_photo("rocket")  # 427x640
    return {
        "chelsea_300x451": chelsea,
        "rocket_portrait_640x427": np.ascontiguousarray(rocket.transpose(1, 0, 2)),
        "astronaut_square_512": real_photo("astronaut"),
    }


IMAGES = _images()


@pytest.fixture(scope="module")
def models():
    ours = make_tiny_sam(seed=3)
    return ours, make_reference_sam(ours)


@pytest.fixture(scope="module", params=list(IMAGES))
def predictors(request, models):
    return _make_predictors(models, request.param)


@pytest.fixture(scope="module")
def chelsea_predictors(models):
    return _make_predictors(models, "chelsea_300x451")


def _make_predictors(models, image_name):
    ours, reference = models
    image = IMAGES[image_name]
    our_predictor, ref_predictor = SamPredictor(ours), ReferencePredictor(reference)
    our_predictor.set_image(image)
    ref_predictor.set_image(image)
    return our_predictor, ref_predictor, image


def test_image_embedding_matches_reference(predictors):
    ours, reference, image = predictors
    assert ours.original_size == reference.original_size == image.shape[:2]
    assert ours.input_size == reference.input_size
    ours_embedding = ours.get_image_embedding()
    ref_embedding = reference.get_image_embedding()
    assert ours_embedding.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours_embedding, ref_embedding, atol=EMBED_ATOL, rtol=0)
    assert ref_embedding.abs().max() > 1.0  # non-trivial values were compared


def _prompts(image):
    height, width = image.shape[:2]
    points = np.array([[0.3 * width, 0.4 * height], [0.7 * width, 0.6 * height], [0.5 * width, 0.2 * height]])
    labels = np.array([1, 0, 1])
    box = np.array([0.1 * width, 0.15 * height, 0.8 * width, 0.9 * height])
    return {
        "points": dict(point_coords=points, point_labels=labels),
        "single_point": dict(point_coords=points[:1], point_labels=labels[:1]),
        "box": dict(box=box),
        "box_and_points": dict(point_coords=points, point_labels=labels, box=box),
    }


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["points", "single_point", "box", "box_and_points", "mask_input"])
def test_predict_matches_reference(chelsea_predictors, prompt, multimask):
    _check_predict(*chelsea_predictors, prompt, multimask)


@pytest.mark.parametrize("prompt", ["box_and_points", "mask_input"])
def test_predict_matches_reference_other_shapes(predictors, prompt):
    _check_predict(*predictors, prompt, True)


def _check_predict(ours, reference, image, prompt, multimask):
    prompts = _prompts(image)
    if prompt == "mask_input":
        # Feed back the reference's own low-res logits, as in iterative refinement.
        _, _, low_res = reference.predict(**prompts["points"], multimask_output=False)
        kwargs = dict(prompts["points"], mask_input=low_res)
    else:
        kwargs = prompts[prompt]
    our_logits, our_iou, our_low = ours.predict(**kwargs, multimask_output=multimask, return_logits=True)
    ref_logits, ref_iou, ref_low = reference.predict(**kwargs, multimask_output=multimask, return_logits=True)
    expected_count = 3 if multimask else 1
    assert our_logits.shape == (expected_count, *image.shape[:2])
    np.testing.assert_allclose(our_low, ref_low, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(our_logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(our_iou, ref_iou, atol=1e-5, rtol=0)

    our_masks, _, _ = ours.predict(**kwargs, multimask_output=multimask)
    ref_masks, _, _ = reference.predict(**kwargs, multimask_output=multimask)
    assert our_masks.dtype == bool
    assert (our_masks != ref_masks).mean() <= MAX_MASK_MISMATCH
    assert 0.0 < ref_masks.mean() < 1.0  # the comparison is not between two empty masks


def test_predict_torch_batch_of_boxes_matches_reference(chelsea_predictors):
    ours, reference, image = chelsea_predictors
    height, width = image.shape[:2]
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1, size=(5, 2, 2)), axis=1) * [width, height]
    boxes = corners.reshape(5, 4)
    our_boxes = ours.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
    ref_boxes = reference.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
    torch.testing.assert_close(our_boxes, ref_boxes)
    our_masks, our_iou, our_low = ours.predict_torch(None, None, our_boxes, multimask_output=True)
    ref_masks, ref_iou, ref_low = reference.predict_torch(None, None, ref_boxes, multimask_output=True)
    assert our_masks.shape == (5, 3, height, width)
    torch.testing.assert_close(our_low, ref_low, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(our_iou, ref_iou, atol=1e-5, rtol=0)
    assert (our_masks != ref_masks).float().mean() <= MAX_MASK_MISMATCH
    # One batched call equals five single calls (batching changes nothing).
    for index in range(5):
        single_masks, single_iou, _ = ours.predict(box=boxes[index], multimask_output=True)
        np.testing.assert_allclose(single_iou, our_iou[index].numpy(), atol=1e-5)
        assert (single_masks != our_masks[index].numpy()).mean() <= MAX_MASK_MISMATCH


def test_sam_forward_matches_reference(models):
    ours, reference = models
    image = IMAGES["chelsea_300x451"]
    transform = ResizeLongestSide(1024)
    pixels = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).float()
    points = torch.as_tensor(transform.apply_coords(np.array([[[120.0, 90.0], [300.0, 200.0]]]), image.shape[:2]))
    batch = [
        {
            "image": pixels,
            "original_size": image.shape[:2],
            "point_coords": points.float(),
            "point_labels": torch.tensor([[1, 0]]),
        }
    ]
    ours_out = ours(batch, multimask_output=True)[0]
    ref_out = reference(batch, multimask_output=True)[0]
    torch.testing.assert_close(ours_out["low_res_logits"], ref_out["low_res_logits"], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(ours_out["iou_predictions"], ref_out["iou_predictions"], atol=1e-5, rtol=0)
    assert (ours_out["masks"] != ref_out["masks"]).float().mean() <= MAX_MASK_MISMATCH


def test_eager_attention_equals_sdpa(models):
    ours, _ = models
    pixels = torch.rand(1, 3, 1024, 1024) * 4 - 2
    with torch.no_grad():
        fused = ours.image_encoder(pixels)
        ours.image_encoder.set_attention_backend(use_sdpa=False)
        try:
            eager = ours.image_encoder(pixels)
        finally:
            ours.image_encoder.set_attention_backend(use_sdpa=True)
    torch.testing.assert_close(fused, eager, atol=EMBED_ATOL, rtol=0)


def test_float64_predictor_is_exact_against_reference_float32(models):
    """In float64 our result differs from the reference only by the reference's own float32 rounding."""
    ours, reference = models
    image = IMAGES["chelsea_300x451"]
    predictor64 = SamPredictor(make_tiny_sam(seed=3), dtype=torch.float64)
    ref_predictor = ReferencePredictor(reference)
    predictor64.set_image(image)
    ref_predictor.set_image(image)
    assert predictor64.get_image_embedding().dtype == torch.float64
    torch.testing.assert_close(
        predictor64.get_image_embedding().float(), ref_predictor.get_image_embedding(), atol=EMBED_ATOL, rtol=0
    )
    box = np.array([40.0, 30.0, 400.0, 280.0])
    _, iou64, low64 = predictor64.predict(box=box)
    _, ref_iou, ref_low = ref_predictor.predict(box=box)
    assert low64.dtype == np.float32
    np.testing.assert_allclose(low64, ref_low, atol=LOGIT_ATOL)
    np.testing.assert_allclose(iou64, ref_iou, atol=1e-5)


def test_bfloat16_predictor_runs_close_to_float32(models):
    ours, _ = models
    image = IMAGES["chelsea_300x451"]
    fp32 = SamPredictor(ours)
    bf16 = SamPredictor(make_tiny_sam(seed=3), dtype=torch.bfloat16)
    fp32.set_image(image)
    bf16.set_image(image)
    box = np.array([40.0, 30.0, 400.0, 280.0])
    masks32, iou32, _ = fp32.predict(box=box, multimask_output=False)
    masks16, iou16, _ = bf16.predict(box=box, multimask_output=False)
    assert masks16.dtype == bool and iou16.dtype == np.float32
    agreement = (masks32 == masks16).mean()
    assert agreement > 0.97
    np.testing.assert_allclose(iou16, iou32, atol=0.05)


@pytest.mark.parametrize("shape", [(300, 451), (640, 427), (1024, 1024), (1, 2000), (37, 5)])
def test_resize_longest_side_matches_reference(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ours, reference = ResizeLongestSide(1024), ReferenceResize(1024)
    resized = ours.apply_image(image)
    assert max(resized.shape[:2]) == 1024
    np.testing.assert_array_equal(resized, reference.apply_image(image))
    coords = rng.uniform(0, 1, size=(7, 2)) * [shape[1], shape[0]]
    np.testing.assert_allclose(ours.apply_coords(coords, shape), reference.apply_coords(coords, shape))
    boxes = rng.uniform(0, 1, size=(3, 4)) * [shape[1], shape[0], shape[1], shape[0]]
    np.testing.assert_allclose(ours.apply_boxes(boxes, shape), reference.apply_boxes(boxes, shape))
    # The reference's apply_image_torch reads (B, C) as (H, W) in segment-anything 1.0, so the
    # torch path is checked against the numpy (PIL) path instead: same size, near-equal pixels.
    tensor = torch.as_tensor(image).permute(2, 0, 1)[None].float()
    resized_torch = ours.apply_image_torch(tensor)[0].permute(1, 2, 0).numpy()
    assert resized_torch.shape == resized.shape
    if min(shape) > 4:
        assert np.abs(resized_torch - resized.astype(np.float32)).mean() < 3.0
    torch.testing.assert_close(
        ours.apply_coords_torch(torch.as_tensor(coords), shape),
        reference.apply_coords_torch(torch.as_tensor(coords), shape),
    )
    torch.testing.assert_close(
        ours.apply_boxes_torch(torch.as_tensor(boxes), shape),
        reference.apply_boxes_torch(torch.as_tensor(boxes), shape),
    )
    # Hand-computed: the far corner (W, H) lands on the rounded resized size, longest side 1024.
    new_h = int(shape[0] * 1024 / max(shape) + 0.5)
    new_w = int(shape[1] * 1024 / max(shape) + 0.5)
    assert resized.shape[:2] == (new_h, new_w)
    np.testing.assert_allclose(ours.apply_coords(np.array([[shape[1], shape[0]]]), shape)[0], [new_w, new_h])


def test_embedding_is_computed_once_per_image(models):
    ours, _ = models
    predictor = SamPredictor(ours)
    calls = []
    handle = ours.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        predictor.set_image(IMAGES["chelsea_300x451"])
        for box in ([10, 10, 200, 200], [50, 60, 300, 250], [0, 0, 450, 299]):
            predictor.predict(box=np.array(box, dtype=float))
        predictor.predict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_folded_decoder_attention_equals_plain_path(models):
    """Many prompts at once take the folded-projection attention; it must equal the plain one."""
    ours, _ = models
    decoder = ours.mask_decoder
    generator = torch.Generator().manual_seed(4)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    points = torch.rand(16, 1, 2, generator=generator) * 1024
    labels = torch.ones(16, 1, dtype=torch.int)
    attentions = [m for m in decoder.modules() if hasattr(m, "fold_projections")]
    with torch.no_grad():
        sparse, dense = ours.prompt_encoder((points, labels), None, None)
        image_pe = ours.prompt_encoder.get_dense_pe()
        folded = decoder(embedding, image_pe, sparse, dense, multimask_output=True)
        for attention in attentions:
            attention.fold_projections = False
        try:
            plain = decoder(embedding, image_pe, sparse, dense, multimask_output=True)
        finally:
            for attention in attentions:
                attention.fold_projections = True
    torch.testing.assert_close(folded[0], plain[0], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(folded[1], plain[1], atol=1e-5, rtol=0)
    # The batch really differs per prompt, so the comparison is not between copies.
    assert (folded[1][0] - folded[1][1]).abs().max() > 1e-4


def test_decode_is_the_one_decode_path(chelsea_predictors, monkeypatch):
    """`decode` gives the reference's low-res logits without upscaling; `predict_torch`, `predict`
    and the automatic mask generator all go through it."""
    from sam import SamAutomaticMaskGenerator

    ours, reference, image = chelsea_predictors
    coords = ours.transform.apply_coords_torch(torch.tensor([[[100.0, 80.0], [300.0, 200.0]]]), image.shape[:2])
    labels = torch.tensor([[1, 0]])
    low, iou = ours.decode(coords, labels, multimask_output=True)
    _, ref_iou, ref_low = reference.predict_torch(coords, labels, multimask_output=True)
    torch.testing.assert_close(low, ref_low, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=0)

    calls = []
    original = type(ours).decode

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("multimask_output", args[4] if len(args) > 4 else True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(ours), "decode", counting)
    ours.predict(point_coords=np.array([[100, 80]]), point_labels=np.array([1]))
    assert len(calls) == 1
    generator = SamAutomaticMaskGenerator(ours, points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0)
    generator.generate(image)
    assert len(calls) == 2  # 4 points, one batch
    ours.set_image(image)  # the generator replaced the image; restore it for later tests


def test_set_image_batch_and_predict_batch_equal_single_images(models):
    ours, _ = models
    images = [IMAGES["chelsea_300x451"], IMAGES["rocket_portrait_640x427"]]
    batch = SamPredictor(ours)
    batch.set_image_batch(images)
    single = SamPredictor(ours)
    points = [np.array([[100, 80]]), np.array([[200, 300], [50, 60]])]
    labels = [np.array([1]), np.array([1, 0])]
    boxes = [None, np.array([[10, 20, 200, 300], [100, 100, 400, 600]])]
    masks, ious, lows = batch.predict_batch(points, labels, multimask_output=True)
    box_masks, box_ious, _ = batch.predict_batch(box_batch=boxes, multimask_output=False)
    assert box_masks[0].shape == (1, 300, 451) and box_masks[1].shape == (2, 1, 640, 427)
    for index, image in enumerate(images):
        single.set_image(image)
        torch.testing.assert_close(batch._batch[index][0], single.features, atol=EMBED_ATOL, rtol=0)
        single_masks, single_iou, single_low = single.predict(points[index], labels[index])
        np.testing.assert_allclose(ious[index], single_iou, atol=1e-5)
        np.testing.assert_allclose(lows[index], single_low, atol=LOGIT_ATOL)
        assert (masks[index] != single_masks).mean() <= MAX_MASK_MISMATCH
    single.set_image(images[1])
    for row, box in enumerate(boxes[1]):
        single_masks, single_iou, _ = single.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(box_ious[1][row], single_iou, atol=1e-5)
        assert (box_masks[1][row] != single_masks).mean() <= MAX_MASK_MISMATCH
    with pytest.raises(ValueError, match="2 images are set"):
        batch.predict_batch([points[0]], [labels[0]])
    with pytest.raises(ValueError, match="non-empty list"):
        batch.set_image_batch([])
    with pytest.raises(ValueError, match="predict_batch"):
        SamPredictor(ours).predict_batch([points[0]], [labels[0]])
