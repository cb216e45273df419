"""`langsam eval` end to end on a tiny random SAM (official .pth) and a PNG-mask dataset."""

from __future__ import annotations

import json

import pytest

from langsam import cli
from langsam.cli import evaluate as evaluate_command
from sam import SamPredictor, build_sam
from sam.evaluation import evaluate_prompts
from sam.training.data import load_dataset
from sam.training.synthetic import make_shapes_dataset
from test_cli_segment import run_main
from tiny_gdino import save_tiny_grounding_dino


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture()
def registered():
    """The command is in ``langsam``'s command table (so ``langsam.cli.main`` dispatches to it)."""
    assert evaluate_command in cli.COMMANDS


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("eval_cli") / "shapes", num_images=2, image_size=(80, 100),
                               seed=7)


def test_points_and_box_report_and_table(registered, dataset_dir, tiny_sam_checkpoint, tmp_path):
    report = tmp_path / "report.json"
    status, stdout, stderr = run_main(["eval", str(dataset_dir), "--sam-checkpoint", str(tiny_sam_checkpoint),
                                       "--device", "cpu", "--clicks", "2", "--report", str(report), "-q"])
    assert status == 0, stderr
    data = json.loads(report.read_text())
    dataset = load_dataset(dataset_dir)
    expected = evaluate_prompts(SamPredictor(build_sam("auto", checkpoint=tiny_sam_checkpoint)), dataset,
                                num_clicks=2).summary()
    overall = data["prompts"]["overall"]
    for key in ("miou_click_1", "miou_click_1_oracle", "miou_click_2", "miou_box"):
        assert overall[key] == pytest.approx(expected[key]), key
    assert data["dataset"]["objects"] == dataset.num_objects and data["dataset"]["categories"] == dataset.categories
    assert set(data["prompts"]["per_category"]) == set(dataset.categories) & {o["category"] for o in data["prompts"]["objects"]}
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("category"))
    assert header.split() == ["category", "objects", "1", "click", "1", "click", "(oracle)", "2", "clicks", "box"]
    row = next(line for line in lines if line.startswith("all "))
    assert row.split()[1] == str(dataset.num_objects) and f"{expected['miou_box']:.3f}" in row
    assert f"report: {report}" in stdout


def test_text_prompts_grounded_ap(registered, dataset_dir, tiny_sam_checkpoint, tmp_path):
    detector = save_tiny_grounding_dino(tmp_path / "gdino", seed=0)
    report = tmp_path / "text.json"
    status, stdout, stderr = run_main(["eval", str(dataset_dir), "--prompts", "text", "--sam-checkpoint",
                                       str(tiny_sam_checkpoint), "--detector", str(detector), "--device", "cpu",
                                       "--box-threshold", "0.05", "--text-threshold", "0.05", "--max-images", "1",
                                       "--report", str(report), "-q"])
    assert status == 0, stderr
    text = json.loads(report.read_text())["text"]
    grounded = text["modes"]["grounded"]
    assert text["queries"] == load_dataset(dataset_dir).categories
    assert set(grounded) == {"ap", "ap50", "ap75", "detections", "coco_stats", "per_category"}
    assert grounded["ap"] is not None and 0.0 <= grounded["ap"] <= 1.0 and len(grounded["coco_stats"]) == 12
    assert "COCO mask AP" in stdout and "grounded" in stdout


@pytest.mark.parametrize("argv, status, message", [
    (["--prompts", "points,colour"], 2, "unknown prompts colour"),
    (["--modes", "psychic"], 2, "unknown modes psychic"),
    (["--clicks", "0"], 2, "must be at least 1"),
])
def test_usage_errors(registered, dataset_dir, tiny_sam_checkpoint, argv, status, message):
    code, _, stderr = run_main(["eval", str(dataset_dir), "--sam-checkpoint", str(tiny_sam_checkpoint), *argv])
    assert code == status and message in stderr


def test_missing_and_bad_datasets(registered, tiny_sam_checkpoint, tmp_path):
    code, _, stderr = run_main(["eval", str(tmp_path / "nope.json"), "--sam-checkpoint", str(tiny_sam_checkpoint)])
    assert code == 2 and "does not exist" in stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": ""}], "annotations": []}))
    code, _, stderr = run_main(["eval", str(bad), "--sam-checkpoint", str(tiny_sam_checkpoint)])
    assert code == 1 and "bad.json: category 1 has an empty name" in stderr


def test_entry_function_directly(dataset_dir, tiny_sam_checkpoint, tmp_path, capsys):
    """Without the command table: the module's own parser and run()."""
    import argparse

    parser = argparse.ArgumentParser(prog="langsam")
    evaluate_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(dataset_dir), "--sam-checkpoint", str(tiny_sam_checkpoint), "--device",
                              "cpu", "--prompts", "box", "--max-images", "1", "--report", str(tmp_path / "r.json"),
                              "-q"])
    assert args.handler(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dataset"]["images"] == 1 and "miou_click_1" not in report["prompts"]["overall"]
    assert "miou_box" in report["prompts"]["overall"] and "box" in capsys.readouterr().out
