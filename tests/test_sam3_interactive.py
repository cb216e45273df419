"""SAM 3's interactive (point / box) predictor (sam.sam3.interactive) against transformers'
`Sam3TrackerModel` on the same tiny random weights, loaded from Meta's `sam3.pt` layout, from a
transformers `save_pretrained` directory and from the hub's combined file.

The reference gets the very pixels our predictor made (Meta's `Sam3Processor` preprocessing) and the
prompts in the model-input frame; both sides' low-res logits are compared, and the masks are cut the
same way (bilinear resize of the logits to the photo, then > 0). The tracker factory gives
transformers three FPN levels (see tiny_transformers_tracker: its standalone forward would otherwise
add no_memory_embedding to a level it then drops).
"""

from __future__ import annotations

import meta_sam3_shim  # noqa: F401  (before any `sam3` import: stubs its triton-only edt module where triton is missing)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam3_factory import TINY_TRACKER_HEADS, save_tiny_sam3_interactive
from skimage import data

from sam.build import CheckpointError, build_sam, save_checkpoint
from sam.predictor import SamPredictor
from sam.sam3 import Sam3Predictor, load_sam3
from sam.sam3.build import interactive_to_transformers, load_sam3_interactive, load_sam3_interactive_predictor
from sam.sam3.interactive import Sam3InteractivePredictor, fill_holes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POINTS = np.array([[120.0, 90.0], [300.0, 200.0]])  # (x, y) in photo pixels
LABELS = np.array([1, 0])
BOX = np.array([60.0, 40.0, 380.0, 260.0])
PROMPTS = {
    "point": dict(point_coords=POINTS, point_labels=LABELS),
    "box": dict(box=BOX),
    "point+box": dict(point_coords=POINTS[:1], point_labels=LABELS[:1], box=BOX),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_sam3_interactive(tmp_path_factory.mktemp("sam3i"))


@pytest.fixture(scope="module")
def reference(checkpoints):
    from transformers import Sam3TrackerModel

    return Sam3TrackerModel.from_pretrained(checkpoints["transformers"]).eval()


@pytest.fixture(scope="module")
def photo():
    return data.chelsea()  # 300 x 451 RGB: not square, so the coordinate transform is exercised


@pytest.fixture(scope="module", params=["meta", "transformers", "hub"])
def predictor(request, checkpoints, photo):
    layout = request.param
    if layout in ("meta", "hub"):  # one file holds the image model and the tracker
        predictor = load_sam3_interactive_predictor(checkpoints[layout])
    else:
        predictor = load_sam3_interactive_predictor(checkpoints["meta"], checkpoints[layout])
    # Meta fills holes of up to 256 px of its 288-px low-res grid; the same share of our 48-px grid.
    predictor.model.max_hole_area = 256 * (48 / 288) ** 2
    predictor.set_image(photo)
    return predictor


def _reference_outputs(reference, predictor, photo, prompt, multimask_output):
    """transformers on our pixels, prompts moved to the model-input frame as SamPredictor does."""
    pixels = predictor.concept.preprocess(photo)
    size = predictor.original_size
    kwargs = {}
    if "point_coords" in prompt:
        coords = predictor.transform.apply_coords(prompt["point_coords"], size)
        kwargs["input_points"] = torch.tensor(coords, dtype=torch.float32)[None, None]
        kwargs["input_labels"] = torch.tensor(prompt["point_labels"])[None, None]
    if "box" in prompt:
        kwargs["input_boxes"] = torch.tensor(predictor.transform.apply_boxes(prompt["box"][None], size), dtype=torch.float32)[None]
    with torch.no_grad():
        out = reference(pixel_values=pixels, multimask_output=multimask_output, **kwargs)
    return out.pred_masks[0, 0], out.iou_scores[0, 0]


@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_matches_transformers(predictor, reference, photo, prompt_name, multimask_output):
    prompt = PROMPTS[prompt_name]
    masks, iou, low_res = predictor.predict(**prompt, multimask_output=multimask_output)
    ref_low_res, ref_iou = _reference_outputs(reference, predictor, photo, prompt, multimask_output)
    assert masks.shape == (3 if multimask_output else 1, *photo.shape[:2])
    np.testing.assert_allclose(low_res, ref_low_res.clamp(-32, 32).numpy(), atol=1e-4)
    np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-4)
    # Meta's post-processing (small holes filled, then resized), applied to transformers' logits.
    ref_masks = F.interpolate(fill_holes(ref_low_res, predictor.model.max_hole_area)[None], photo.shape[:2], mode="bilinear", align_corners=False)[0] > 0
    raw_fill = (ref_low_res > 0).float().mean(dim=(-2, -1))
    assert ((raw_fill > 0.05) & (raw_fill < 0.95)).all(), raw_fill  # random weights: no trivial reference
    for ours, theirs in zip(masks, ref_masks.numpy()):
        assert 0.05 < ours.mean() < 1.0  # hole filling makes them fuller, never full
        assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99
    if multimask_output:
        assert np.ptp(iou) > 1e-3  # the three candidates differ


def test_mask_input_round_trip(predictor, reference, photo):
    """A previous call's low-res logits (288-grid at 1008 px, 48 here) fed back as mask_input."""
    _, _, low_res = predictor.predict(**PROMPTS["point"], multimask_output=False)
    _, iou, second = predictor.predict(**PROMPTS["point"], mask_input=low_res, multimask_output=False)
    pixels = predictor.concept.preprocess(photo)
    coords = predictor.transform.apply_coords(POINTS, predictor.original_size)
    with torch.no_grad():
        out = reference(pixel_values=pixels, input_points=torch.tensor(coords, dtype=torch.float32)[None, None],
                        input_labels=torch.tensor(LABELS)[None, None], input_masks=torch.tensor(low_res)[None],
                        multimask_output=False)
    np.testing.assert_allclose(second, out.pred_masks[0, 0].clamp(-32, 32).numpy(), atol=1e-4)
    np.testing.assert_allclose(iou, out.iou_scores[0, 0].numpy(), atol=1e-4)
    assert np.abs(second - low_res).max() > 1e-3  # the mask prompt changed the answer


def test_one_image_pass_for_text_and_clicks(checkpoints, photo):
    predictor = load_sam3_interactive_predictor(checkpoints["meta"])
    image_model, interactive = predictor.concept.model, predictor.model
    trunk_calls = []
    interactive.trunk.register_forward_hook(lambda *args: trunk_calls.append(1))
    predictor.set_image(photo)
    concept = predictor.concept.predict(text="a cat", threshold=0.0)
    clicks, _, _ = predictor.predict(**PROMPTS["box"])
    predictor.concept.predict(text="an ear", threshold=0.0)
    predictor.predict(**PROMPTS["point"])
    assert len(trunk_calls) == 1 and predictor.concept.image_passes == 1
    assert len(concept) > 0 and clicks.shape[1:] == photo.shape[:2]
    # The concept predictor's cached features are the ones a fresh pass gives.
    fresh = Sam3Predictor(image_model)
    fresh.set_image(photo)
    torch.testing.assert_close(fresh._features.feats[-1], predictor.concept._features.feats[-1])


def test_standalone_sam_predictor_matches_transformers(checkpoints, reference, photo):
    """SamPredictor(Sam3Interactive) alone, as Meta's SAM3InteractiveImagePredictor: the photo
    stretched to the square in [0, 1], then scaled to [-1, 1]."""
    interactive = load_sam3_interactive(checkpoints["transformers"])
    predictor = SamPredictor(interactive)
    predictor.set_image(photo)
    masks, iou, low_res = predictor.predict(**PROMPTS["box"])
    pixels = predictor.transform.to_input_tensor(photo)
    box = torch.tensor(predictor.transform.apply_boxes(BOX[None], photo.shape[:2]), dtype=torch.float32)[None]
    with torch.no_grad():
        out = reference(pixel_values=(pixels - 0.5) / 0.5, input_boxes=box, multimask_output=True)
    np.testing.assert_allclose(low_res, out.pred_masks[0, 0].clamp(-32, 32).numpy(), atol=1e-4)
    np.testing.assert_allclose(iou, out.iou_scores[0, 0].numpy(), atol=1e-4)


def test_hub_file_holds_the_same_image_model(checkpoints):
    from_hub = load_sam3(checkpoints["hub"]).state_dict()
    from_meta = load_sam3(checkpoints["meta"]).state_dict()
    assert set(from_hub) == set(from_meta)
    for key, value in from_meta.items():
        torch.testing.assert_close(from_hub[key], value, rtol=0, atol=0, msg=key)


def test_layouts_convert_both_ways(checkpoints):
    interactive = load_sam3_interactive(checkpoints["transformers"])
    converted = interactive_to_transformers(interactive.state_dict())
    reference = checkpoints["tracker"].state_dict()
    assert set(converted) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)


def test_bad_checkpoints_and_inputs(checkpoints, tmp_path, photo):
    with pytest.raises(CheckpointError, match="image model only, without the tracker"):
        load_sam3_interactive(checkpoints["detector_only"])
    sam2_file = save_checkpoint(build_sam("sam2.1_hiera_tiny", trunk_embed_dim=8, trunk_num_heads=1,
                                          trunk_stages=(1, 1, 1, 1), trunk_global_att_blocks=(2,),
                                          trunk_window_spec=(2, 2, 2, 2)), tmp_path / "sam2.pt")
    with pytest.raises(CheckpointError, match="not a SAM 3 checkpoint: it looks like a SAM 2"):
        load_sam3_interactive(sam2_file)
    other = load_sam3(checkpoints["detector_only"])
    with torch.no_grad():
        other.backbone.vision_backbone.trunk.blocks[0].mlp.fc1.bias.add_(0.5)
    with pytest.raises(CheckpointError, match="ViT weights differ from the image model"):
        load_sam3_interactive(checkpoints["transformers"], image_model=other)
    interactive = load_sam3_interactive(checkpoints["meta"])
    with pytest.raises(ValueError, match="share the concept model's ViT trunk"):
        Sam3InteractivePredictor(Sam3Predictor(other), interactive)
    predictor = load_sam3_interactive_predictor(checkpoints["meta"])
    with pytest.raises(ValueError, match="no image is set"):
        predictor.predict(**PROMPTS["box"])
    with pytest.raises(ValueError, match="image must have shape"):
        predictor.set_image(np.zeros((2, 3, 4, 5), np.uint8))
    predictor.set_image(np.ascontiguousarray(photo[..., ::-1]), image_format="BGR")
    _, _, from_bgr = predictor.predict(**PROMPTS["box"])
    predictor.set_image(photo)
    np.testing.assert_array_equal(predictor.predict(**PROMPTS["box"])[2], from_bgr)
    with pytest.raises(NotImplementedError, match="one image at a time"):
        predictor.set_image_batch([photo])
    with pytest.raises(ValueError, match="outside the 451x300 image"):
        predictor.predict(point_coords=[[500.0, 10.0]], point_labels=[1])
    with pytest.raises(ValueError, match="mask_input must be low-res logits of shape \\(1, 48, 48\\)"):
        predictor.predict(**PROMPTS["box"], mask_input=np.zeros((1, 256, 256)))


def test_small_holes_are_filled_as_meta_does(checkpoints):
    """Hand-made low-res logits: a 2x2 hole (4 px) is filled; five pixels touching only at corners
    are one 8-connected hole of 5 px and stay; a 3x3 hole stays; the low-res logits are untouched."""
    interactive = load_sam3_interactive(checkpoints["meta"])
    interactive.max_hole_area = 4
    logits = torch.ones(1, 1, 48, 48)
    logits[..., 10:12, 10:12] = -1  # 4 px
    for step in range(5):
        logits[..., 30 + step, 5 + step] = -1  # diagonal, 5 px
    logits[..., 20:23, 30:33] = -1  # 9 px
    out = interactive.postprocess_masks(logits.clone(), (48, 48), (48, 48))
    assert (out[..., 10:12, 10:12] == 10).all()
    assert all(out[0, 0, 30 + step, 5 + step] == -1 for step in range(5))
    assert (out[..., 20:23, 30:33] == -1).all()
    assert int((out != logits).sum()) == 4
    interactive.max_hole_area = 0
    torch.testing.assert_close(interactive.postprocess_masks(logits, (48, 48), (48, 48)), logits)


class _MetaHeads(torch.nn.Module):
    """What Meta's SAM3InteractiveImagePredictor reads off its tracker: the two SAM heads."""

    def __init__(self, prompt_encoder, mask_decoder, image_size):
        super().__init__()
        self.sam_prompt_encoder, self.sam_mask_decoder, self.image_size = prompt_encoder, mask_decoder, image_size

    @property
    def device(self):
        return torch.device("cpu")


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_meta_predictor_on_the_same_tracker_weights(checkpoints, photo, prompt_name):
    """Meta's own SAM3InteractiveImagePredictor (sam3 0.1.4) with its SAM heads built at the tiny
    sizes and loaded strictly from the `tracker.sam_*` keys of our Meta-layout file, on our cached
    image features (set as Meta's Sam3Image.predict_inst does): Meta's transforms, decode, hole
    filling (its CPU connected components) and upscaling against ours. These modules need no CUDA
    shim; importing `sam3` needs tests/meta_sam3_shim.py only where triton is missing."""
    mask_decoder_module = pytest.importorskip("sam3.sam.mask_decoder")
    from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor
    from sam3.sam.prompt_encoder import PromptEncoder
    from sam3.sam.transformer import TwoWayTransformer

    predictor = load_sam3_interactive_predictor(checkpoints["meta"])
    predictor.model.max_hole_area = 256 * (48 / 288) ** 2
    predictor.set_image(photo)
    state = torch.load(checkpoints["meta"], weights_only=True)["model"]
    prompt_encoder = PromptEncoder(embed_dim=32, image_embedding_size=(12, 12), input_image_size=(168, 168), mask_in_chans=16)
    mask_decoder = mask_decoder_module.MaskDecoder(
        num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=8),
        transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32, use_high_res_features=True,
        iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True, dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05, dynamic_multimask_stability_thresh=0.98,
    )
    for module, prefix in ((prompt_encoder, "tracker.sam_prompt_encoder."), (mask_decoder, "tracker.sam_mask_decoder.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    meta = SAM3InteractiveImagePredictor(_MetaHeads(prompt_encoder, mask_decoder, 168).eval(),
                                         max_hole_area=predictor.model.max_hole_area)
    meta._features = {"image_embed": predictor.features["image_embed"], "high_res_feats": predictor.features["high_res_feats"]}
    meta._is_image_set, meta._orig_hw = True, [photo.shape[:2]]
    for multimask_output in (True, False):
        ours = predictor.predict(**PROMPTS[prompt_name], multimask_output=multimask_output)
        theirs = meta.predict(**PROMPTS[prompt_name], multimask_output=multimask_output)
        np.testing.assert_allclose(ours[2], theirs[2], atol=1e-5)  # low-res logits
        np.testing.assert_allclose(ours[1], theirs[1], atol=1e-5)  # IoU predictions
        assert set(np.unique(theirs[0])) <= {0.0, 1.0}  # Meta returns the binary masks as floats
        for a, b in zip(ours[0], theirs[0] > 0.5):
            assert 0.05 < a.mean() < 1.0 and (a & b).sum() / (a | b).sum() >= 0.99


@pytest.fixture(scope="module")
def meta_image_path(checkpoints, photo, tmp_path_factory):
    """Meta's whole image path (sam3 0.1.4): its `Sam3Image` with the interactive predictor, built at
    the tiny sizes by tests/meta_sam3_shim.py and loaded strictly from our Meta-layout file (plus
    Meta's point projections); `Sam3Processor.set_image` on the photo runs its ViT, both necks and
    the conv_s0/conv_s1 projections. Returns (our predictor on the same file, Meta's model, its state)."""
    pytest.importorskip("sam3.model.sam3_image_processor")
    from meta_sam3_shim import build_meta_sam3_image, load_meta_weights, meta_cpu, with_point_projections
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    full = with_point_projections(checkpoints["meta"], tmp_path_factory.mktemp("sam3i_meta"))
    predictor = load_sam3_interactive_predictor(full)
    predictor.model.max_hole_area = 256 * (48 / 288) ** 2
    predictor.set_image(photo)
    heads = {k: TINY_TRACKER_HEADS[k] for k in ("mlp_dim", "iou_head_hidden_dim")}
    meta = build_meta_sam3_image(predictor.concept.model.config, interactive=dict(
        num_heads=TINY_TRACKER_HEADS["num_attention_heads"], **heads), max_hole_area=predictor.model.max_hole_area)
    load_meta_weights(meta, full)
    with meta_cpu():
        state = Sam3Processor(meta, resolution=168, device="cpu").set_image(Image.fromarray(photo))
    return predictor, meta, state


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_metas_whole_image_path_matches(meta_image_path, photo, prompt_name):
    """Meta's `Sam3Image.predict_inst` (its features, no_mem_embed, transforms, decoder, hole filling
    and upscaling) against ours, both from the same Meta-layout file and the same photo."""
    predictor, meta, state = meta_image_path
    for multimask_output in (True, False):
        ours = predictor.predict(**PROMPTS[prompt_name], multimask_output=multimask_output)
        theirs = meta.predict_inst(state, **PROMPTS[prompt_name], multimask_output=multimask_output)
        assert theirs[2].shape == ours[2].shape == (3 if multimask_output else 1, 48, 48)
        np.testing.assert_allclose(ours[2], theirs[2], atol=1e-4)  # low-res logits
        np.testing.assert_allclose(ours[1], theirs[1], atol=1e-4)  # IoU predictions
        raw_fill = (theirs[2] > 0).mean(axis=(-2, -1))
        assert ((raw_fill > 0.05) & (raw_fill < 0.95)).all(), raw_fill  # Meta's answer is not trivial
        for a, b in zip(ours[0], theirs[0] > 0.5):
            assert (a & b).sum() / (a | b).sum() >= 0.99


def test_released_sizes_match_metas_tracker_heads():
    """At the released sizes (1008 px, 256 channels), our heads have exactly the parameter names and
    shapes of Meta's tracker heads as its build_tracker makes them (so sam3.pt's tracker.sam_* load)."""
    mask_decoder_module = pytest.importorskip("sam3.sam.mask_decoder")
    from sam3.sam.prompt_encoder import PromptEncoder
    from sam3.sam.transformer import TwoWayTransformer

    from sam.sam3 import Sam3Config
    from sam.sam3.interactive import Sam3Interactive

    config = Sam3Config()
    ours = Sam3Interactive(torch.nn.Identity(), image_size=config.image_size, patch_size=config.patch_size,
                           vit_dim=config.vit_dim)
    grid = config.image_size // config.patch_size
    theirs = {
        "sam_prompt_encoder": PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                            input_image_size=(config.image_size,) * 2, mask_in_chans=16),
        "sam_mask_decoder": mask_decoder_module.MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, use_high_res_features=True,
            iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True),
    }
    for name, module in theirs.items():
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in getattr(ours, name).state_dict().items()}
        assert got == expected, name
    assert ours.sam_prompt_encoder.mask_input_size == (288, 288) and tuple(ours.no_mem_embed.shape) == (1, 1, 256)


def test_fused_decoding_equals_one_set_at_a_time(checkpoints, photo):
    """SamPredictor.predict_fused (the server's fused /v1/predict) runs on the SAM 3 interactive
    model too: prompt sets on two images, each equal bit for bit to set_embedding + predict."""
    predictor = load_sam3_interactive_predictor(checkpoints["meta"])
    stored = []
    for image in (photo, np.ascontiguousarray(photo[::-1])):
        predictor.set_image(image)
        stored.append((predictor.features, predictor.original_size, predictor.input_size))
    prompts = [PROMPTS["point"], PROMPTS["box"], PROMPTS["point+box"], PROMPTS["point"]]
    expected = []
    for index, prompt in enumerate(prompts):
        predictor.set_embedding(*stored[index % 2])
        expected.append(predictor.predict(**prompt, return_logits=True))
    sets = [predictor.prompt_set(*stored[index % 2], **prompt) for index, prompt in enumerate(prompts)]
    got = predictor.predict_fused(sets, return_logits=True)
    for (logits, scores, low_res), (want_logits, want_scores, want_low_res) in zip(got, expected):
        np.testing.assert_array_equal(logits, want_logits)
        np.testing.assert_array_equal(scores, want_scores)
        np.testing.assert_array_equal(low_res, want_low_res)
    assert 0.01 < (expected[0][0] > 0).mean() < 0.99
