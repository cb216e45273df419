"""SAM 3 LiteText (sam.sam3.lite_text): transformers' `Sam3LiteTextModel` checkpoint layout loaded
into our SAM 3 image model, against transformers on the same tiny random weights (text embeddings,
then scores, boxes and masks of text prompts). Meta publishes no LiteText model, so transformers is
the only reference; as in test_sam3_model, its text-only path is given one padded box (label -10)
so it runs the geometry encoder as Meta's SAM 3 does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam3_factory import save_tiny_sam3_lite_text
from skimage import data

from sam.sam3 import Sam3Predictor, load_sam3
from sam.sam3.build import to_transformers
from sam.sam3.layers import box_cxcywh_to_xyxy
from sam.sam3.lite_text import LiteTextEncoder
from sam.sam3.text import tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_sam3_lite_text(tmp_path_factory.mktemp("sam3_lite"))


@pytest.fixture(scope="module")
def reference(saved):
    from transformers import Sam3LiteTextModel

    return Sam3LiteTextModel.from_pretrained(saved["transformers"]).eval()


@pytest.fixture(scope="module")
def ours(saved):
    return load_sam3(saved["transformers"])


def test_loads_as_lite_text_with_every_weight(ours, saved):
    assert isinstance(ours.backbone.language_backbone, LiteTextEncoder)
    assert ours.config.context_length == 32 and ours.config.extra["lite_text"]["max_positions"] == 77
    converted = to_transformers(ours.state_dict())
    reference = saved["model"].state_dict()
    kept = {k for k in reference if not k.startswith(("tracker_model.", "tracker_neck."))}
    assert set(converted) == kept
    for key in kept:
        torch.testing.assert_close(converted[key], reference[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("texts", [["a cat"], ["a striped cat's ear", "grass"]])
def test_text_embeddings_match(ours, reference, texts):
    ids = tokenize(texts)
    with torch.no_grad():
        text, valid = ours.encode_text(ids)
        ref = reference.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
    assert text.std() > 0.1
    torch.testing.assert_close(text, ref, atol=1e-5, rtol=1e-5)  # padding slots too: RepMixer convolves them in
    # The RepMixer's convolution makes a real token depend on its neighbours: a bug in the
    # padding or position handling would show here, not only in the mean.
    assert (text[0, 1] - text[0, 2]).abs().max() > 1e-2


def test_text_prompt_scores_match(ours, reference):
    photo = data.chelsea()
    predictor = Sam3Predictor(ours)
    predictor.set_image(photo)
    pixels = predictor.preprocess(photo)
    for text in ("a cat", "whiskers"):
        ids = tokenize([text])
        with torch.no_grad():
            out = ours.decode(predictor._features, *ours.encode_text(ids))
            ref = reference(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(),
                            input_boxes=torch.zeros(1, 1, 4), input_boxes_labels=torch.full((1, 1), -10))
        ref_scores = (ref.pred_logits.sigmoid() * ref.presence_logits.sigmoid()).numpy()[0]
        scores = (out["logits"].sigmoid() * out["presence"].sigmoid()[:, None]).numpy()[0]
        assert ref_scores.max() - ref_scores.min() > 0.1  # not saturated
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
        np.testing.assert_allclose(box_cxcywh_to_xyxy(out["boxes"]).numpy(), ref.pred_boxes.numpy(), atol=1e-4)
        ours_masks = F.interpolate(out["masks"], size=(256, 256), mode="bilinear", align_corners=False)[0] > 0
        ref_masks = F.interpolate(ref.pred_masks, size=(256, 256), mode="bilinear", align_corners=False)[0] > 0
        fill = ref_masks.float().mean(dim=(-2, -1))
        assert ((fill > 0.05) & (fill < 0.95)).all()
        iou = (ours_masks & ref_masks).sum((-2, -1)) / (ours_masks | ref_masks).sum((-2, -1))
        assert iou.min() >= 0.99
        # The public predictor agrees with the raw decode.
        prediction = predictor.predict(text=text, threshold=0.3)
        np.testing.assert_allclose(np.sort(prediction.scores), np.sort(ref_scores[ref_scores > 0.3]), atol=1e-4)


def test_sharded_checkpoint_loads_the_same(saved, ours, tmp_path):
    """Hub checkpoints of this size may come in shards (model.safetensors.index.json)."""
    saved["model"].save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    sharded = load_sam3(tmp_path / "sharded").state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=0)
