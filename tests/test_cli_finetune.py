"""`langsam finetune` end to end on a tiny random SAM (official .pth) and a PNG-mask dataset."""

from __future__ import annotations

import json

import pytest
import torch

from langsam import cli
from langsam.cli import finetune as finetune_command
from sam import build_sam
from sam.training.synthetic import make_shapes_dataset
from test_cli_segment import run_main


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


QUICK = ["--device", "cpu", "--epochs", "1", "--batch-size", "2", "--objects-per-image", "2", "--points", "0",
         "--refine-rounds", "0", "--warmup-steps", "0", "--lr", "1e-3", "-q"]


@pytest.fixture()
def registered():
    """The command is in ``langsam``'s command table (so ``langsam.cli.main`` dispatches to it)."""
    assert finetune_command in cli.COMMANDS


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("finetune_cli") / "shapes", num_images=3,
                               image_size=(80, 100), seed=8)


def test_run_stop_resume_and_outputs(registered, dataset_dir, tiny_sam_checkpoint, tmp_path):
    out = tmp_path / "run"
    base = ["finetune", str(dataset_dir), "--out", str(out), "--sam-checkpoint", str(tiny_sam_checkpoint),
            "--val-fraction", "0.34", *QUICK, "--batch-size", "1"]  # 2 steps per epoch
    status, stdout, stderr = run_main([*base, "--max-steps", "1"])
    assert status == 0, stderr
    assert "train: 2 images" in stdout and "val: 1 images" in stdout
    assert "stopped after step 1 (--max-steps); resume with --resume" in stdout
    code, _, stderr = run_main(base)
    assert code == 2 and "already holds a run: add --resume" in stderr

    status, stdout, stderr = run_main([*base, "--resume"])
    assert status == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert "best weights:" in stdout and "val 1 click" in stdout
    tuned = build_sam("auto", checkpoint=out / "best.pth")
    original = build_sam("auto", checkpoint=tiny_sam_checkpoint)
    for name, value in original.state_dict().items():
        if not name.startswith("mask_decoder."):
            assert torch.equal(tuned.state_dict()[name], value), name
    assert (out / "best.safetensors").is_file() and (out / "last.pth").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--encoder-blocks", "1", "--lora-rank", "2"], "either train_encoder_blocks or lora_rank"),
    (["--train", "decoder,everything"], "unknown part everything"),
    (["--lora-targets", "mlp"], "LoRA targets must be qkv and/or proj"),
    (["--resume"], "no stopped run"),
    (["--val-fraction", "1"], "--val-fraction must be below 1"),
])
def test_usage_errors(registered, dataset_dir, tiny_sam_checkpoint, tmp_path, argv, message):
    code, _, stderr = run_main(["finetune", str(dataset_dir), "--out", str(tmp_path / "o"), "--sam-checkpoint",
                                str(tiny_sam_checkpoint), *argv])
    assert code == 2 and message in stderr


def test_bad_annotations_stop_with_the_file_and_id(registered, tiny_sam_checkpoint, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg", "height": 4, "width": 4}],
                               "categories": [{"id": 1, "name": "x"}],
                               "annotations": [{"id": 5, "image_id": 1, "category_id": 1,
                                                "segmentation": [[0, 0, 9, 0, 9, 2]]}]}))
    code, _, stderr = run_main(["finetune", str(bad), "--out", str(tmp_path / "o"), "--sam-checkpoint",
                                str(tiny_sam_checkpoint)])
    assert code == 1 and "bad.json: annotation 5: polygon outside the image: point (9, 0)" in stderr


def test_entry_function_directly(dataset_dir, tiny_sam_checkpoint, tmp_path):
    """Without the command table: the module's own parser and run()."""
    import argparse

    parser = argparse.ArgumentParser(prog="langsam")
    finetune_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", str(dataset_dir), "--out", str(tmp_path / "direct"), "--sam-checkpoint",
                              str(tiny_sam_checkpoint), "--val-fraction", "0", "--max-steps", "1", *QUICK])
    assert args.handler(args) == 0
    assert (tmp_path / "direct" / "best.pth").is_file()  # no validation set: the last weights
