"""SAM 2.1 above `sam/`: the pipeline, the CLI and the demo end to end.

A real-size sam2.1_hiera_tiny (random weights, official `{"model": ...}` layout) is found by
`sam_type="auto"` exactly as a downloaded file would be; its masks are checked against a
separately built `SamPredictor` on the same file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sam_factory import randomize_parameters, real_photo

from langsam.detector import Detections
from langsam.pipeline import LangSAM
from sam import SamPredictor, build_sam, save_checkpoint


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_parameters(build_sam("sam2.1_hiera_tiny"), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("sam2_real_size") / "sam2.1_hiera_tiny.pt")


class FixedDetector:
    def __init__(self, boxes, labels, scores):
        self.boxes = np.asarray(boxes, dtype=np.float32)
        self.labels, self.scores = list(labels), np.asarray(scores, dtype=np.float32)
        self.calls = 0

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        self.calls += 1
        ids = np.array([list(queries).index(label) for label in self.labels], dtype=np.int64)
        return Detections(self.boxes, self.scores, list(self.labels), ids, list(self.labels), list(queries))


BOXES = [[40.0, 20.0, 300.0, 280.0], [200.0, 60.0, 440.0, 299.0]]


def test_pipeline_with_sam2_equals_its_predictor_and_caches_multi_level_features(sam2_checkpoint):
    photo = real_photo("chelsea")
    detector = FixedDetector(BOXES, ["a cat", "a sofa"], [0.9, 0.7])
    pipe = LangSAM(sam_type="auto", sam_checkpoint=sam2_checkpoint, detector_model=detector, device="cpu")
    result = pipe.segment(photo, ["a cat", "a sofa"], multimask=True)
    assert pipe.predictor.family == "sam2" and result.labels == ["a cat", "a sofa"]

    reference = SamPredictor(build_sam("sam2.1_hiera_tiny", checkpoint=sam2_checkpoint))
    reference.set_image(photo)
    boxes = reference.transform.apply_boxes_torch(torch.tensor(BOXES), photo.shape[:2])
    masks, iou, _ = reference.predict_torch(None, None, boxes=boxes, multimask_output=True)
    best = iou.argmax(dim=1)
    rows = torch.arange(len(BOXES))
    np.testing.assert_array_equal(result.masks, masks[rows, best].numpy())
    np.testing.assert_allclose(result.mask_scores, iou[rows, best].numpy(), rtol=1e-6)

    calls = []
    pipe.predictor.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    again = pipe.segment(photo.copy(), ["a cat", "a sofa"], multimask=True)
    assert calls == []  # the cached multi-level features served the second call
    np.testing.assert_array_equal(again.masks, result.masks)
    assert set(pipe._embeddings[next(iter(pipe._embeddings))][0]) == {"image_embed", "high_res_feats"}

    auto = pipe.auto_masks(photo, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert len(auto) >= 1 and all(record["segmentation"].shape == photo.shape[:2] for record in auto)


def test_cli_segment_and_auto_masks_with_sam2(sam2_checkpoint, tmp_path):
    from langsam.cli import main

    photo_path = tmp_path / "in" / "chelsea.png"
    photo_path.parent.mkdir()
    from PIL import Image

    Image.fromarray(real_photo("chelsea")).save(photo_path)
    out = tmp_path / "auto"
    assert main(["auto-masks", str(photo_path), "--out", str(out), "--checkpoint", str(sam2_checkpoint),
                 "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "-q"]) == 0
    record = json.loads((out / "chelsea.json").read_text())
    from sam import make_mask_generator

    expected = make_mask_generator(build_sam("sam2.1_hiera_tiny", checkpoint=sam2_checkpoint), points_per_side=2,
                                   pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="coco_rle")
    expected = expected.generate(real_photo("chelsea"))
    assert [a["segmentation"]["counts"] for a in record["annotations"]] == [e["segmentation"]["counts"] for e in expected]

    from tiny_gdino import save_tiny_grounding_dino

    gdino = save_tiny_grounding_dino(tmp_path / "gdino", logit_scale=0.1, num_queries=8)
    segment_out = tmp_path / "segment"
    code = main(["segment", str(photo_path), "--text", "a cat", "--text", "a sofa", "--out", str(segment_out),
                 "--sam-type", "auto", "--sam-checkpoint", str(sam2_checkpoint), "--detector", str(gdino),
                 "--box-threshold", "0", "--top-k", "3", "--device", "cpu", "-q"])
    assert code == 0
    result = json.loads(next(segment_out.rglob("result.json")).read_text())
    in_process = LangSAM(sam_type="auto", sam_checkpoint=sam2_checkpoint, detector=str(gdino), device="cpu")
    expected = in_process.segment(real_photo("chelsea"), ["a cat", "a sofa"], box_threshold=0.0, top_k=3)
    assert len(result["objects"]) == len(expected) == 3
    assert [obj["label"] for obj in result["objects"]] == expected.labels
    np.testing.assert_allclose([obj["box_xyxy"] for obj in result["objects"]], expected.boxes, atol=1e-4)
    from pycocotools import mask as mask_utils

    for obj, mask in zip(result["objects"], expected.masks):
        rle = {"size": obj["segmentation"]["size"], "counts": obj["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_demo_text_and_click_tabs_with_sam2(sam2_checkpoint, tmp_path):
    """The demo served on 127.0.0.1 with a SAM 2.1 pipeline: the text tab equals the pipeline,
    a click equals `SamPredictor.predict` on the same model."""
    pytest.importorskip("gradio")
    from demo_support import save_photo, serve
    from gradio_client import Client, handle_file

    from langsam.demo import CLICK_POSITIVE, build_app

    path = tmp_path / "small.png"
    image = save_photo(path, "chelsea", crop=(150, 200))
    pipeline = LangSAM(sam_type="auto", sam_checkpoint=sam2_checkpoint, device="cpu",
                       detector_model=FixedDetector([[10.0, 10.0, 120.0, 140.0]], ["cat"], [0.8]))
    app = build_app(lambda: pipeline)
    with serve(app) as url:
        client = Client(url, verbose=False)
        _, _, table, _, _, status = client.predict(handle_file(str(path)), "cat", "grounded", 0.3, 0.25, 0.5,
                                                   False, 3, api_name="/segment_text")
        expected = pipeline.segment(image, ["cat"])
        assert status.startswith("1 object(s)") and [row[1] for row in table["data"]] == ["cat"]
        assert [row[9] for row in table["data"]] == [int(expected.masks[0].sum())]

        client.predict(handle_file(str(path)), api_name="/click_set_image")
        _, _, mask_path, info, _ = client.predict(60, 40, CLICK_POSITIVE, api_name="/click_add_point")
    reference = SamPredictor(pipeline.predictor.model)
    reference.set_image(image)
    masks, scores, _ = reference.predict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]))
    order = np.argsort(-scores, kind="stable")
    from PIL import Image

    with Image.open(mask_path) as shown:
        np.testing.assert_array_equal(np.asarray(shown) == 255, masks[order[0]])
    np.testing.assert_allclose(info["scores"], scores[order], atol=1e-5)
