"""SAM 3 image model (sam.sam3) against transformers' Sam3Model on the same tiny random weights.

Checkpoint-exact means Meta's behaviour. Where transformers differs, the reference side is steered to
Meta's: a text-only prompt gets one padded box (label -10), so transformers runs the geometry encoder
and its cls token joins the prompt as in Meta's `Sam3Image`; masks are binarised Meta's way (resize
the logits, then cut at 0) on both sides.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam3_factory import save_tiny_sam3
from skimage import data

from sam.build import CheckpointError
from sam.sam3 import Sam3Config, Sam3Image, Sam3Predictor, load_sam3
from sam.sam3.build import config_from_meta_weights, from_transformers, meta_checkpoint, to_transformers
from sam.sam3.layers import box_cxcywh_to_xyxy
from sam.sam3.text import tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def reference(checkpoints):
    from transformers import Sam3Model

    return Sam3Model.from_pretrained(checkpoints["transformers"]).eval()


@pytest.fixture(scope="module")
def ours(checkpoints):
    return load_sam3(checkpoints["transformers"])


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()  # 512 x 512 RGB


@pytest.fixture(scope="module")
def predictor(ours, photo):
    predictor = Sam3Predictor(ours)
    predictor.set_image(photo)
    return predictor


@pytest.fixture(scope="module")
def pixels(predictor, photo):
    return predictor.preprocess(photo)


def _reference(reference, pixels, text, boxes=None, labels=None):
    ids = tokenize([text])
    if boxes is None:  # Meta's text-only path: geometry encoder on nothing but its cls token
        boxes, labels = torch.zeros(1, 1, 4), torch.full((1, 1), -10)
    with torch.no_grad():
        return reference(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(),
                         input_boxes=boxes, input_boxes_labels=labels)


def _ours(model, pixels, text, boxes=None, labels=None):
    with torch.no_grad():
        return model.decode(model.encode_image(pixels), *model.encode_text(tokenize([text])), boxes, labels)


def _meta_masks(logits, size):
    return (F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0] > 0).numpy()


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _assert_nontrivial(scores, masks):
    """Random weights must not give a reference where every score is equal or every mask empty/full."""
    assert scores.max() - scores.min() > 0.1, scores
    fill = masks.mean(axis=(-2, -1))
    assert (fill > 0.05).all() and (fill < 0.95).all(), fill


def _assert_matches(out, ref):
    ref_scores = (ref.pred_logits.sigmoid() * ref.presence_logits.sigmoid()).numpy()
    scores = (out["logits"].sigmoid() * out["presence"].sigmoid()[:, None]).numpy()
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    np.testing.assert_allclose(out["presence"].numpy(), ref.presence_logits[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(box_cxcywh_to_xyxy(out["boxes"]).numpy(), ref.pred_boxes.numpy(), atol=1e-4)
    ours_masks, ref_masks = _meta_masks(out["masks"][0], (256, 256)), _meta_masks(ref.pred_masks[0], (256, 256))
    _assert_nontrivial(ref_scores[0], ref_masks)
    assert min(_iou(a, b) for a, b in zip(ours_masks, ref_masks)) >= 0.99


def test_backbone_and_text_match_transformers(reference, ours, pixels):
    with torch.no_grad():
        ref = reference.get_vision_features(pixels)
        image = ours.encode_image(pixels)
        ids = tokenize(["a dog"])
        ref_text = reference.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        text, valid = ours.encode_text(ids)
    assert len(image.feats) == 3  # the 0.5x level is dropped, as in Meta's image model
    for level, (a, b) in enumerate(zip(image.feats, ref.fpn_hidden_states)):
        assert a.shape == b.shape and a.std() > 0.1
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"FPN level {level}")
    for a, b in zip(image.pos, ref.fpn_position_encoding):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert valid.sum() == 4  # start, "a", "dog", end
    torch.testing.assert_close(text[valid], ref_text[valid], atol=1e-5, rtol=1e-5)


def test_text_prompt_matches_meta_behaviour(reference, ours, pixels):
    for text in ("a dog", "the astronaut's helmet"):
        _assert_matches(_ours(ours, pixels, text), _reference(reference, pixels, text))


def test_transformers_text_only_path_differs(reference, ours, pixels):
    """The trap this package follows Meta on: without a box, transformers skips the geometry encoder."""
    ids = tokenize(["a dog"])
    with torch.no_grad():
        plain = reference(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long())
    assert (plain.pred_logits - _ours(ours, pixels, "a dog")["logits"]).abs().max() > 1e-3


def test_exemplar_prompts_match(reference, ours, pixels):
    boxes = torch.tensor([[[0.45, 0.3, 0.3, 0.35], [0.7, 0.75, 0.2, 0.3]]])  # cxcywh, normalised
    labels = torch.tensor([[1, 0]])
    _assert_matches(_ours(ours, pixels, "a face", boxes, labels), _reference(reference, pixels, "a face", boxes, labels))
    _assert_matches(_ours(ours, pixels, "visual", boxes[:, :1], labels[:, :1]),
                    _reference(reference, pixels, "visual", boxes[:, :1], labels[:, :1]))


def test_both_layouts_load_identically(checkpoints, ours, pixels):
    meta = load_sam3(checkpoints["meta"])
    assert meta.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, meta.state_dict()[key]), key
    a, b = _ours(ours, pixels, "a dog"), _ours(meta, pixels, "a dog")
    assert all(torch.equal(a[k], b[k]) for k in a)
    hf = checkpoints["model"].state_dict()
    back = to_transformers(from_transformers(hf, ours))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_sizes_read_off_meta_weights(checkpoints, ours):
    """Without a config.json, every size comes from the weights; only head counts leave no trace
    outside the ViT (the released model's 64 channels per text head, 32 per detector head)."""
    with torch.device("meta"):
        full = Sam3Image(Sam3Config())
    state = {k[len("detector."):]: v for k, v in meta_checkpoint(full)["model"].items()}
    assert config_from_meta_weights(state) == Sam3Config()
    tiny = torch.load(checkpoints["meta"], weights_only=True)["model"]
    inferred = config_from_meta_weights({k[len("detector."):]: v for k, v in tiny.items() if k.startswith("detector.")})
    expected = dataclasses.replace(ours.config, point_projections=False, text_heads=1, num_heads=1)
    assert inferred == expected


def test_predictor_matches_reference_at_image_size(reference, predictor, pixels, photo):
    ref = _reference(reference, pixels, "a dog")
    ref_scores = (ref.pred_logits.sigmoid() * ref.presence_logits.sigmoid())[0].numpy()
    threshold = float(np.median(ref_scores))  # half the queries pass: the cut is not trivially all/none
    keep = ref_scores > threshold
    result = predictor.predict(text="a dog", threshold=threshold)
    assert len(result) == keep.sum() > 0 and result.labels == ["a dog"] * len(result)
    assert result.masks.shape == (len(result), *photo.shape[:2]) and result.masks.dtype == bool
    np.testing.assert_allclose(result.scores, ref_scores[keep], atol=1e-4)
    np.testing.assert_allclose(result.boxes, ref.pred_boxes[0][keep].numpy() * 512, atol=0.05)
    ref_masks = _meta_masks(ref.pred_masks[0][keep], photo.shape[:2])
    assert min(_iou(a, b) for a, b in zip(result.masks, ref_masks)) >= 0.99


def test_second_query_reuses_image_and_text(ours, photo):
    predictor = Sam3Predictor(ours)
    calls = []
    encode_text = ours.encode_text
    predictor.model.encode_text = lambda ids: calls.append(ids) or encode_text(ids)
    try:
        predictor.set_image(photo)
        first = predictor.predict(text="a dog", threshold=0.0)
        predictor.predict(text="a cat", threshold=0.0)
        again = predictor.predict(text="a dog", threshold=0.0)
    finally:
        del predictor.model.encode_text
    assert predictor.image_passes == 1 and len(calls) == 2
    np.testing.assert_array_equal(first.scores, again.scores)


def test_batched_queries_match_one_by_one(predictor):
    texts = ["a dog", "the astronaut's helmet", "a red flag"]
    batched = predictor.predict_many(texts, threshold=0.1)
    for text, result in zip(texts, batched):
        single = predictor.predict(text=text, threshold=0.1)
        assert result.labels == single.labels and len(single) > 0
        np.testing.assert_allclose(result.scores, single.scores, atol=1e-5)
        np.testing.assert_allclose(result.boxes, single.boxes, atol=1e-3)
        assert (result.masks != single.masks).mean() < 1e-3


def test_exemplar_boxes_in_pixels_match_reference(reference, predictor, pixels):
    """The predictor's exemplars are xyxy pixels; the model gets them as normalised cxcywh."""
    box = [128.0, 64.0, 384.0, 256.0]
    result = predictor.predict(text="a face", exemplars=[(box, True)], threshold=0.0)
    ref = _reference(reference, pixels, "a face", torch.tensor([[[0.5, 0.3125, 0.5, 0.375]]]), torch.tensor([[1]]))
    ref_scores = (ref.pred_logits.sigmoid() * ref.presence_logits.sigmoid())[0].numpy()
    np.testing.assert_allclose(np.sort(result.scores), np.sort(ref_scores), atol=1e-4)


def test_bad_inputs_get_clear_errors(ours, predictor, photo, checkpoints, tiny_sam_checkpoint, tmp_path):
    with pytest.raises(RuntimeError, match="set_image"):
        Sam3Predictor(ours).predict(text="a dog")
    for text in ("", "   "):
        with pytest.raises(ValueError, match="non-empty"):
            predictor.predict(text=text)
    with pytest.raises(ValueError, match="text query, exemplar boxes, or both"):
        predictor.predict()
    for box in ([10, 10, 600, 100], [-5, 0, 50, 50], [50, 50, 50, 80]):
        with pytest.raises(ValueError, match="inside the 512x512 image"):
            predictor.predict(text="a dog", exemplars=[(box, True)])
    with pytest.raises(ValueError, match="exemplar is"):
        predictor.predict(exemplars=[[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="channels"):
        Sam3Predictor(ours).set_image(photo[..., :2])
    with pytest.raises(ValueError, match="non-empty"):
        predictor.predict_many(["a dog", ""])
    with pytest.raises(CheckpointError, match="looks like a SAM 1 checkpoint"):
        load_sam3(tiny_sam_checkpoint)
    stray = torch.load(checkpoints["meta"], weights_only=True)
    stray["model"]["optimizer.step"] = torch.zeros(1)
    torch.save(stray, tmp_path / "stray.pt")
    with pytest.raises(CheckpointError, match="unexpected keys outside 'detector.'"):
        load_sam3(tmp_path / "stray.pt")
    del stray["model"]["optimizer.step"], stray["model"]["detector.transformer.decoder.norm.bias"]
    torch.save(stray, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="does not fit a SAM 3 image model"):
        load_sam3(tmp_path / "missing.pt")
    (tmp_path / "model.safetensors").write_bytes((checkpoints["transformers"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no config.json"):
        load_sam3(tmp_path)


def test_pixel_decoder_split_matches_the_direct_order():
    """conv(skip + up(x)) computed as a cached conv(skip) plus the upsampled conv at x's resolution
    (heads.upsampled_conv) gives Meta's values; on a non-square map, with the bias and the norm."""
    from sam.sam3.heads import PixelDecoder, upsampled_conv

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 7, generator=generator)
    weight = torch.randn(8, 16, 3, 3, generator=generator)
    direct = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    torch.testing.assert_close(upsampled_conv(x, weight), direct, atol=1e-5, rtol=1e-5)
    decoder = PixelDecoder(16, 3).eval()
    with torch.no_grad():
        for conv in decoder.conv_layers:
            conv.bias.normal_(generator=generator)
        feats = [torch.randn(1, 16, 20, 28, generator=generator), torch.randn(1, 16, 10, 14, generator=generator), x[:1]]
        expected = feats[-1]
        for conv, norm, skip in zip(decoder.conv_layers, decoder.norms, reversed(feats[:-1])):
            expected = F.relu(norm(conv(skip + F.interpolate(expected, size=skip.shape[-2:], mode="nearest"))))
        torch.testing.assert_close(decoder(feats), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoder(feats, decoder.skip_terms(feats)), expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.1


def test_cached_skip_terms_change_nothing(ours, predictor, pixels):
    """Sam3Predictor reuses the image's pixel-decoder half across queries: decode with and without it agree."""
    ids = tokenize(["a dog"])
    with torch.no_grad():
        image = ours.encode_image(pixels)
        text, valid = ours.encode_text(ids)
        plain = ours.decode(image, text, valid)
        cached = ours.decode(image, text, valid, skip_terms=ours.pixel_skip_terms(image))
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], atol=1e-5, rtol=1e-5)
    predictor.predict(text="a cat")
    assert [t.shape[-2:] for t in predictor._image_terms.skip_terms] == [f.shape[-2:] for f in image.feats[-2::-1]]


def test_cached_image_terms_change_nothing(ours, pixels):
    """decode's prompt-free parts (pixel-decoder halves, the DETR encoder's first self-attention, the
    exemplar encoder without boxes) computed once per image give the same outputs as computing them
    per prompt: text alone, a batch of two texts, and text with an exemplar box (the box path
    ignores the cached exemplar tokens)."""
    ids = tokenize(["a dog", "the astronaut's helmet"])
    boxes = torch.tensor([[[0.5, 0.3125, 0.5, 0.375]]])
    with torch.no_grad():
        image = ours.encode_image(pixels)
        terms = ours.image_terms(image)
        text, valid = ours.encode_text(ids)
        for args in ((text[:1], valid[:1]), (text, valid), (text[:1], valid[:1], boxes, torch.ones(1, 1, dtype=torch.long))):
            plain = ours.decode(image, *args)
            cached = ours.decode(image, *args, image_terms=terms)
            # A batch of two rounds its products differently; and without the cache the pixel decoder
            # runs Meta's direct order (conv over the upsampled sum), with it the split one
            # (conv(skip) cached + conv(upsampled)): masks 4e-6 apart (measured), the rest 1e-6.
            for key in plain:
                tolerance = 1e-6 if len(args[0]) == 1 and key != "masks" else 1e-5
                torch.testing.assert_close(cached[key], plain[key], atol=tolerance, rtol=tolerance)
    assert terms.first_self.shape == (1, image.feats[-1][0, 0].numel(), ours.config.d_model)
    assert terms.no_box_prompt[0].shape == (1, 1, ours.config.d_model)
    assert terms.first_bias.shape == (1, ours.config.num_heads, 1 + ours.config.num_queries, terms.first_self.shape[1])


def test_further_query_runs_no_image_only_pass(ours, photo):
    """After the first query on an image, a new query runs neither the image encoder nor any of
    decode's prompt-free parts again (they come from the per-image cache)."""
    predictor = Sam3Predictor(ours)
    counts = {"image_terms": 0, "encoder_first_self": 0, "geometry": 0, "skip_terms": 0, "first_bias": 0}
    originals = {
        "image_terms": ours.image_terms, "encoder_first_self": ours.transformer.encoder.image_terms,
        "geometry": ours.geometry_encoder.forward, "skip_terms": ours.segmentation_head.pixel_decoder.skip_terms,
        "first_bias": ours.transformer.decoder.first_bias,
    }

    def counted(name):
        return lambda *args, **kwargs: counts.__setitem__(name, counts[name] + 1) or originals[name](*args, **kwargs)

    ours.image_terms = counted("image_terms")
    ours.transformer.encoder.image_terms = counted("encoder_first_self")
    ours.geometry_encoder.forward = counted("geometry")
    ours.segmentation_head.pixel_decoder.skip_terms = counted("skip_terms")
    ours.transformer.decoder.first_bias = counted("first_bias")
    try:
        predictor.set_image(photo)
        predictor.predict(text="a dog")
        first = dict(counts)
        predictor.predict(text="a cat")
        predictor.predict_many(["a bird", "a flag"])
        after = dict(counts)
        predictor.predict(text="a face", exemplars=[([128.0, 64.0, 384.0, 256.0], True)])
        with_box = counts["geometry"]
    finally:
        del ours.image_terms, ours.transformer.encoder.image_terms, ours.geometry_encoder.forward
        del ours.segmentation_head.pixel_decoder.skip_terms, ours.transformer.decoder.first_bias
    assert first == {"image_terms": 1, "encoder_first_self": 1, "geometry": 1, "skip_terms": 1, "first_bias": 1}
    assert after == first and predictor.image_passes == 1
    assert with_box == 2  # exemplar boxes are a prompt: the exemplar encoder runs for them


@pytest.mark.parametrize("grid", [6, 9, 12])
def test_windowed_attention_matches_partitioned_map(grid):
    """RopeAttention(x, window) cuts the windows out of qkv instead of partitioning the token map:
    the same values as partition -> attention -> unpartition (Meta's order), with and without the
    zero padding up to a multiple of the window (9 on windows of 6 pads to 12)."""
    from sam.sam3.backbone import RopeAttention, window_partition, window_unpartition

    torch.manual_seed(grid)
    attention = RopeAttention(32, 2, 6, 1.0, 10000.0).eval()
    with torch.no_grad():
        attention.qkv.bias.normal_()  # padded tokens project to the bias: they must stay keys as in Meta's order
        x = torch.randn(2, grid, grid, 32)
        windows, padded = window_partition(x, 6)
        expected = window_unpartition(attention(windows), 6, padded, (grid, grid))
        out = attention(x, 6)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert expected.std() > 0.1


def test_loading_assigns_the_checkpoint_without_a_random_copy(checkpoints, ours, tmp_path):
    """load_sam3 builds the model with its parameters on the meta device and assigns the file's
    tensors: a float16 file gives float32 parameters equal to its values, all real (none left on
    meta, none randomly initialised) and 64-byte aligned; the computed RoPE buffers stay real."""
    from sam.checkpoint import meta_parameters

    with meta_parameters():
        empty = Sam3Image(ours.config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in empty.buffers())
    state = torch.load(checkpoints["meta"], weights_only=True)
    half = {"model": {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}}
    torch.save(half, tmp_path / "sam3_half.pt")
    shutil.copy(checkpoints["meta"].parent / "config.json", tmp_path / "config.json")  # the tiny sizes
    loaded = load_sam3(tmp_path / "sam3_half.pt")
    for key, value in loaded.state_dict().items():
        assert value.device.type == "cpu" and value.data_ptr() % 64 == 0, key
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, half["model"]["detector." + key].float(), atol=0, rtol=0)
    for (name, buffer), (_, expected) in zip(loaded.named_buffers(), ours.named_buffers()):
        assert torch.equal(buffer, expected), name


def test_mask_head_folds_the_instance_conv():
    """SegmentationHead folds the 1x1 instance_seg_head into the query embeddings: the same mask
    logits as Meta's order (conv over the pixels, then the dot product with each embedding)."""
    from sam.sam3.heads import SegmentationHead

    generator = torch.Generator().manual_seed(0)
    head = SegmentationHead(16, 2).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(generator=generator).mul_(0.3)
        feats = [torch.randn(2, 16, 20, 28, generator=generator), torch.randn(2, 16, 10, 14, generator=generator),
                 torch.randn(2, 16, 5, 7, generator=generator)]
        queries, prompt = torch.randn(2, 4, 16, generator=generator), torch.randn(2, 3, 16, generator=generator)
        valid = torch.tensor([[True, True, False], [True, True, True]])
        masks = head(queries, feats, feats[-1].flatten(2).transpose(1, 2), prompt, valid)
        memory = feats[-1].flatten(2).transpose(1, 2)
        memory = memory + head.cross_attend_prompt(head.cross_attn_norm(memory), prompt, prompt, key_valid=valid)
        pixels = head.pixel_decoder([*feats[:-1], memory.transpose(1, 2).reshape(feats[-1].shape)])
        expected = torch.einsum("bqc,bchw->bqhw", head.mask_predictor.mask_embed(queries), head.instance_seg_head(pixels))
    torch.testing.assert_close(masks, expected, atol=1e-5, rtol=1e-5)
    assert masks.shape == (2, 4, 20, 28) and expected.std() > 0.1


@pytest.mark.parametrize("scale", [4.0, 2.0, 1.0, 0.5])
def test_neck_branch_folds_its_1x1_convs(scale):
    """In inference a neck branch folds conv_1x1 (and a following 1x1 projection, the tracker's
    conv_s0 / conv_s1) into conv_3x3, border biases included: the modules' values to float rounding."""
    from sam.sam3.backbone import VisionBackbone

    generator = torch.Generator().manual_seed(0)
    branch = VisionBackbone(torch.nn.Identity(), 32, 24, [scale]).convs[0].eval()
    project = torch.nn.Conv2d(24, 8, 1)
    with torch.no_grad():
        for parameter in [*branch.parameters(), *project.parameters()]:
            parameter.normal_(0, 0.3, generator=generator)
    x = torch.randn(2, 32, 6, 5, generator=generator)
    with torch.enable_grad():
        plain = torch.nn.Sequential.forward(branch, x).detach()
        projected = project(plain).detach()
    with torch.inference_mode():
        torch.testing.assert_close(branch(x), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(branch(x, project), projected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(branch(x), plain, atol=1e-5, rtol=1e-5)  # the cache keeps both
