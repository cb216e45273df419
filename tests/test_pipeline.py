"""LangSAM end to end on a real photo with tiny random models in their real formats.

Parity: the pipeline's boxes and masks equal transformers' own Grounding DINO post-processing
followed by our SamPredictor.predict_torch on those boxes (a separately built predictor).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from langsam.detector import Detections
from langsam.pipeline import LangSAM, image_key, resolve_device, resolve_dtype
from sam import SamPredictor, build_sam
from sam_factory import real_photo
from tiny_gdino import reference_detection, save_tiny_grounding_dino

LOGIT_SCALE = 0.1  # token probabilities ~0.5-0.8: box_threshold 0.6 keeps some boxes, drops others
NUM_QUERIES = 8


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino"), logit_scale=LOGIT_SCALE, num_queries=NUM_QUERIES)


@pytest.fixture(scope="module")
def pipe(gdino_dir, tiny_sam_checkpoint):
    return LangSAM(sam_type="auto", sam_checkpoint=tiny_sam_checkpoint, detector=str(gdino_dir), device="cpu")


@pytest.fixture(scope="module")
def photo():
    return real_photo("chelsea")


class FixedDetector:
    """Returns the same boxes for any image; counts calls."""

    def __init__(self, boxes, labels, scores=None):
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = list(labels)
        self.scores = np.asarray(scores if scores is not None else [0.9] * len(self.labels), dtype=np.float32)
        self.calls = 0

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        self.calls += 1
        return Detections(self.boxes, self.scores, self.labels, np.zeros(len(self.labels), np.int64),
                          list(self.labels), list(queries))


def _count_encoder_calls(pipeline: LangSAM) -> list[int]:
    counter = [0]
    pipeline.predictor.model.image_encoder.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def _reference_boxes(pipeline, photo, caption, box_threshold, text_threshold=0.25):
    detector = pipeline.detector
    _, _, result = reference_detection(
        detector.processor, detector.model, photo, caption, box_threshold, text_threshold
    )
    order = np.argsort(-result["scores"].numpy(), kind="stable")  # the pipeline returns best first
    boxes = result["boxes"].numpy()[order]
    height, width = photo.shape[:2]
    # The pipeline clips boxes to the image (and SAM gets the clipped ones).
    boxes = np.stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height),
                      boxes[:, 2].clip(0, width), boxes[:, 3].clip(0, height)], axis=1)
    return boxes, result["scores"].numpy()[order]


def test_grounded_equals_transformers_then_sam_predictor(pipe, photo, tiny_sam_checkpoint):
    queries = ["A Cat", "a remote control"]
    result = pipe.segment(photo, queries, box_threshold=0.6)
    boxes, scores = _reference_boxes(pipe, photo, "a cat. a remote control.", 0.6)
    assert 0 < len(boxes) < NUM_QUERIES
    # The fast detector path equals transformers' forward up to float rounding.
    np.testing.assert_allclose(result.boxes, boxes, atol=1e-3)
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)
    assert set(result.labels) <= set(queries)

    reference = SamPredictor(build_sam("auto", checkpoint=tiny_sam_checkpoint))
    reference.set_image(photo)
    input_boxes = reference.transform.apply_boxes_torch(torch.as_tensor(result.boxes), photo.shape[:2])
    masks, iou, _ = reference.predict_torch(None, None, boxes=input_boxes, multimask_output=False)
    assert result.masks.shape == (len(boxes), *photo.shape[:2])
    np.testing.assert_array_equal(result.masks, masks[:, 0].numpy())
    np.testing.assert_allclose(result.mask_scores, iou[:, 0].numpy(), rtol=1e-6)
    assert result.masks.any(axis=(1, 2)).all()

    multi = pipe.segment(photo, queries, box_threshold=0.6, multimask=True)
    masks3, iou3, _ = reference.predict_torch(None, None, boxes=input_boxes, multimask_output=True)
    best = iou3.argmax(dim=1)
    rows = torch.arange(len(boxes))
    np.testing.assert_array_equal(multi.masks, masks3[rows, best].numpy())
    np.testing.assert_allclose(multi.mask_scores, iou3.max(dim=1).values.numpy(), rtol=1e-6)

    assert result.overlay().size == (photo.shape[1], photo.shape[0])
    from pycocotools import mask as mask_utils

    first = result.to_coco()[0]["segmentation"]
    decoded = mask_utils.decode({"size": first["size"], "counts": first["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), result.masks[0])


def test_one_detector_pass_for_all_queries_and_top_k(pipe, photo):
    detector = pipe.detector
    before = detector.forward_passes
    result = pipe.segment(photo, "a cat. a remote control. a sofa. a blanket", box_threshold=0.0, top_k=3)
    assert detector.forward_passes == before + 1
    assert len(result) == 3 and np.all(np.diff(result.scores) <= 0)


def test_no_detections_gives_empty_result_without_encoding(pipe, photo, tiny_sam_checkpoint):
    empty = pipe.segment(photo, "a cat", box_threshold=1.0)  # no score exceeds 1
    assert len(empty) == 0 and empty.masks.shape == (0, *photo.shape[:2]) and empty.boxes.shape == (0, 4)
    assert empty.overlay().size == (photo.shape[1], photo.shape[0])

    fresh = LangSAM(sam_model=build_sam("auto", checkpoint=tiny_sam_checkpoint), detector_model=FixedDetector([], []))
    calls = _count_encoder_calls(fresh)
    assert len(fresh.segment(photo, "anything")) == 0 and calls[0] == 0


def test_repeated_images_reuse_the_embedding_and_cache_is_bounded(pipe, photo):
    box = [[50, 40, 250, 280]]
    coffee, astronaut = real_photo("coffee"), real_photo("astronaut")
    cached = LangSAM(sam_model=pipe.predictor.model, detector_model=FixedDetector(box, ["a cat"]), embedding_cache_size=2)
    calls = _count_encoder_calls(cached)
    first = cached.segment(photo, "a cat")
    again = cached.segment(photo.copy(), "a dog. a cat")  # same content, another array, other queries
    assert calls[0] == 1
    np.testing.assert_array_equal(again.masks, first.masks)
    cached.set_image(coffee)
    assert calls[0] == 2
    cached.set_image(photo)  # cached: no encoder call; photo is now the most recently used
    assert calls[0] == 2
    cached.set_image(astronaut)  # evicts the least recently used entry (coffee), not photo
    assert calls[0] == 3 and len(cached._embeddings) == 2
    restored = cached.segment(photo, "a cat")
    assert calls[0] == 3
    np.testing.assert_array_equal(restored.masks, first.masks)
    np.testing.assert_array_equal(restored.mask_scores, first.mask_scores)
    cached.set_image(coffee)
    assert calls[0] == 4
    assert image_key(photo) != image_key(coffee) and image_key(photo) == image_key(photo.copy())


def test_bad_input_raises_value_error_before_loading_models(photo):
    lazy = LangSAM(sam_type="vit_b", detector="/no/such/detector")
    for text in ["", "   ", " . . ", [], ["  "]]:
        with pytest.raises(ValueError, match="text is empty"):
            lazy.segment(photo, text)
    with pytest.raises(ValueError, match="mode"):
        lazy.segment(photo, "a cat", mode="magic")
    with pytest.raises(ValueError, match="box_threshold"):
        lazy.segment(photo, "a cat", box_threshold=2)
    with pytest.raises(ValueError, match="top_k"):
        lazy.segment(photo, "a cat", top_k=0)
    with pytest.raises(ValueError, match="shape"):
        lazy.segment(np.zeros((4, 4, 2), np.uint8), "a cat")
    assert lazy._predictor is None and lazy._detector is None
    with pytest.raises(ValueError, match="sam_checkpoint"):
        LangSAM(sam_type="auto")
    with pytest.raises(ValueError, match="does not exist"):
        LangSAM(sam_checkpoint="/no/such/file.pth")


def test_segment_batch_equals_single_calls(pipe, photo):
    coffee = real_photo("coffee")
    detector = pipe.detector
    before = detector.forward_passes
    batch = pipe.segment_batch([photo, coffee], "a cat. a cup", box_threshold=0.6)
    assert detector.forward_passes == before + 2  # one pass per image, not per (image, query)
    for image, result in zip([photo, coffee], batch):
        single = pipe.segment(image, "a cat. a cup", box_threshold=0.6)
        np.testing.assert_array_equal(result.boxes, single.boxes)
        np.testing.assert_array_equal(result.masks, single.masks)
        assert result.labels == single.labels

    # Two images of one size share a detector forward pass when asked to; results unchanged.
    mirrored = np.ascontiguousarray(photo[:, ::-1])
    before = detector.forward_passes
    shared = pipe.segment_batch([photo, mirrored], "a cat. a cup", box_threshold=0.6, detector_batch_size=2)
    assert detector.forward_passes == before + 1
    for image, result in zip([photo, mirrored], shared):
        single = pipe.segment(image, "a cat. a cup", box_threshold=0.6)
        np.testing.assert_allclose(result.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(result.scores, single.scores, atol=1e-5)
        assert result.labels == single.labels

    class RecordingDetector(FixedDetector):
        def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
            seen.append(list(queries))
            return super().detect(image, queries, box_threshold, text_threshold)

    seen = []
    recording = LangSAM(sam_model=pipe.predictor.model, detector_model=RecordingDetector([], []))
    per_image = recording.segment_batch([photo, coffee], [["a cat"], ["a cup", "a spoon"]])
    assert seen == [["a cat"], ["a cup", "a spoon"]] and [len(r) for r in per_image] == [0, 0]
    recording.segment_batch([photo, coffee], ["a cat", "a cup"])  # a list of strings: shared queries
    assert seen[2:] == [["a cat", "a cup"], ["a cat", "a cup"]]
    with pytest.raises(ValueError, match="2 images but 1"):
        pipe.segment_batch([photo, coffee], [["a cat"]])


def test_exif_rotated_jpeg_gives_masks_in_displayed_orientation(pipe, photo, tmp_path):
    stored = np.ascontiguousarray(np.rot90(photo, k=1))  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    decoded_stored = np.asarray(Image.open(path).convert("RGB"))
    displayed = np.ascontiguousarray(np.rot90(decoded_stored, k=-1))

    box = [[40, 60, 260, 300]]
    rotated = LangSAM(sam_model=pipe.predictor.model, detector_model=FixedDetector(box, ["a cat"]))
    from_file = rotated.segment(path, "a cat")
    from_pixels = rotated.segment(displayed, "a cat")
    assert from_file.image_size == photo.shape[:2] == displayed.shape[:2]
    np.testing.assert_array_equal(from_file.masks, from_pixels.masks)
    assert from_file.masks.any()


def test_module_level_segment_builds_one_default_pipeline(pipe, photo, monkeypatch):
    import langsam.pipeline

    fixed = LangSAM(sam_model=pipe.predictor.model, detector_model=FixedDetector([[40, 60, 260, 300]], ["a cat"]))
    built = []

    def factory():
        built.append(1)
        return fixed

    monkeypatch.setattr(langsam, "_default_pipeline", None)
    monkeypatch.setattr(langsam.pipeline, "LangSAM", factory)
    first = langsam.segment(photo, "a cat")
    second = langsam.segment(photo, "a cat", multimask=True)
    assert built == [1]
    np.testing.assert_array_equal(first.masks, fixed.segment(photo, "a cat").masks)
    np.testing.assert_array_equal(second.masks, fixed.segment(photo, "a cat", multimask=True).masks)


def test_hybrid_equals_grounded_filtered_by_clip(pipe, photo, tmp_path_factory):
    from langsam.clip_scorer import ClipScorer
    from tiny_clip import save_tiny_clip

    files = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    scorer = ClipScorer(files.model_name, pretrained=files.weights_path, device="cpu")
    boxes = [[40, 60, 260, 300], [0, 0, 120, 90], [300, 150, 450, 299], [100, 100, 200, 200]]
    labels = ["a cat", "a remote control", "a cat", "a remote control"]
    hybrid_pipe = LangSAM(sam_model=pipe.predictor, detector_model=FixedDetector(boxes, labels, [0.9, 0.8, 0.7, 0.6]),
                          clip_scorer=scorer)
    queries = ["a cat", "a remote control"]
    grounded = hybrid_pipe.segment(photo, queries)
    expected = scorer.score_labels(photo, grounded.masks, grounded.labels, queries=queries)
    everything = hybrid_pipe.segment(photo, queries, mode="hybrid", clip_threshold=0.0)
    np.testing.assert_allclose(everything.clip_scores, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(everything.masks, grounded.masks)
    assert everything.mode == "hybrid"
    cut = float(np.median(expected))
    filtered = hybrid_pipe.segment(photo, queries, mode="hybrid", clip_threshold=cut)
    keep = expected >= cut
    assert 0 < len(filtered) == keep.sum()
    np.testing.assert_array_equal(filtered.boxes, grounded.boxes[keep])


def test_clip_mode_ranks_auto_masks_and_indexes_each_image_once(pipe, photo, tmp_path_factory, monkeypatch):
    from langsam.clip_scorer import ClipScorer
    from tiny_clip import save_tiny_clip

    files = save_tiny_clip(tmp_path_factory.mktemp("clip2"))
    scorer = ClipScorer(files.model_name, pretrained=files.weights_path, device="cpu")
    clip_pipe = LangSAM(sam_model=pipe.predictor, detector_model=FixedDetector([], []), clip_scorer=scorer)
    height, width = photo.shape[:2]
    records = []
    for index, (y0, x0) in enumerate([(0, 0), (100, 150), (200, 300), (50, 200)]):
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y0 + 80, x0:x0 + 120] = True
        records.append({"segmentation": mask, "bbox": [x0, y0, 120, 80], "predicted_iou": 0.5 + 0.1 * index,
                        "area": int(mask.sum())})
    auto_calls = []
    monkeypatch.setattr(clip_pipe, "auto_masks", lambda image, **kw: auto_calls.append(1) or records)

    queries = ["a cat", "a sofa"]
    result = clip_pipe.segment(photo, queries, mode="clip", clip_threshold=0.0)
    index = scorer.build_index(photo, records)
    mask_ids, label_ids, scores = index.query(queries, clip_threshold=0.0)
    assert result.mode == "clip" and len(result) == len(mask_ids) == 4
    np.testing.assert_array_equal(result.masks, np.stack([records[i]["segmentation"] for i in mask_ids]))
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5)
    np.testing.assert_allclose(result.clip_scores, scores, rtol=1e-5)
    np.testing.assert_allclose(result.mask_scores, [records[i]["predicted_iou"] for i in mask_ids], rtol=1e-6)
    assert result.labels == [queries[i] for i in label_ids]
    np.testing.assert_array_equal(result.boxes[0], np.array(records[mask_ids[0]]["bbox"], np.float32) + [0, 0, *records[mask_ids[0]]["bbox"][:2]])
    top = clip_pipe.segment(photo, "a cat", mode="clip", clip_threshold=0.0, top_k=2)
    assert len(top) == 2 and auto_calls == [1]  # masks + crop embeddings computed once per image


def test_device_and_dtype_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None) == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3")
    with pytest.raises(ValueError, match="device"):
        resolve_device("toaster")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_import_langsam_loads_nothing_heavy():
    code = ("import sys, langsam; "
            "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'gradio') if m in sys.modules]; "
            "assert not heavy, heavy; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_auto_masks_equal_the_generator_on_the_same_model(pipe, photo):
    from sam import SamAutomaticMaskGenerator

    params = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    ours = pipe.auto_masks(photo, **params)
    reference = SamAutomaticMaskGenerator(pipe.predictor.model, **params).generate(photo)
    assert len(ours) == len(reference) > 0
    for mine, theirs in zip(ours, reference):
        np.testing.assert_array_equal(mine["segmentation"], theirs["segmentation"])
        assert mine["bbox"] == theirs["bbox"] and mine["area"] == theirs["area"]


def test_boxes_past_every_edge_are_clipped_everywhere(tiny_sam_checkpoint, tmp_path):
    """A detector whose boxes reach past each edge of the image (and one wholly outside it):
    every box that leaves the package lies inside the image, and SAM got the clipped box."""
    import json

    photo = real_photo("astronaut")[:300, :400]  # 400 x 300
    height, width = photo.shape[:2]
    raw = [[-27.4, 49.2, 191.8, 186.0],     # past the left edge
           [120.0, -15.0, 260.0, 90.0],     # past the top
           [300.0, 100.0, 455.5, 200.0],    # past the right
           [20.0, 220.0, 140.0, 333.3],     # past the bottom
           [-10.0, -10.0, 410.0, 310.0],    # past all four
           [420.0, 10.0, 500.0, 60.0]]      # wholly outside: dropped
    labels = ["left", "top", "right", "bottom", "all", "outside"]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.95]
    sam = build_sam("auto", checkpoint=tiny_sam_checkpoint)
    pipe = LangSAM(sam_model=sam, detector_model=FixedDetector(raw, labels, scores))
    result = pipe.segment(photo, labels)
    expected = np.array([[0, 49.2, 191.8, 186.0], [120, 0, 260, 90], [300, 100, 400, 200],
                         [20, 220, 140, 300], [0, 0, 400, 300]], dtype=np.float32)
    assert result.labels == labels[:5]
    np.testing.assert_allclose(result.boxes, expected, rtol=0, atol=1e-4)

    reference = SamPredictor(build_sam("auto", checkpoint=tiny_sam_checkpoint))
    reference.set_image(photo)
    input_boxes = reference.transform.apply_boxes_torch(torch.as_tensor(expected), photo.shape[:2])
    masks, _, _ = reference.predict_torch(None, None, boxes=input_boxes, multimask_output=False)
    np.testing.assert_array_equal(result.masks, masks[:, 0].numpy())

    for annotation in result.to_coco(image_id=1):
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
    result.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    boxes = np.array([obj["box"] for obj in saved["objects"]])
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= width).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= height).all()


def test_a_hand_made_segmentation_gets_clipped_boxes_and_bad_boxes_are_refused():
    from langsam.result import Segmentation

    masks = np.zeros((1, 10, 20), bool)
    seg = Segmentation(masks, [[-5, 2, 25, 12]], [1.0], [1.0], ["x"], (10, 20))
    np.testing.assert_array_equal(seg.boxes, [[0, 2, 20, 10]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        Segmentation(masks, [[np.nan, 0, 1, 1]], [1.0], [1.0], ["x"], (10, 20))
    with pytest.raises(ValueError, match="x1 >= x0"):
        Segmentation(masks, [[5, 0, 1, 1]], [1.0], [1.0], ["x"], (10, 20))
