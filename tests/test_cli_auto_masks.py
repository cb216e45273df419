"""`langsam auto-masks` end to end on a tiny random SAM saved as an official-layout .pth."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from langsam import cli
from langsam.cli.options import AMG_OPTIONS
from test_cli_segment import make_input_tree, run_main, snapshot

# Few points and no quality filter: a random SAM then yields a handful of masks per image, fast.
AMG_FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
             "--box-nms-thresh", "0.95"]
AMG_PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.95}
FILES = ["a/photo.png", "b/photo.png", "broken.jpg"]
ANNOTATION_KEYS = {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords",
                   "crop_box"}


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, tiny_sam_checkpoint):
    workspace = tmp_path_factory.mktemp("cli_auto_masks")
    expected = make_input_tree(workspace / "photos")
    out = workspace / "out"
    before = snapshot(workspace, out)
    argv = ["auto-masks", *(str(workspace / "photos" / name) for name in FILES), "--out", str(out),
            "--checkpoint", str(tiny_sam_checkpoint), "--device", "cpu", "--png", *AMG_FLAGS]
    status, stdout, stderr = run_main(argv)
    return {"workspace": workspace, "out": out, "expected": expected, "argv": argv, "before": before,
            "status": status, "stdout": stdout, "stderr": stderr}


def results(out) -> dict[str, tuple]:
    """{file_name: (json path, SA-1B dict)} for every finished image under ``out``."""
    found = {}
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        found[data["image"]["file_name"]] = (path, data)
    return found


def test_status_summary_and_failure_report(auto_run):
    assert auto_run["status"] == 1
    assert "broken.jpg: corrupt or truncated image" in auto_run["stderr"]
    total = sum(len(data["annotations"]) for _, data in results(auto_run["out"]).values())
    assert "3 images: 2 processed, 0 skipped, 1 failed" in auto_run["stdout"]
    assert f"masks: {total}\n" in auto_run["stdout"]
    assert snapshot(auto_run["workspace"], auto_run["out"]) == auto_run["before"]


def test_sa1b_json_per_image(auto_run):
    found = results(auto_run["out"])
    assert set(found) == {"a/photo.png", "b/photo.png"}  # same base names kept apart
    for file_name, (path, data) in found.items():
        height, width = auto_run["expected"][file_name]
        assert data["image"]["height"] == height and data["image"]["width"] == width
        assert len(data["annotations"]) >= 1
        masks_dir = path.with_name(path.stem + "_masks")
        overlay = Image.open(masks_dir / cli.OVERLAY_NAME)
        assert overlay.size == (width, height)
        for number, annotation in enumerate(data["annotations"], start=1):
            assert set(annotation) == ANNOTATION_KEYS and annotation["id"] == number
            rle = {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
            decoded = mask_utils.decode(rle).astype(bool)
            assert decoded.shape == (height, width)
            assert annotation["area"] == decoded.sum()
            np.testing.assert_allclose(annotation["bbox"], mask_utils.toBbox(rle), atol=1.0)
            assert annotation["crop_box"] == [0, 0, width, height]  # crop_n_layers 0: the whole image
            (x, y), = annotation["point_coords"]
            assert 0 <= x <= width and 0 <= y <= height
            png = np.array(Image.open(masks_dir / f"{number:03d}.png")) > 127
            np.testing.assert_array_equal(png, decoded)


def test_masks_match_the_generator_called_directly(auto_run, tiny_sam_checkpoint):
    from langsam.io import load_image
    from sam import SamAutomaticMaskGenerator, build_sam

    image = load_image(auto_run["workspace"] / "photos" / "b" / "photo.png")
    generator = SamAutomaticMaskGenerator(build_sam("auto", checkpoint=tiny_sam_checkpoint), output_mode="coco_rle",
                                          **AMG_PARAMS)
    direct = generator.generate(image)
    _, data = results(auto_run["out"])["b/photo.png"]
    assert len(data["annotations"]) == len(direct)
    for annotation, mask in zip(data["annotations"], direct):
        assert annotation["segmentation"]["counts"] == mask["segmentation"]["counts"]
        assert annotation["predicted_iou"] == pytest.approx(float(mask["predicted_iou"]), abs=1e-5)
        assert annotation["stability_score"] == pytest.approx(float(mask["stability_score"]), abs=1e-5)


def test_skip_existing_leaves_finished_images_alone(auto_run, monkeypatch):
    out = auto_run["out"]
    found = results(out)
    mtimes = {name: path.stat().st_mtime_ns for name, (path, _) in found.items()}
    # Only broken.jpg is unfinished and it cannot be decoded, so no model may even be built.
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    status, stdout, stderr = run_main([*auto_run["argv"], "--skip-existing"])
    assert status == 1 and "broken.jpg" in stderr
    assert "3 images: 0 processed, 2 skipped, 1 failed" in stdout
    assert {name: path.stat().st_mtime_ns for name, (path, _) in results(out).items()} == mtimes


def test_every_generator_parameter_has_a_flag():
    from sam import SamAutomaticMaskGenerator

    official = [name for name, parameter in inspect.signature(SamAutomaticMaskGenerator).parameters.items()
                if parameter.kind is parameter.POSITIONAL_OR_KEYWORD]
    exposed = [name for name, _, _ in AMG_OPTIONS]
    # The model is the checkpoint flags; point_grids is an array; output_mode is fixed to SA-1B's RLE.
    assert sorted(exposed) == sorted(set(official) - {"model", "point_grids", "output_mode"})
    status, stdout, _ = run_main(["auto-masks", "--help"])
    assert status == 0
    for name in exposed:
        assert "--" + name.replace("_", "-") in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model-type", "auto"], "pass --sam-checkpoint"),
        (["--points-per-side", "0"], "must be at least 1"),
        (["--box-nms-thresh", "2"], "between 0 and 1"),
        (["--checkpoint", "/no/such.pth"], "is not a file"),
    ],
)
def test_usage_errors_exit_2(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    status, _, stderr = run_main(["auto-masks", str(tmp_path / "img.png"), "--out", str(tmp_path / "o"), *extra])
    assert status == 2 and message in stderr
    status, _, stderr = run_main(["auto-masks", "--out", str(tmp_path / "o")])
    assert status == 2 and "no INPUT given" in stderr


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was built")


def test_demo_forwards_its_arguments(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("langsam.demo")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(__import__("sys").modules, "langsam.demo", fake)
    assert cli.main(["demo", "--host", "0.0.0.0", "--port", "7861", "--sam-type", "vit_h"]) == 0
    assert seen == [["--host", "0.0.0.0", "--port", "7861", "--sam-type", "vit_h"]]
