"""`langsam segment` end to end, on tiny random models saved in the real formats (an
official-layout SAM .pth, a save_pretrained Grounding DINO folder, an open_clip local dir)
and a folder of real photos with every awkward case the command must survive."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from langsam import cli
from langsam.cli import main
from langsam.detector import parse_queries
from sam_factory import real_photo
from tiny_clip import save_tiny_clip
from tiny_gdino import save_tiny_grounding_dino

REPO = Path(__file__).resolve().parents[1]
# "../../outside" and the slash/unicode query must never become paths outside --out.
TEXT_QUERIES = ["a cat", "../../outside"]
FILE_QUERIES = ["# a comment line", "", "chat/猫 \\ x", "A CAT"]  # "A CAT" duplicates "a cat"
QUERIES = parse_queries(TEXT_QUERIES + ["chat/猫 \\ x"])
TOP_K = 2  # tiny random detectors score every box ~1.0; top-k keeps SAM's decoder work small


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def make_input_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Write the test images under ``root``; return {relative path: displayed (H, W)} of the
    readable ones. Also writes ``broken.jpg`` (truncated JPEG) and ``notes.txt`` (not an image)."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for folder, name in (("a", "chelsea"), ("b", "coffee")):  # same base name, different folders
        (root / folder).mkdir(exist_ok=True)
        image = real_photo(name)[::2, ::2]
        Image.fromarray(np.ascontiguousarray(image)).save(root / folder / "photo.png")
        expected[f"{folder}/photo.png"] = image.shape[:2]
    gray = Image.fromarray(real_photo("astronaut")).convert("L").resize((160, 128))
    gray.save(root / "gray.png")
    expected["gray.png"] = (128, 160)
    rocket = Image.fromarray(real_photo("rocket")).resize((150, 100))
    alpha = Image.linear_gradient("L").resize((150, 100))
    rocket.putalpha(alpha)
    rocket.save(root / "rgba.png")
    expected["rgba.png"] = (100, 150)
    # Stored 140 wide x 90 high with EXIF orientation 6 (rotate 90 clockwise): shown 90 x 140.
    stored = Image.fromarray(np.ascontiguousarray(real_photo("chelsea")[:90, :140]))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "rotated.jpg", exif=exif.tobytes(), quality=90)
    expected["rotated.jpg"] = (140, 90)
    full = io.BytesIO()
    Image.fromarray(real_photo("coffee")).save(full, format="JPEG")
    (root / "broken.jpg").write_bytes(full.getvalue()[:400])
    (root / "notes.txt").write_text("not an image, and not picked up from a folder\n")
    return expected


def snapshot(root: Path, skip: Path) -> dict[str, int]:
    """{path: size} of every file under ``root`` except those under ``skip``."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file() and skip not in path.parents:
            files[str(path.relative_to(root))] = path.stat().st_size
    return files


def run_main(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


class Calls:
    """Counts calls of a wrapped function (optionally only calls whose first argument passes a test)."""

    def __init__(self, function, when=lambda *args: True):
        self.function, self.when, self.count = function, when, 0

    def __call__(self, *args, **kwargs):
        if self.when(*args):
            self.count += 1
        return self.function(*args, **kwargs)


def instrument(patch: pytest.MonkeyPatch) -> dict[str, Calls]:
    """Count pipeline.segment calls, SAM image encodings and decodes of image files."""
    import langsam.io
    from langsam.pipeline import LangSAM
    from sam import SamPredictor

    calls = {
        "segment": Calls(LangSAM.segment),
        "encode": Calls(SamPredictor.set_image),
        "decode_file": Calls(langsam.io.load_image, lambda source, *rest: isinstance(source, (str, os.PathLike))),
    }
    patch.setattr(LangSAM, "segment", lambda self, *a, **k: calls["segment"](self, *a, **k))
    patch.setattr(SamPredictor, "set_image", lambda self, *a, **k: calls["encode"](self, *a, **k))
    patch.setattr(langsam.io, "load_image", calls["decode_file"])
    return calls


# ------------------------------------------------------------------------------------------
# One real run shared by the checks below
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sam_checkpoint) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("cli_models")
    return {
        "sam_checkpoint": str(tiny_sam_checkpoint),
        "detector": str(save_tiny_grounding_dino(folder / "gdino", seed=0)),
        "clip_local_dir": save_tiny_clip(folder / "clip", seed=0).local_dir,
    }


def model_flags(models: dict[str, str]) -> list[str]:
    return ["--sam-type", "auto", "--sam-checkpoint", models["sam_checkpoint"], "--detector", models["detector"],
            "--device", "cpu"]


@pytest.fixture(scope="module")
def segment_run(tmp_path_factory, models):
    workspace = tmp_path_factory.mktemp("cli_segment")
    inputs = workspace / "photos"
    expected = make_input_tree(inputs)
    queries_file = workspace / "queries.txt"
    queries_file.write_text("\n".join(FILE_QUERIES) + "\n", encoding="utf-8")
    out = workspace / "out"
    before = snapshot(workspace, out)
    argv = ["segment", str(inputs), *sum((["--text", q] for q in TEXT_QUERIES), []),
            "--queries-file", str(queries_file), "--out", str(out), *model_flags(models),
            "--box-threshold", "0", "--text-threshold", "0", "--top-k", str(TOP_K), "--batch-size", "2"]
    with pytest.MonkeyPatch.context() as patch:
        calls = instrument(patch)
        from langsam.detector import GroundingDinoDetector

        detectors = []
        original_load = GroundingDinoDetector.load
        patch.setattr(GroundingDinoDetector, "load", lambda self: detectors.append(self) or original_load(self))
        status, stdout, stderr = run_main(argv)
    return {
        "workspace": workspace, "inputs": inputs, "out": out, "expected": expected, "argv": argv,
        "status": status, "stdout": stdout, "stderr": stderr, "before": before,
        "calls": {name: c.count for name, c in calls.items()},
        "detector_passes": sum(d.forward_passes for d in set(detectors)),
    }


def records(out: Path) -> dict[str, dict]:
    """{file_name: per-image record} of every finished image under ``out``."""
    found = {}
    for path in sorted(out.glob(f"*/{cli.RECORD_NAME}")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["_folder"] = path.parent
        found[record["image"]["file_name"]] = record
    return found


def test_exit_status_and_reports(segment_run):
    assert segment_run["status"] == 1  # broken.jpg failed, the rest went on
    stderr = segment_run["stderr"]
    broken = segment_run["inputs"] / "broken.jpg"
    assert f"error: {broken}: corrupt or truncated image" in stderr
    assert "notes.txt" not in stderr  # folders contribute image files only
    stdout = segment_run["stdout"]
    assert "6 images: 5 processed, 0 skipped, 1 failed" in stdout
    per_query = {q: sum(o["label"] == q for r in records(segment_run["out"]).values() for o in r["objects"])
                 for q in QUERIES}
    for query, count in per_query.items():
        assert f"  {query}: {count}\n" in stdout
    assert sum(per_query.values()) == TOP_K * 5


def test_one_folder_per_image_with_right_sizes(segment_run):
    found = records(segment_run["out"])
    assert set(found) == set(segment_run["expected"])
    folders = {r["_folder"] for r in found.values()}
    assert len(folders) == 5  # a/photo.png and b/photo.png did not overwrite each other
    assert all(folder.parent == segment_run["out"] for folder in folders)
    for file_name, record in found.items():
        height, width = segment_run["expected"][file_name]
        assert (record["image"]["height"], record["image"]["width"]) == (height, width), file_name
        assert record["settings"]["queries"] == QUERIES
        overlay = Image.open(record["_folder"] / cli.OVERLAY_NAME)
        assert overlay.format == "JPEG" and overlay.size == (width, height)
        assert len(record["objects"]) == TOP_K
        for obj in record["objects"]:
            assert obj["label"] in QUERIES
            png = np.array(Image.open(record["_folder"] / obj["mask_file"])) > 127
            assert png.shape == (height, width)
            rle = {"size": obj["segmentation"]["size"], "counts": obj["segmentation"]["counts"].encode()}
            np.testing.assert_array_equal(png, mask_utils.decode(rle).astype(bool))
            assert obj["area"] == png.sum()
            x0, y0, x1, y1 = obj["box_xyxy"]
            np.testing.assert_allclose(obj["bbox"], [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
            assert obj["mask_file"].startswith(f"mask_{obj['index']:03d}_")


def test_nothing_written_outside_out(segment_run):
    workspace, out = segment_run["workspace"], segment_run["out"]
    assert snapshot(workspace, out) == segment_run["before"]
    for path in out.rglob("*"):
        assert out in path.resolve().parents
        assert not path.name.startswith(".") or path.name == ".", f"temporary file left behind: {path}"
    names = {obj["mask_file"] for r in records(out).values() for obj in r["objects"]}
    assert all("/" not in n and "\\" not in n and ".." not in n for n in names)


def test_coco_file_loads_with_pycocotools(segment_run):
    out = segment_run["out"]
    coco = COCO(str(out / cli.ANNOTATIONS_NAME))
    found = records(out)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == QUERIES
    assert sorted(img["file_name"] for img in coco.imgs.values()) == sorted(found)
    assert len(coco.anns) == sum(len(r["objects"]) for r in found.values()) == TOP_K * 5
    for image in coco.imgs.values():
        record = found[image["file_name"]]
        assert (image["height"], image["width"]) == (record["image"]["height"], record["image"]["width"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == len(record["objects"])
        for annotation, obj in zip(annotations, record["objects"]):
            assert coco.cats[annotation["category_id"]]["name"] == obj["label"]
            assert annotation["score"] == pytest.approx(obj["score"])
            png = np.array(Image.open(record["_folder"] / obj["mask_file"])) > 127
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), png)
    # The file is also a valid results file for COCOeval-style tools.
    assert len(coco.loadRes(coco.dataset["annotations"]).anns) == len(coco.anns)


def test_each_image_decoded_and_encoded_once_one_detector_pass(segment_run):
    calls = segment_run["calls"]
    assert calls["decode_file"] == 6  # five photos and broken.jpg, each read once
    assert calls["segment"] == 5
    assert calls["encode"] == 5  # one SAM embedding per image
    assert segment_run["detector_passes"] == 5  # all three queries in one caption per image


def test_resume_skips_finished_images_and_rebuilds_coco(segment_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(segment_run["out"], out)
    found = records(out)
    interrupted = found["rgba.png"]["_folder"]
    (interrupted / cli.RECORD_NAME).unlink()  # as if the run stopped before rgba.png finished
    (out / cli.ANNOTATIONS_NAME).unlink()
    mtimes = {name: (r["_folder"] / cli.RECORD_NAME).stat().st_mtime_ns
              for name, r in found.items() if name != "rgba.png"}
    argv = [*segment_run["argv"], "--skip-existing"]
    argv[argv.index("--out") + 1] = str(out)
    with pytest.MonkeyPatch.context() as patch:
        calls = instrument(patch)
        status, stdout, _ = run_main(argv)
    assert status == 1  # broken.jpg is still broken
    assert calls["segment"].count == 1 and calls["encode"].count == 1
    assert calls["decode_file"].count == 2  # rgba.png and broken.jpg; finished images are not read
    assert "6 images: 1 processed, 4 skipped, 1 failed" in stdout
    resumed = records(out)
    assert set(resumed) == set(found)
    assert {name: (r["_folder"] / cli.RECORD_NAME).stat().st_mtime_ns
            for name, r in resumed.items() if name != "rgba.png"} == mtimes
    # The rebuilt COCO file covers skipped and redone images alike, exactly as the first run.
    first = json.loads((segment_run["out"] / cli.ANNOTATIONS_NAME).read_text(encoding="utf-8"))
    again = json.loads((out / cli.ANNOTATIONS_NAME).read_text(encoding="utf-8"))
    assert again["images"] == first["images"] and again["categories"] == first["categories"]
    assert [(a["image_id"], a["category_id"], a["segmentation"]) for a in again["annotations"]] == \
           [(a["image_id"], a["category_id"], a["segmentation"]) for a in first["annotations"]]

    # Everything finished except broken.jpg: no model is even built.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
        status, stdout, _ = run_main(argv)
    assert status == 1 and "0 processed, 5 skipped, 1 failed" in stdout
    assert json.loads((out / cli.ANNOTATIONS_NAME).read_text(encoding="utf-8")) == again

    # Different queries make finished images stale: all of them are redone.
    class FakePipeline:
        segmented = 0

        def __init__(self, **kwargs):
            self.predictor = self.detector = self

        def load(self):
            return self

        def segment(self, image, queries, **kwargs):
            from langsam.result import Segmentation

            FakePipeline.segmented += 1
            return Segmentation.empty(image.shape[:2])

    changed = [*argv, "--text", "a hat"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("langsam.pipeline.LangSAM", FakePipeline)
        status, stdout, _ = run_main(changed)
    assert status == 1 and FakePipeline.segmented == 5
    coco = COCO(str(out / cli.ANNOTATIONS_NAME))
    assert len(coco.imgs) == 5 and len(coco.anns) == 0 and len(coco.cats) == len(QUERIES) + 1
    # The stale masks of the earlier run were removed with their records.
    assert not list(out.glob("*/mask_*.png"))


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was built")


def test_model_that_cannot_load_stops_the_run_once(tmp_path, tiny_sam_checkpoint):
    inputs = tmp_path / "in"
    make_input_tree(inputs)
    out = tmp_path / "out"
    status, stdout, stderr = run_main(["segment", str(inputs / "a"), str(inputs / "b"), "--text", "cat",
                                       "--out", str(out), "--sam-type", "auto", "--sam-checkpoint",
                                       str(tiny_sam_checkpoint), "--detector", str(tmp_path / "no-such-model")])
    assert status == 1
    assert stderr.count("cannot load the models") == 1 and "no-such-model" in stderr
    assert "error: " + str(inputs) not in stderr  # not blamed on each image
    assert not list(out.rglob(cli.RECORD_NAME))


# ------------------------------------------------------------------------------------------
# Usage errors: exit 2 before any model loads
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no queries"),
        (["--text", "  ", "--text", "."], "no queries"),
        (["--text", "a cat", "--mode", "magic"], "invalid choice: 'magic'"),
        (["--text", "a cat", "--box-threshold", "1.5"], "between 0 and 1"),
        (["--text", "a cat", "--save", "masks,pdf"], "unknown output pdf"),
        (["--text", "a cat", "--sam-type", "vit_q"], "unknown SAM type 'vit_q'"),
        (["--text", "a cat", "--sam-type", "auto"], "pass --sam-checkpoint"),
        (["--text", "a cat", "--device", "tpu"], "unknown device 'tpu'"),
        (["--text", "a cat", "--queries-file", "/no/such/file.txt"], "cannot read --queries-file"),
        (["--text", "a cat", "--batch-size", "0"], "must be at least 1"),
    ],
)
def test_usage_errors_exit_2_without_loading(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    Image.fromarray(real_photo("coffee")[:32, :32]).save(tmp_path / "img.png")
    status, _, stderr = run_main(["segment", str(tmp_path / "img.png"), "--out", str(tmp_path / "out"), *extra])
    assert status == 2
    assert message in stderr
    assert "usage: langsam segment" in stderr


def test_missing_inputs_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    out = str(tmp_path / "out")
    status, _, stderr = run_main(["segment", "--text", "cat", "--out", out])
    assert status == 2 and "no INPUT given" in stderr
    status, _, stderr = run_main(["segment", str(tmp_path / "nope.jpg"), "--text", "cat", "--out", out])
    assert status == 2 and "nope.jpg: no such file or folder" in stderr
    (tmp_path / "empty").mkdir()
    status, _, stderr = run_main(["segment", str(tmp_path / "empty"), "--text", "cat", "--out", out])
    assert status == 2 and "no image files found" in stderr
    assert not (tmp_path / "out" / cli.ANNOTATIONS_NAME).exists()


def test_environment_sets_model_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("LANGSAM_SAM_TYPE", "vit_l")
    monkeypatch.setenv("LANGSAM_DETECTOR", "IDEA-Research/grounding-dino-base")
    monkeypatch.setenv("LANGSAM_DEVICE", "cuda:1")
    monkeypatch.delenv("LANGSAM_CLIP_MODEL", raising=False)
    args = cli.build_parser().parse_args(["segment", "x.jpg", "--out", str(tmp_path), "--device", "cpu"])
    assert cli.model_kwargs_from_args(args) == {
        "sam_type": "vit_l", "detector": "IDEA-Research/grounding-dino-base", "device": "cpu"
    }  # the flag beats the environment; unset options are left to LangSAM's defaults
    monkeypatch.setenv("LANGSAM_SAM_TYPE", "huge")
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    status, _, stderr = run_main(["segment", str(tmp_path), "--text", "cat", "--out", str(tmp_path / "o")])
    assert status == 2 and "unknown SAM type 'huge'" in stderr


def test_help_documents_every_option_with_examples():
    status, stdout, _ = run_main(["segment", "--help"])
    assert status == 0
    for flag in ("--text", "--queries-file", "--out", "--mode", "--box-threshold", "--text-threshold",
                 "--clip-threshold", "--top-k", "--sam-type", "--sam-checkpoint", "--detector", "--clip-model",
                 "--clip-pretrained", "--device", "--save", "--skip-existing", "--batch-size", "--max-pixels",
                 "LANGSAM_SAM_CHECKPOINT", "examples:", "exit status"):
        assert flag in stdout, flag
    status, stdout, _ = run_main(["--help"])
    assert status == 0 and all(name in stdout for name in ("segment", "auto-masks", "demo"))


def test_pixel_limit_is_reported_with_the_flag_to_raise_it(tmp_path, monkeypatch):
    Image.fromarray(real_photo("coffee")).save(tmp_path / "big.png")  # 400 x 600 = 240000 pixels
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    status, stdout, stderr = run_main(["segment", str(tmp_path / "big.png"), "--text", "cup", "--out",
                                       str(tmp_path / "out"), "--max-pixels", "100000"])
    assert status == 1
    assert "240000 pixels" in stderr and "--max-pixels" in stderr
    assert "0 processed, 0 skipped, 1 failed" in stdout


# ------------------------------------------------------------------------------------------
# Real processes
# ------------------------------------------------------------------------------------------


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def console_script_command() -> list[str]:
    """The installed ``langsam`` script, or exactly what pip's generated script runs."""
    import shutil

    installed = shutil.which("langsam")
    if installed:
        return [installed]
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["langsam"]
    module, function = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def test_console_script_hybrid_run_with_models_from_environment(tmp_path, models):
    inputs = tmp_path / "in"
    make_input_tree(inputs)
    out = tmp_path / "out"
    env = _subprocess_env(
        LANGSAM_SAM_TYPE="auto", LANGSAM_SAM_CHECKPOINT=models["sam_checkpoint"],
        LANGSAM_DETECTOR=models["detector"], LANGSAM_CLIP_MODEL=models["clip_local_dir"], LANGSAM_DEVICE="cpu",
    )
    command = [*console_script_command(), "segment", str(inputs / "rotated.jpg"), "--text", "a cat",
               "--text", "../up", "--mode", "hybrid", "--clip-threshold", "0", "--box-threshold", "0",
               "--top-k", "1", "--save", "masks,coco", "--out", str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "1 images: 1 processed, 0 skipped, 0 failed" in completed.stdout
    (record,) = records(out).values()
    assert record["settings"]["mode"] == "hybrid"
    assert (record["image"]["height"], record["image"]["width"]) == (140, 90)
    (obj,) = record["objects"]
    assert 0.0 <= obj["clip_score"] <= 1.0
    assert not (record["_folder"] / cli.OVERLAY_NAME).exists()  # --save left the overlay out
    assert (record["_folder"] / obj["mask_file"]).is_file()
    assert len(COCO(str(out / cli.ANNOTATIONS_NAME)).anns) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_python_m_langsam_usage_error_imports_no_model_code(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "langsam", "segment", str(tmp_path), "--out", str(tmp_path)],
                               env=_subprocess_env(), capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "no queries" in completed.stderr
    probe = ("import sys; from langsam.cli import main; status = main(['segment', '--out', 'o']); "
             "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'gradio') if m in sys.modules]; "
             "print(heavy); sys.exit(status)")
    completed = subprocess.run([sys.executable, "-c", probe], env=_subprocess_env(), capture_output=True,
                               text=True, timeout=60, cwd=tmp_path)
    assert completed.returncode == 2 and completed.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------
# Clip mode takes the mask generator's flags; --detector-size; SAM types from the registry
# ------------------------------------------------------------------------------------------

# Few points and no quality filter: a random SAM then gives a handful of distinct masks, fast.
CLIP_AMG_FLAGS = ["--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                  "--box-nms-thresh", "0.95"]
CLIP_AMG_PARAMS = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.95}


@pytest.fixture()
def generator_kwargs(monkeypatch) -> list[dict]:
    """The keyword arguments of every SamAutomaticMaskGenerator built (the real one still runs)."""
    import functools

    import sam.automatic_mask_generator as amg

    calls = []
    original = amg.SamAutomaticMaskGenerator.__init__

    @functools.wraps(original)  # keeps the signature the pipeline checks amg_params against
    def recording(self, model, **kwargs):
        calls.append(kwargs)
        original(self, model, **kwargs)

    monkeypatch.setattr(amg.SamAutomaticMaskGenerator, "__init__", recording)
    return calls


def test_clip_mode_generator_flags_reach_the_generator_and_the_resume_record(tmp_path, models, generator_kwargs,
                                                                              tiny_sam_checkpoint):
    from langsam.io import load_image
    from sam import SamAutomaticMaskGenerator, build_sam

    image_path = tmp_path / "cat.png"
    Image.fromarray(np.ascontiguousarray(real_photo("chelsea")[:96, :128])).save(image_path)
    out = tmp_path / "out"
    argv = ["segment", str(image_path), "--text", "a cat", "--text", "a dog", "--mode", "clip", "--clip-threshold", "0",
            "--out", str(out), *model_flags(models), "--clip-model", models["clip_local_dir"], *CLIP_AMG_FLAGS]
    status, stdout, stderr = run_main(argv)
    assert status == 0, stderr
    # Only the flags given reach the generator; everything else keeps its defaults.
    assert generator_kwargs == [CLIP_AMG_PARAMS]
    (record,) = records(out).values()
    assert record["settings"]["generator"] == CLIP_AMG_PARAMS
    # Every object is one of the masks the generator makes with these settings on the same model.
    direct = SamAutomaticMaskGenerator(build_sam("auto", checkpoint=tiny_sam_checkpoint), **CLIP_AMG_PARAMS)
    direct_masks = [m["segmentation"] for m in direct.generate(load_image(image_path))]
    assert len(direct_masks) >= len(record["objects"]) >= 1
    for obj in record["objects"]:
        rle = {"size": obj["segmentation"]["size"], "counts": obj["segmentation"]["counts"].encode()}
        mask = mask_utils.decode(rle).astype(bool)
        assert any(np.array_equal(mask, candidate) for candidate in direct_masks)

    # Same settings: the image is finished and no generator is built.
    generator_kwargs.clear()
    status, stdout, _ = run_main([*argv, "--skip-existing"])
    assert status == 0 and "1 images: 0 processed, 1 skipped" in stdout and generator_kwargs == []
    # Another generator setting makes the finished image stale.
    changed = [*argv, "--skip-existing", "--points-per-side", "2"]
    status, stdout, _ = run_main(changed)
    assert status == 0 and "1 images: 1 processed, 0 skipped" in stdout
    assert generator_kwargs == [{**CLIP_AMG_PARAMS, "points_per_side": 2}]
    (record,) = records(out).values()
    assert record["settings"]["generator"]["points_per_side"] == 2


@pytest.mark.parametrize("mode", ["grounded", "hybrid"])
def test_generator_flags_outside_clip_mode_are_a_usage_error(tmp_path, monkeypatch, mode):
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    Image.fromarray(real_photo("coffee")[:32, :32]).save(tmp_path / "img.png")
    status, _, stderr = run_main(["segment", str(tmp_path / "img.png"), "--text", "cup", "--mode", mode,
                                  "--points-per-side", "4", "--box-nms-thresh", "0.5", "--out", str(tmp_path / "o")])
    assert status == 2 and "usage: langsam segment" in stderr
    assert (f"--points-per-side, --box-nms-thresh: mask-generator settings apply to --mode clip only "
            f"(got --mode {mode})") in stderr
    assert not (tmp_path / "o").exists()


def test_generator_flags_have_one_definition_for_both_commands():
    from langsam.cli.options import AMG_OPTIONS

    flags = ["--" + name.replace("_", "-") for name, _, _ in AMG_OPTIONS]
    for command in ("segment", "auto-masks"):
        status, stdout, _ = run_main([command, "--help"])
        assert status == 0 and all(flag in stdout for flag in flags), command
    for command in (["segment", "--text", "a", "--mode", "clip"], ["auto-masks"]):  # the same checks in both
        for flag, value, message in (("--points-per-side", "0", "must be at least 1"),
                                     ("--pred-iou-thresh", "nan", "expected a finite number, got 'nan'"),
                                     ("--box-nms-thresh", "1.5", "expected a number between 0 and 1")):
            status, _, stderr = run_main([*command, "x.png", flag, value, "--out", "o"])
            assert status == 2 and f"{flag}: {message}" in stderr, (command, flag)


class _RecordingPipeline:
    """Stands in for LangSAM: records its keyword arguments, finds nothing."""

    built: list[dict] = []

    def __init__(self, **kwargs):
        _RecordingPipeline.built.append(kwargs)
        self.predictor = self.detector = self

    def load(self):
        return self

    def segment(self, image, queries, **kwargs):
        from langsam.result import Segmentation

        return Segmentation.empty(image.shape[:2])


def test_detector_size_is_validated_and_reaches_langsam(tmp_path, monkeypatch):
    Image.fromarray(real_photo("coffee")[:32, :32]).save(tmp_path / "img.png")
    base = ["segment", str(tmp_path / "img.png"), "--text", "cup", "--out", str(tmp_path / "out")]
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    for value, message in (("32", "--detector-size: must be at least 64, got 32"),
                           ("big", "--detector-size: expected an integer, got 'big'"),
                           ("512.5", "expected an integer")):
        status, _, stderr = run_main([*base, "--detector-size", value])
        assert status == 2 and message in stderr, stderr
    monkeypatch.setenv("LANGSAM_DETECTOR_SIZE", "10")
    status, _, stderr = run_main(base)
    assert status == 2 and "--detector-size: must be at least 64, got 10" in stderr

    monkeypatch.setenv("LANGSAM_DETECTOR_SIZE", "640")
    monkeypatch.setattr("langsam.pipeline.LangSAM", _RecordingPipeline)
    _RecordingPipeline.built.clear()
    assert run_main(base)[0] == 0
    assert run_main([*base, "--detector-size", "512"])[0] == 0  # the flag beats the environment
    assert [kwargs.get("detector_size") for kwargs in _RecordingPipeline.built] == [640, 512]
    (record,) = records(tmp_path / "out").values()
    assert record["settings"]["models"]["detector_size"] == 512  # part of what --skip-existing compares


def test_sam_types_come_from_the_registry(tmp_path, monkeypatch):
    import sam.build

    registry = sam.build.valid_model_types()
    status, stdout, _ = run_main(["segment", "--help"])
    assert status == 0 and all(name in " ".join(stdout.split()) for name in registry)
    # A type added to the registry is accepted at once; an unknown one lists the registry's.
    monkeypatch.setattr(sam.build, "valid_model_types", lambda: [*registry, "vit_tiny_test"])
    args = cli.build_parser().parse_args(["segment", "x.png", "--out", str(tmp_path), "--sam-type", "vit_tiny_test"])
    cli.validate_model_arguments(args.parser, args)
    assert cli.model_kwargs_from_args(args)["sam_type"] == "vit_tiny_test"
    monkeypatch.setattr("langsam.pipeline.LangSAM.__init__", _must_not_load)
    status, _, stderr = run_main(["segment", str(tmp_path), "--text", "cat", "--out", str(tmp_path / "o"),
                                  "--sam-type", "vit_q"])
    listed = ", ".join([*registry, "vit_tiny_test"])
    assert status == 2 and f"unknown SAM type 'vit_q'; choose one of {listed}" in stderr
