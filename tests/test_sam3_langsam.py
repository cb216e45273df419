"""SAM 3 as langsam's concept model (``model="sam3"``) in every entry point, on one tiny random SAM 3
(tests/sam3_factory.py) saved in Meta's layout (what LangSAM loads) and in transformers' layout (what
the reference `Sam3Predictor` loads). `Sam3Predictor` itself is checked against transformers'
`Sam3Model` in tests/test_sam3_model.py; here every entry point must give exactly its results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from sam3_factory import save_tiny_sam3
from sam3_langsam_support import AreaClipScorer, assert_fills_nontrivial, expected_segment, reference_predictor
from sam_factory import real_photo
from test_cli_segment import run_main

from langsam.pipeline import LangSAM
from langsam.weights import WeightsUnavailableError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERIES = ["a cat", "a red sofa"]
EXEMPLARS = [((40.0, 30.0, 150.0, 120.0), True), ((160.0, 10.0, 220.0, 60.0), False)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3_langsam"))


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(real_photo("chelsea")[::2, ::2])  # 150 x 226


@pytest.fixture(scope="module")
def reference(checkpoints):
    return reference_predictor(checkpoints["transformers"])


@pytest.fixture(scope="module")
def threshold(reference, photo):
    """The median score of the first query: about half of the instances pass, so the cut matters."""
    reference.set_image(photo)
    return float(np.median(reference.predict(text=QUERIES[0], threshold=0.0).scores))


@pytest.fixture(scope="module")
def pipeline(checkpoints):
    return LangSAM(model="sam3", sam3_checkpoint=checkpoints["meta"], device="cpu")


def assert_equals_expected(result, expected) -> None:
    assert result.labels == expected["labels"]
    np.testing.assert_array_equal(result.scores, expected["scores"])
    np.testing.assert_array_equal(result.masks, expected["masks"])
    np.testing.assert_allclose(result.boxes, np.clip(expected["boxes"], 0, [226, 150, 226, 150]), atol=1e-4)


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


def test_segment_equals_sam3_predictor(pipeline, reference, photo, threshold):
    result = pipeline.segment(photo, "a cat. a red sofa", box_threshold=threshold)
    expected = expected_segment(reference, photo, QUERIES, threshold)
    assert set(result.labels) == set(QUERIES) and result.mode == "grounded"
    assert_equals_expected(result, expected)
    assert_fills_nontrivial(result.masks)
    assert result.masks.shape[1:] == photo.shape[:2]  # full resolution
    np.testing.assert_array_equal(result.mask_scores, result.scores)  # SAM 3 has no mask-quality head
    assert (np.diff(result.scores) <= 0).all()
    top = pipeline.segment(photo, QUERIES, box_threshold=threshold, top_k=2)
    np.testing.assert_array_equal(top.masks, result.masks[:2])
    # The second and third calls on the same image ran no image pass.
    assert pipeline.sam3_predictor.image_passes == 1


def test_exemplars_with_and_without_text(pipeline, reference, photo, threshold):
    positive = pipeline.segment(photo, "a cat", box_threshold=0.0, exemplars=EXEMPLARS[:1])
    assert_equals_expected(positive, expected_segment(reference, photo, ["a cat"], 0.0, EXEMPLARS[:1]))
    text_only = pipeline.segment(photo, "a cat", box_threshold=0.0)
    negative = pipeline.segment(photo, "a cat", box_threshold=0.0, exemplars=[(EXEMPLARS[0][0], False)])
    # The box and its sign both reach the model: each prompt scores the instances differently.
    assert np.abs(positive.scores - text_only.scores).max() > 1e-3
    assert np.abs(positive.scores - negative.scores).max() > 1e-3
    reference.set_image(photo)
    cut = float(np.median(reference.predict(exemplars=EXEMPLARS, threshold=0.0).scores))
    expected = reference.predict(exemplars=EXEMPLARS, threshold=cut)
    alone = pipeline.segment(photo, None, box_threshold=cut, exemplars=EXEMPLARS)
    assert len(alone) > 0 and alone.labels == ["exemplar"] * len(alone)
    np.testing.assert_array_equal(alone.scores, np.sort(expected.scores)[::-1])
    assert_fills_nontrivial(alone.masks)


def test_hybrid_verifies_sam3_objects_with_clip(checkpoints, photo, threshold):
    scorer = AreaClipScorer()
    pipeline = LangSAM(model="sam3", sam3_checkpoint=checkpoints["meta"], device="cpu", clip_scorer=scorer)
    grounded = pipeline.segment(photo, QUERIES, box_threshold=threshold)
    fills = grounded.masks.reshape(len(grounded), -1).mean(axis=1)
    cut = float(np.median(fills))
    hybrid = pipeline.segment(photo, QUERIES, box_threshold=threshold, mode="hybrid", clip_threshold=cut)
    keep = fills >= cut
    assert 0 < keep.sum() < len(grounded) and hybrid.mode == "hybrid"
    np.testing.assert_array_equal(hybrid.masks, grounded.masks[keep])
    np.testing.assert_allclose(hybrid.clip_scores, fills[keep].astype(np.float32))
    assert scorer.calls[-1] == (grounded.labels, QUERIES)


def test_bad_inputs_get_clear_errors(pipeline, photo, checkpoints, tiny_sam_checkpoint):
    passes = pipeline.sam3_predictor.image_passes
    cases = [
        (dict(text="a cat", exemplars=[((10, 10, 300, 50), True)]), "outside the 226x150 image"),
        (dict(text="a cat", exemplars=[((-1, 10, 30, 50), True)]), "outside"),
        (dict(text="a cat", exemplars=[((30, 10, 30, 50), True)]), "is empty"),
        (dict(text="a cat", exemplars=[((float("nan"), 10, 30, 50), True)]), "NaN"),
        (dict(text="a cat", exemplars=[((1, 2, 3), True)]), "exemplar 0 must be"),
        (dict(text="a cat", exemplars=[((1, 2, 3, 4), "yes")]), "exemplar 0 must be"),
        (dict(text="a cat", exemplars=[(1, 2, 3, 4)]), "exemplar 0 must be"),
        (dict(text="a cat", exemplars="10,10,20,20"), "list of"),
        (dict(text=""), "or exemplar boxes"),
        (dict(text=" . ", exemplars=[]), "text is empty"),
        (dict(text=None, exemplars=EXEMPLARS, mode="hybrid"), "needs text"),
        (dict(text="a cat", mode="clip"), "mode='clip'"),
        (dict(text="a cat", model="sam4"), "model must be one of grounding-dino, sam3"),
        (dict(text="a cat", exemplars=EXEMPLARS, model="grounding-dino"), "need model='sam3'"),
    ]
    for kwargs, message in cases:
        text = kwargs.pop("text")
        with pytest.raises(ValueError, match=message):
            pipeline.segment(photo, text, **kwargs)
    assert pipeline.sam3_predictor.image_passes == passes  # refused before any image pass
    with pytest.raises(ValueError, match="does not exist"):
        LangSAM(model="sam3", sam3_checkpoint=checkpoints["meta"].parent / "missing.pt")
    with pytest.raises(ValueError, match="model must be one of"):
        LangSAM(model="SAM3")
    with pytest.raises(ValueError, match='use LangSAM\\(model="sam3"\\)'):  # a registry name, not a box-mask SAM
        LangSAM(sam_type="sam3")
    with pytest.raises(WeightsUnavailableError, match="sam3_checkpoint=PATH"):  # the gated hub row; offline here
        LangSAM(model="sam3", device="cpu").segment(photo, "a cat")
    with pytest.raises(ValueError, match="looks like a SAM 1 checkpoint"):  # sam.build.CheckpointError
        LangSAM(model="sam3", sam3_checkpoint=tiny_sam_checkpoint, device="cpu").segment(photo, "a cat")
    with pytest.raises(ValueError, match="float32"):
        LangSAM(model="sam3", sam3_checkpoint=checkpoints["meta"], dtype="bf16").segment(photo, "a cat")
    with pytest.raises(ValueError, match="without the video tracker"):  # this file has the image model only
        pipeline.track([photo], "a cat")


# ------------------------------------------------------------------------------------------
# The command line: segment and eval
# ------------------------------------------------------------------------------------------


def test_cli_segment_writes_the_pipeline_masks(pipeline, photo, checkpoints, tmp_path):
    Image.fromarray(photo).save(tmp_path / "cat.png")
    threshold = float(np.median(pipeline.segment(photo, "a cat", box_threshold=0.0, exemplars=EXEMPLARS).scores))
    out = tmp_path / "out"
    status, stdout, stderr = run_main(["segment", str(tmp_path / "cat.png"), "--text", "a cat", "--model", "sam3",
                                       "--sam3-checkpoint", str(checkpoints["meta"]), "--exemplar", "40,30,150,120",
                                       "--exemplar", "160,10,220,60:neg", "--box-threshold", str(threshold),
                                       "--device", "cpu", "--out", str(out), "-q"])
    assert status == 0, stderr
    expected = pipeline.segment(photo, "a cat", box_threshold=threshold, exemplars=EXEMPLARS)
    record = json.loads((out / "cat" / "result.json").read_text())
    assert len(expected) > 0 and [obj["label"] for obj in record["objects"]] == expected.labels
    np.testing.assert_allclose([obj["score"] for obj in record["objects"]], expected.scores, rtol=1e-6)
    for obj, mask in zip(record["objects"], expected.masks):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "cat" / obj["mask_file"])) > 0, mask)
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["a cat"] and len(coco["annotations"]) == len(expected)
    # Exemplars alone: one category, "exemplar".
    status, _, stderr = run_main(["segment", str(tmp_path / "cat.png"), "--model", "sam3", "--sam3-checkpoint",
                                  str(checkpoints["meta"]), "--exemplar", "40,30,150,120", "--box-threshold",
                                  str(threshold), "--device", "cpu", "--out", str(tmp_path / "alone"), "-q"])
    assert status == 0, stderr
    coco = json.loads((tmp_path / "alone" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["exemplar"] and coco["annotations"]


@pytest.mark.parametrize("argv, message", [
    (["--text", "a cat", "--exemplar", "1,2,30,40"], "--exemplar boxes need --model sam3"),
    (["--text", "a cat", "--model", "sam3", "--exemplar", "1,2,30"], "expected x0,y0,x1,y1"),
    (["--text", "a cat", "--model", "sam3", "--exemplar", "1,2,30,40:maybe"], "expected x0,y0,x1,y1"),
    (["--text", "a cat", "--model", "sam3", "--exemplar", "30,2,30,40"], "is empty"),
    (["--text", "a cat", "--model", "sam3", "--mode", "clip"], "--mode clip ranks"),
    (["--text", "a cat", "--model", "sam9"], "unknown --model 'sam9'"),
    (["--model", "sam3"], "no queries"),
])
def test_cli_usage_errors(argv, message, tmp_path):
    Image.new("RGB", (32, 24)).save(tmp_path / "x.png")
    status, _, stderr = run_main(["segment", str(tmp_path / "x.png"), "--out", str(tmp_path / "out"), *argv])
    assert status == 2 and message in stderr, stderr


def test_cli_eval_sam3_ap_equals_pycocotools(pipeline, checkpoints, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from sam.training.data import load_dataset
    from sam.training.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", num_images=2, image_size=(80, 100), seed=7)
    report = tmp_path / "report.json"
    status, stdout, stderr = run_main(["eval", str(root), "--prompts", "text", "--model", "sam3", "--sam3-checkpoint",
                                       str(checkpoints["meta"]), "--box-threshold", "0.05", "--device", "cpu",
                                       "--report", str(report), "-q"])
    assert status == 0, stderr
    text = json.loads(report.read_text())["text"]
    assert text["model"] == "sam3"
    dataset = load_dataset(root)
    category_ids = {name: index for index, name in enumerate(dataset.categories, start=1)}
    detections = []
    for index, record in enumerate(dataset):
        found = pipeline.segment(dataset.load_image(index), dataset.categories, box_threshold=0.05)
        detections += found.to_coco(image_id=record.image_id, category_ids=category_ids)
    assert detections
    gt = COCO()
    gt.dataset = dataset.to_coco()
    gt.createIndex()
    evaluator = COCOeval(gt, gt.loadRes(detections), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    np.testing.assert_allclose(text["modes"]["grounded"]["coco_stats"], evaluator.stats)
    assert text["modes"]["grounded"]["detections"] == len(detections)


# ------------------------------------------------------------------------------------------
# langsam serve
# ------------------------------------------------------------------------------------------


def test_serve_worker_answers_the_pipeline_json(pipeline, photo, checkpoints, tiny_sam_checkpoint):
    """The /v1/segment path in-process (a real server costs a minute here; tests/test_serve.py runs
    one): form fields -> SegmentParams -> the worker's LangSAMAPI (setup, batched predict,
    encode_response) -> the JSON body, against the pipeline's own result encoded the same way."""
    import time

    from langsam.serve import ServeConfig
    from langsam.serve.api import Job, LangSAMAPI
    from langsam.serve.schemas import SegmentParams, _encode_segmentation

    models = {"model": "sam3", "sam3_checkpoint": str(checkpoints["meta"]), "sam_type": "auto",
              "sam_checkpoint": str(tiny_sam_checkpoint), "device": "cpu"}
    api = LangSAMAPI(ServeConfig(models=models))
    api.setup("cpu")
    assert api.pipeline.model == "sam3" and api.pipeline._sam3 is not None  # SAM 3 loaded at start
    deadline = time.monotonic() + 600
    form = SegmentParams.model_validate({"text": "a cat", "model": "sam3", "box_threshold": "0", "top_k": "3",
                                         "exemplars": "40,30,150,120; 160,10,220,60:neg"})
    as_json = SegmentParams.model_validate({"box_threshold": 0.0, "top_k": 2,
                                            "exemplars": json.dumps([[[40, 30, 150, 120], True]])})
    outside = SegmentParams.model_validate({"text": "a cat", "exemplars": [[[40, 30, 500, 120], True]]})
    jobs = [Job("segment", form.job_settings(["a cat"]), deadline, photo),
            Job("segment", as_json.job_settings([]), deadline, photo),
            Job("segment", outside.job_settings(["a cat"]), deadline, photo)]
    answers = [api.encode_response(output) for output in api.predict(jobs)]
    expected = [pipeline.segment(photo, "a cat", box_threshold=0.0, exemplars=EXEMPLARS, top_k=3),
                pipeline.segment(photo, None, box_threshold=0.0, exemplars=EXEMPLARS[:1], top_k=2)]
    for (status, body), result in zip(answers, expected):
        assert status == 200 and len(result) > 0
        assert body == json.loads(json.dumps(_encode_segmentation(result)))
    assert answers[2][0] == 400 and "outside the 226x150 image" in answers[2][1]["detail"]
    for fields, message in [({"exemplars": "40,30,150"}, "exemplars"), ({"exemplars": "1,2,3,4:maybe"}, ":pos or :neg"),
                            ({"model": "sam9"}, "model"), ({"exemplars": "[1, 2"}, "not valid JSON")]:
        with pytest.raises(ValueError, match=message):
            SegmentParams.model_validate({"text": "a cat", **fields})


# ------------------------------------------------------------------------------------------
# The demo's text tab
# ------------------------------------------------------------------------------------------


def test_demo_text_tab_runs_sam3_with_exemplars(pipeline, photo, tmp_path):
    from langsam.demo import build_app
    from langsam.demo.text_tab import add_corner, object_rows, parse_exemplar_text

    # Two clicks (any two opposite corners) give one box line; the second box is negative.
    text, corner = add_corner("", None, (150, 120), False)
    assert (text, corner) == ("", (150, 120))
    text, corner = add_corner(text, corner, (40, 30), False)
    text, corner = add_corner(*add_corner(text, None, (160, 60), True), (220, 10), True)
    assert text == "40,30,150,120\n160,10,220,60:neg" and corner is None
    assert parse_exemplar_text(text) == EXEMPLARS
    with pytest.raises(ValueError, match="exemplar line 2"):
        parse_exemplar_text("40,30,150,120\n1,2,3")
    app = build_app(pipeline)
    assert app.fns  # the page builds with the model choice and the exemplar field
    run = next(fn for fn in app.fns.values() if fn.api_name == "segment_text").fn
    Image.fromarray(photo).save(tmp_path / "cat.png")
    overlay, gallery, rows, coco_path, zip_path, status = run(str(tmp_path / "cat.png"), "cat", "grounded", 0.0, 0.25,
                                                              0.5, False, 3, None, None, None, "sam3", text)
    expected = pipeline.segment(photo, "cat", box_threshold=0.0, exemplars=EXEMPLARS, top_k=3)
    assert len(expected) == 3 and rows == object_rows(expected)
    coco = json.loads(open(coco_path).read())
    for annotation, mask in zip(coco["annotations"], expected.masks):
        np.testing.assert_array_equal(mask_utils.decode(annotation["segmentation"]).astype(bool), mask)


# ------------------------------------------------------------------------------------------
# Ray workers
# ------------------------------------------------------------------------------------------


def test_ray_worker_builds_sam3_and_equals_local(pipeline, photo, checkpoints):
    """What a `--ray` worker runs, in this process (tests/test_distributed.py runs the cluster):
    its builder loads SAM 3 alone (no SAM, no Grounding DINO) and its rows equal the local result."""
    from langsam.distributed import PipelineBuilder, segment_row

    worker = PipelineBuilder("grounded", model="sam3", sam3_checkpoint=str(checkpoints["meta"]), device="cpu")()
    assert worker._sam3 is not None and worker._predictor is None and worker._detector is None
    options = {"mode": "grounded", "box_threshold": 0.0, "top_k": 4, "exemplars": EXEMPLARS}
    row = segment_row(worker, photo, {}, text=["a cat"], options=options)
    expected = pipeline.segment(photo, ["a cat"], **options)
    assert len(expected) == 4 and row["labels"] == expected.labels
    np.testing.assert_array_equal(np.asarray(row["scores"], np.float32), expected.scores)
    decoded = [mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
               for rle in row["segmentation"]]
    np.testing.assert_array_equal(np.stack(decoded), expected.masks)
