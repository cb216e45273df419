"""SAM 2.1 image path parity with Meta's `sam2` package on identical random weights, real photos.

Ours: `ResizeSquare.to_input_tensor` + `Sam2.encode_image`, then `Sam2.decode` and
`Sam2.postprocess_masks`. Reference: `SAM2ImagePredictor.set_image` and `_predict`, whose
mask-decoder outputs are captured before the predictor clamps them.
Tolerances as for SAM 1: features 1e-4, logits 2e-4, IoU 1e-5, <= 1e-4 of mask pixels differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2_factory import TINY_WIDTH, build_reference_sam2, make_tiny_sam2
from sam_factory import randomize_parameters, real_photo

from sam.transforms import ResizeSquare, transform_for

FEATURE_TOL, LOGIT_TOL, IOU_TOL, MASK_FRACTION_TOL = 1e-4, 2e-4, 1e-5, 1e-4


class Pair:
    """Our model and the reference predictor with the same weights; photos are embedded once by
    each and cached."""

    def __init__(self, layout: str) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.ours = make_tiny_sam2(layout, seed=3)
        self.reference_model = build_reference_sam2(self.ours.version, layout, TINY_WIDTH)
        self.reference_init = {k: v.clone() for k, v in self.reference_model.state_dict().items()}
        self.reference_model.load_state_dict(self.ours.state_dict(), strict=True)
        self.reference_model.eval()
        self.reference = SAM2ImagePredictor(self.reference_model)
        self.transform = transform_for(self.ours)
        self.captured: dict = {}
        self.reference_model.sam_mask_decoder.register_forward_hook(self._capture)
        self.photos: dict = {}

    def _capture(self, module, inputs, outputs) -> None:
        self.captured["low_res"], self.captured["iou"], _, self.captured["object_score"] = outputs

    def set_photo(self, name: str) -> None:
        if name not in self.photos:
            image = real_photo(name)
            self.reference.set_image(image)
            with torch.inference_mode():
                features = self.ours.encode_image(self.transform.to_input_tensor(image))
            self.photos[name] = (image, features, self.reference._features, self.reference._orig_hw)
        self.image, self.features, reference_features, orig_hw = self.photos[name]
        self.reference._features, self.reference._orig_hw = reference_features, orig_hw
        self.reference._is_image_set, self.reference._is_batch = True, False

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[:2]

    def ours_predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask=True):
        """Prompts in original-image pixels, batched: points (B, N, 2), labels (B, N), boxes (B, 4)."""
        size = self.size
        prompt_points = None
        if points is not None:
            coords = self.transform.apply_coords_torch(torch.as_tensor(points, dtype=torch.float32), size)
            prompt_points = (coords, torch.as_tensor(labels, dtype=torch.int))
        prompt_boxes = None
        if boxes is not None:
            prompt_boxes = self.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32), size)
        with torch.inference_mode():
            low_res, iou, object_score = self.ours.decode(
                self.features, prompt_points, prompt_boxes, mask_input, multimask
            )
            masks = self.ours.postprocess_masks(low_res, (1024, 1024), size)
        return low_res, iou, object_score, masks

    def reference_predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask=True):
        coords = point_labels = box = None
        transforms = self.reference._transforms
        if points is not None:
            coords = transforms.transform_coords(torch.as_tensor(points, dtype=torch.float32), True, self.size)
            point_labels = torch.as_tensor(labels, dtype=torch.int)
        if boxes is not None:
            box = transforms.transform_boxes(torch.as_tensor(boxes, dtype=torch.float32), True, self.size)
        masks, iou, _ = self.reference._predict(coords, point_labels, box, mask_input, multimask, return_logits=False)
        captured = self.captured
        return captured["low_res"], captured["iou"], captured["object_score"], masks


@pytest.fixture(scope="module")
def tiny_pair() -> Pair:
    return Pair("tiny")


def assert_features_close(pair: Pair) -> None:
    reference = pair.reference._features
    embed_difference = (pair.features["image_embed"] - reference["image_embed"]).abs().max().item()
    assert embed_difference <= FEATURE_TOL, embed_difference
    for ours, theirs in zip(pair.features["high_res_feats"], reference["high_res_feats"], strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= FEATURE_TOL
    # The features are not trivially small: the comparison means something.
    assert reference["image_embed"].abs().mean() > 0.1


def assert_outputs_close(ours, reference) -> None:
    low_res, iou, object_score, masks = ours
    ref_low_res, ref_iou, ref_object_score, ref_masks = reference
    assert low_res.shape == ref_low_res.shape and iou.shape == ref_iou.shape
    assert (low_res - ref_low_res).abs().max().item() <= LOGIT_TOL
    assert (iou - ref_iou).abs().max().item() <= IOU_TOL
    assert (object_score - ref_object_score).abs().max().item() <= LOGIT_TOL
    assert masks.shape == ref_masks.shape
    differing = ((masks > 0) != ref_masks).float().mean().item()
    assert differing <= MASK_FRACTION_TOL, differing
    # Random weights still give masks with both classes, so thresholding is really compared.
    assert 0 < ref_masks.float().mean() < 1


@pytest.mark.parametrize("photo", ["chelsea", "rocket"])
def test_image_features_match_reference(tiny_pair, photo):
    tiny_pair.set_photo(photo)
    assert_features_close(tiny_pair)


PROMPTS = {
    # (points (B, N, 2), labels (B, N), boxes (B, 4)) in original-image pixels (chelsea: 451x300).
    "points": ([[[220.0, 150.0], [100.0, 200.0]]], [[1, 0]], None),
    "box": (None, None, [[50.0, 20.0, 420.0, 290.0]]),
    "box_and_points": ([[[220.0, 150.0]]], [[1]], [[50.0, 20.0, 420.0, 290.0]]),
    "batched_points": (
        [[[220.0, 150.0], [10.0, 10.0]], [[60.0, 250.0], [300.0, 100.0]], [[400.0, 40.0], [5.0, 290.0]]],
        [[1, 0], [1, 1], [1, -1]],
        None,
    ),
    "batched_boxes": (None, None, [[50.0, 20.0, 420.0, 290.0], [0.0, 0.0, 200.0, 150.0], [300.0, 100.0, 450.0, 299.0]]),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_decode_matches_reference(tiny_pair, kind, multimask):
    tiny_pair.set_photo("chelsea")
    points, labels, boxes = PROMPTS[kind]
    ours = tiny_pair.ours_predict(points, labels, boxes, multimask=multimask)
    reference = tiny_pair.reference_predict(points, labels, boxes, multimask=multimask)
    assert_outputs_close(ours, reference)
    assert ours[0].shape[1] == (3 if multimask else 1)


def test_mask_input_and_batched_mixed_prompts_on_a_non_square_photo(tiny_pair):
    tiny_pair.set_photo("rocket")  # 640x427
    points, labels = [[[300.0, 200.0]], [[100.0, 400.0]]], [[1], [1]]
    boxes = [[200.0, 100.0, 500.0, 400.0], [20.0, 300.0, 250.0, 420.0]]
    first = tiny_pair.ours_predict(points, labels, boxes, multimask=True)
    # Feed the best previous mask back as a dense prompt (B, 1, 256, 256), batched with points.
    best = first[1].argmax(dim=1)
    mask_input = first[0][torch.arange(2), best][:, None].clone()
    for multimask in (True, False):
        ours = tiny_pair.ours_predict(points, labels, boxes, mask_input=mask_input, multimask=multimask)
        reference = tiny_pair.reference_predict(points, labels, boxes, mask_input=mask_input, multimask=multimask)
        assert_outputs_close(ours, reference)
    # A mask prompt alone (no points, no box): a single prompt set, as the reference allows.
    ours = tiny_pair.ours_predict(mask_input=mask_input[:1], multimask=True)
    reference = tiny_pair.reference_predict(mask_input=mask_input[:1], multimask=True)
    assert_outputs_close(ours, reference)


def test_large_layout_features_and_decode_match_reference():
    """Hiera-large block layout: 2 heads, windows (8, 4, 16, 8) (no padding), global blocks
    23/33/43 in a 36-block stage: other pooling, window and head code paths than tiny."""
    pair = Pair("large")
    pair.set_photo("coffee")  # 600x400
    assert_features_close(pair)
    prompts = ([[[300.0, 200.0]], [[50.0, 50.0]]], [[1], [0]], [[100.0, 50.0, 500.0, 380.0], [0.0, 0.0, 300.0, 200.0]])
    ours = pair.ours_predict(*prompts, multimask=False)
    assert_outputs_close(ours, pair.reference_predict(*prompts, multimask=False))


def test_eager_full_image_encoder_matches_reference(tiny_pair):
    """The plain eager trunk (no fused kernels) and the full image encoder (all FPN levels with
    their sine position encodings, as video uses it) match the reference's image encoder."""
    tiny_pair.set_photo("chelsea")
    ours = tiny_pair.ours
    pixels = ours.preprocess(tiny_pair.transform.to_input_tensor(tiny_pair.image))
    try:
        ours.set_fused_kernels(False)
        with torch.inference_mode():
            full = ours.image_encoder(pixels)
    finally:
        ours.set_fused_kernels(True)
    with torch.inference_mode():
        reference_full = tiny_pair.reference_model.image_encoder(pixels)
    assert len(full["backbone_fpn"]) == len(reference_full["backbone_fpn"]) == 3
    for key in ("backbone_fpn", "vision_pos_enc"):
        for mine, theirs in zip(full[key], reference_full[key], strict=True):
            assert mine.shape == theirs.shape
            assert (mine - theirs).abs().max().item() <= FEATURE_TOL, key
    assert (full["vision_features"] - reference_full["vision_features"]).abs().max().item() <= FEATURE_TOL
    # The single-image features are the stride-16 map plus no_mem_embed.
    expected = full["vision_features"] + ours.no_mem_embed.view(1, -1, 1, 1)
    assert (tiny_pair.features["image_embed"] - expected).abs().max().item() <= FEATURE_TOL


def test_resize_square_matches_reference_transform():
    from sam2.utils.transforms import SAM2Transforms

    reference = SAM2Transforms(1024, 0.0)
    transform = ResizeSquare(1024)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for name in ("chelsea", "coffee"):
        image = real_photo(name)
        pixels = transform.to_input_tensor(image)
        assert pixels.shape == (1, 3, 1024, 1024) and pixels.dtype == torch.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0
        assert torch.allclose((pixels[0] - mean) / std, reference(image), atol=1e-6)
        points = torch.tensor([[0.0, 0.0], [17.5, 123.25], [image.shape[1], image.shape[0]]])
        expected = reference.transform_coords(points, normalize=True, orig_hw=image.shape[:2])
        assert torch.equal(transform.apply_coords_torch(points, image.shape[:2]), expected)
        np.testing.assert_allclose(transform.apply_coords(points.numpy(), image.shape[:2]), expected.numpy(), rtol=1e-6)
        boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0]])
        assert torch.equal(
            transform.apply_boxes_torch(boxes, image.shape[:2]),
            reference.transform_boxes(boxes, normalize=True, orig_hw=image.shape[:2]).reshape(-1, 4),
        )
    assert transform.get_preprocess_shape(300, 451, 1024) == (1024, 1024)
    # An image already at 1024x1024 passes unchanged, as torchvision's Resize leaves it.
    square = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    assert torch.equal(transform.to_input_tensor(square)[0], torch.from_numpy(square).permute(2, 0, 1).float() / 255)


def test_dynamic_multimask_selection_takes_both_branches_like_the_reference(tiny_pair):
    """Asked for one mask, the decoder keeps the single-mask output where it is stable and
    otherwise takes the multimask output with the best predicted IoU."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 32, 32, generator=generator)
    logits[0, 0] = torch.where(logits[0, 0] > 0, 5.0, -5.0)  # stable single mask
    logits[1, 0] = 0.01 * torch.randn(32, 32, generator=generator)  # unstable around 0
    iou = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.1, 0.2, 0.3, 0.8]])
    ours = tiny_pair.ours.sam_mask_decoder.dynamic_multimask_via_stability_select(logits, iou)
    reference = tiny_pair.reference_model.sam_mask_decoder._dynamic_multimask_via_stability(logits, iou)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    assert torch.equal(ours[0][0, 0], logits[0, 0]) and ours[1][0, 0] == 0.1
    assert torch.equal(ours[0][1, 0], logits[1, 3]) and ours[1][1, 0] == 0.8


def test_memory_modules_match_reference(tiny_pair):
    """Memory attention (RoPE self- and cross-attention, object-pointer tokens left unrotated)
    and the memory encoder, on a 16x16 grid, against the reference modules with our weights."""
    ours, reference = tiny_pair.ours, tiny_pair.reference_model
    generator = torch.Generator().manual_seed(1)
    batch, side, frames, pointers = 2, 16, 2, 4
    tokens = side * side
    curr = torch.randn(batch, tokens, 256, generator=generator)
    curr_pos = torch.randn(batch, tokens, 256, generator=generator)
    memory = torch.randn(batch, frames * tokens + pointers, 64, generator=generator)
    memory_pos = torch.randn(batch, frames * tokens + pointers, 64, generator=generator)
    with torch.inference_mode():
        mine = ours.memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=pointers)
        theirs = reference.memory_attention(
            curr.transpose(0, 1), memory.transpose(0, 1), curr_pos.transpose(0, 1), memory_pos.transpose(0, 1),
            num_obj_ptr_tokens=pointers,
        ).transpose(0, 1)
    assert (mine - theirs).abs().max().item() <= LOGIT_TOL
    assert theirs.abs().mean() > 0.1

    pix_feat = torch.randn(batch, 256, side, side, generator=generator)
    masks = 5 * torch.randn(batch, 1, 16 * side, 16 * side, generator=generator)
    with torch.inference_mode():
        features, position = ours.memory_encoder(pix_feat, masks)
        reference_out = reference.memory_encoder(pix_feat, masks)
    assert features.shape == (batch, 64, side, side)
    assert (features - reference_out["vision_features"]).abs().max().item() <= LOGIT_TOL
    assert torch.allclose(position, reference_out["vision_pos_enc"][0], atol=1e-6)


def test_encode_and_decode_reject_bad_shapes(tiny_pair):
    ours = tiny_pair.ours
    with pytest.raises(ValueError, match=r"\(B, 3, 1024, 1024\)"):
        ours.encode_image(torch.zeros(1, 3, 512, 512))
    with pytest.raises(ValueError, match="batch 1"):
        features = {"image_embed": torch.zeros(2, 256, 64, 64), "high_res_feats": []}
        ours.decode(features, None, torch.zeros(1, 4), None, True)


def test_random_init_is_not_what_is_compared(tiny_pair):
    """Guards the factory: every parameter differs from the reference's own initialisation
    (zeros for position embeddings and memory tokens would hide bugs)."""
    ours = tiny_pair.ours.state_dict()
    for name, value in tiny_pair.reference_init.items():
        if not name.endswith("positional_encoding_gaussian_matrix"):
            assert not torch.equal(ours[name], value), name
    assert tiny_pair.ours.image_encoder.trunk.pos_embed.abs().min() > 0


def test_position_embedding_cache_follows_parameter_changes():
    """The interpolated position embedding is computed once, and again whenever the parameters
    change (in-place update, load); with gradients it is never cached."""
    import torch.nn.functional as F

    trunk = make_tiny_sam2("tiny", seed=5).image_encoder.trunk

    def fresh() -> torch.Tensor:
        background = F.interpolate(trunk.pos_embed, size=(64, 64), mode="bicubic")
        return (background + trunk.pos_embed_window.tile(1, 1, 8, 8)).permute(0, 2, 3, 1)

    with torch.no_grad():
        first = trunk.position_embedding(64, 64)
        assert trunk.position_embedding(64, 64) is first
        assert torch.equal(first, fresh())
        trunk.pos_embed_window.add_(torch.randn_like(trunk.pos_embed_window))
        second = trunk.position_embedding(64, 64)
        assert not torch.equal(second, first) and torch.equal(second, fresh())
        trunk.load_state_dict(make_tiny_sam2("tiny", seed=6).image_encoder.trunk.state_dict())
        assert torch.equal(trunk.position_embedding(64, 64), fresh())
    with_grad = trunk.position_embedding(64, 64)
    assert with_grad.requires_grad and with_grad is not trunk.position_embedding(64, 64)


@pytest.mark.parametrize("q_stride", [None, (2, 2)])
def test_banded_blocks_and_chunked_mlp_match_the_eager_path(monkeypatch, q_stride):
    """At one-thread inference a windowed block on a large grid runs one band of window rows
    at a time, and an MLP on a large unbanded grid in token chunks: both match the plain eager
    path. With more threads both run whole."""
    from sam.sam2.hiera import GeluMLP, MultiScaleBlock

    torch.manual_seed(0)
    block = randomize_parameters(MultiScaleBlock(16, 32, 2, q_stride=q_stride, window_size=8), seed=1).eval()
    mlp = block.mlp
    monkeypatch.setattr(MultiScaleBlock, "band_tokens", 100)
    monkeypatch.setattr(GeluMLP, "chunk_tokens", 7)
    bands, chunks = [], []

    def one_band(band: torch.Tensor) -> torch.Tensor:
        bands.append(tuple(band.shape))
        return MultiScaleBlock._forward(block, band)

    def chunked(*args) -> torch.Tensor:
        chunks.append(args)
        return GeluMLP._forward_chunked(mlp, *args)

    monkeypatch.setattr(block, "_forward", one_band)
    monkeypatch.setattr(mlp, "_forward_chunked", chunked)
    x = torch.randn(2, 40, 24, 16)
    tokens, residual = torch.randn(3, 20, 32), torch.randn(3, 20, 32)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            block.fused = False
            expected = block(x)
            expected_mlp = mlp(tokens, residual=residual, fused=False)
            block.fused = True
            torch.set_num_threads(1)
            banded = block(x)  # 2 * 40 * 24 tokens: 5 bands of one window row
            assert bands[-5:] == [(2, 8, 24, 16)] * 5
            chunks.clear()
            chunked_mlp = mlp(tokens, residual=residual)
            assert chunks
            torch.set_num_threads(2)
            bands.clear()
            chunks.clear()
            whole, whole_mlp = block(x), mlp(tokens, residual=residual)
            assert bands == [(2, 40, 24, 16)] and not chunks
    finally:
        torch.set_num_threads(threads)
    stride = 2 if q_stride else 1
    assert banded.shape == expected.shape == (2, 40 // stride, 24 // stride, 32)
    for result in (banded, whole):
        assert (result - expected).abs().max().item() <= 1e-5
    for result in (chunked_mlp, whole_mlp):
        assert (result - expected_mlp).abs().max().item() <= 1e-5
