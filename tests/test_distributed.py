"""`--ray` and `langsam.distributed` on one local Ray cluster shared by every test here, with
the tiny random models of test_cli_segment.py: the same files as a local run (checked file by
file), worker processes killed mid-image (once, and at every attempt: a poison image), bad
files, resume across engines, URIs, the Python API, and the message when Ray is missing. Real
signals on --ray are in test_ray_faults.py."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from langsam import cli
from langsam.cli.batch import FAILURES_NAME
from sam_factory import real_photo
from ray_support import DyingBuilder
from test_cli_segment import run_main
from tiny_gdino import save_tiny_grounding_dino

ray = pytest.importorskip("ray", reason='the distributed tests need pip install "langsam[distributed]"')

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CLUSTER_CPUS = 8  # logical CPUs: more than the cores, so Ray Data's own tasks never wait behind the actors
QUERY_FLAGS = ["--text", "a cat", "--text", "a dog", "--box-threshold", "0", "--text-threshold", "0", "--top-k", "2"]
AMG_FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
             "--box-nms-thresh", "0.95", "--png"]


# ------------------------------------------------------------------------------------------
# One cluster, one set of models and inputs, one local run to compare with
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    import logging

    if ray.is_initialized():
        ray.shutdown()
    # The workers import tests/ray_support.py (the crashing pipeline builder).
    # address="local": a cluster of our own, even if another one runs on this machine.
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
                                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sam_checkpoint) -> list[str]:
    detector = save_tiny_grounding_dino(tmp_path_factory.mktemp("ray_models") / "gdino", seed=0)
    return ["--sam-type", "auto", "--sam-checkpoint", str(tiny_sam_checkpoint), "--detector", str(detector),
            "--device", "cpu"]


#: The decoded size of photos()["poison"], which PoisonBuilder's workers die on; no other photo has it.
POISON_SIZE = (61, 83)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Four readable images under one folder (two with the same base name), a truncated JPEG and
    a readable image of POISON_SIZE."""
    root = tmp_path_factory.mktemp("ray_photos")
    for folder, name in (("a", "chelsea"), ("b", "coffee")):
        (root / folder).mkdir()
        Image.fromarray(np.ascontiguousarray(real_photo(name)[::3, ::3])).save(root / folder / "photo.png")
    Image.fromarray(real_photo("astronaut")).convert("L").resize((120, 96)).save(root / "gray.png")
    stored = Image.fromarray(np.ascontiguousarray(real_photo("chelsea")[:90, :140]))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 90 wide, 140 high
    stored.save(root / "rotated.jpg", exif=exif.tobytes(), quality=90)
    encoded = io.BytesIO()
    Image.fromarray(real_photo("coffee")).save(encoded, format="JPEG")
    (root / "broken.jpg").write_bytes(encoded.getvalue()[:400])
    Image.fromarray(np.ascontiguousarray(real_photo("astronaut")[100:100 + POISON_SIZE[0], 200:200 + POISON_SIZE[1]])
                    ).save(root / "poison.png")
    return {"root": root, "good": [root / "a", root / "b", root / "gray.png", root / "rotated.jpg"],
            "broken": root / "broken.jpg", "poison": root / "poison.png"}


GOOD_KEYS = ("a_photo", "b_photo", "gray", "rotated")


def segment_argv(photos, models, out: Path, *extra: str, broken: bool = False, poison: bool = False) -> list[str]:
    inputs = [*photos["good"], *([photos["broken"]] if broken else []), *([photos["poison"]] if poison else [])]
    return ["segment", *map(str, inputs), "--out", str(out), *QUERY_FLAGS, *models, *extra]


@pytest.fixture(scope="module")
def local_segment(tmp_path_factory, photos, models) -> Path:
    out = tmp_path_factory.mktemp("local_segment") / "out"
    status, stdout, stderr = run_main(segment_argv(photos, models, out))
    assert status == 0, stderr
    assert "4 images: 4 processed, 0 skipped, 0 failed" in stdout
    return out


def files_under(root: Path) -> dict[str, Path]:
    return {path.relative_to(root).as_posix(): path for path in root.rglob("*") if path.is_file()}


def assert_same_outputs(expected_root: Path, actual_root: Path, folders: tuple[str, ...] | None = None) -> None:
    """The same files (only those under ``folders`` if given); JSON equal (floats to 1e-5), images
    equal pixel for pixel, no temporary files."""
    expected, actual = files_under(expected_root), files_under(actual_root)
    if folders is not None:
        expected = {name: path for name, path in expected.items() if name.split("/")[0] in folders}
        actual = {name: path for name, path in actual.items() if name.split("/")[0] in folders}
    assert sorted(actual) == sorted(expected)
    assert not [name for name in actual if Path(name).name.startswith(".")], "temporary file left behind"
    for name, path in expected.items():
        if name.endswith(".json"):
            assert_json_close(json.loads(actual[name].read_text("utf-8")), json.loads(path.read_text("utf-8")), name)
        else:
            want, got = np.asarray(Image.open(path)), np.asarray(Image.open(actual[name]))
            np.testing.assert_array_equal(got, want, err_msg=name)


def assert_json_close(got, want, where: str) -> None:
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            assert_json_close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (g, w) in enumerate(zip(got, want)):
            assert_json_close(g, w, f"{where}[{index}]")
    else:
        assert got == want, where


def wait_for_free_cpus(timeout: float = 30.0) -> float:
    """Seconds until every logical CPU of the cluster is free again (the workers are gone)."""
    start = time.monotonic()
    while ray.available_resources().get("CPU", 0.0) < CLUSTER_CPUS:
        assert time.monotonic() - start < timeout, f"workers still hold CPUs: {ray.available_resources()}"
        time.sleep(0.2)
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------
# The command line on Ray
# ------------------------------------------------------------------------------------------


def read_failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / FAILURES_NAME).read_text("utf-8").splitlines()]


def test_dead_workers_retry_their_image_a_bounded_number_of_times(cluster, photos, models, local_segment,
                                                                   tmp_path, monkeypatch):
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    with Image.open(photos["root"] / "gray.png") as gray:
        gray_size = (gray.height, gray.width)
    # A worker process dies in the middle of gray.png at its first attempt only (a worker lost
    # once), and in the middle of poison.png at every attempt (an image that crashes its decoder).
    monkeypatch.setattr("langsam.distributed.PipelineBuilder", functools.partial(
        DyingBuilder, deaths=str(deaths), die_sizes={gray_size: "once", POISON_SIZE: "always"}))
    out = tmp_path / "out"
    status, stdout, stderr = run_main(segment_argv(photos, models, out, "--ray", "--workers", "2",
                                                   "--ray-max-retries", "1", poison=True))
    died = Counter(path.name.split("-")[0] for path in deaths.iterdir())
    assert died == {"x".join(map(str, gray_size)): 1, "x".join(map(str, POISON_SIZE)): 2}  # 1 try + 1 retry
    assert status == 1, stderr
    assert "5 images: 4 processed, 0 skipped, 1 failed" in stdout
    reason = "the worker process died while processing this image, on each of its 2 attempts"
    assert stderr.count(f"error: {photos['poison']}: {reason}") == 1
    assert f"  {photos['poison']}: {reason}" in stdout  # in the summary too
    # Every other image was written once, as the local run wrote it; poison.png left nothing.
    assert_same_outputs(local_segment, out, folders=(*GOOD_KEYS, cli.ANNOTATIONS_NAME))
    coco = json.loads((out / cli.ANNOTATIONS_NAME).read_text("utf-8"))
    assert sorted(image["langsam_output"] for image in coco["images"]) == sorted(GOOD_KEYS)
    assert not (out / "poison").exists()
    (record,) = read_failures(out)
    assert record == {"command": "segment", "input": str(photos["poison"]), "output": "poison",
                      "error": "WorkerDiedError", "message": record["message"], "attempts": 2}
    assert record["message"].startswith(reason) and "--ray-max-retries N allows more" in record["message"]
    wait_for_free_cpus()


def test_ray_max_retries_default_is_the_one_documented():
    from langsam.distributed import DEFAULT_MAX_RETRIES

    status, help_text, _ = run_main(["segment", "--help"])
    assert status == 0
    flag_help = " ".join(help_text.split()).split("--ray-max-retries N")[-1]  # its help, then the epilog
    assert flag_help.startswith(" times an image is tried again") and "outputs (under" in flag_help
    assert flag_help.split("outputs (under")[0].endswith(f"reported as failed (default {DEFAULT_MAX_RETRIES}) ")
    readme = (REPO / "README.md").read_text("utf-8")
    assert "| `--ray-max-retries N` | " in readme and f"Default {DEFAULT_MAX_RETRIES}" in readme.split(
        "| `--ray-max-retries N` | ")[1].split("\n")[0]


def test_resume_across_engines_with_a_broken_file(cluster, photos, models, local_segment, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_segment, out)
    for key in ("gray", "rotated"):  # as if the local run had stopped before these two
        (out / key / cli.RECORD_NAME).unlink()
    (out / cli.ANNOTATIONS_NAME).unlink()
    kept = {key: (out / key / cli.RECORD_NAME).stat().st_mtime_ns for key in ("a_photo", "b_photo")}

    status, stdout, stderr = run_main(segment_argv(photos, models, out, "--skip-existing", "--ray", "--workers", "1",
                                                   broken=True))
    assert status == 1  # broken.jpg, reported with its path; the run went on
    assert f"error: {photos['broken']}: corrupt or truncated image" in stderr
    assert "5 images: 2 processed, 2 skipped, 1 failed" in stdout
    assert {key: (out / key / cli.RECORD_NAME).stat().st_mtime_ns for key in kept} == kept
    assert_same_outputs(local_segment, out, folders=(*GOOD_KEYS, cli.ANNOTATIONS_NAME))
    (record,) = read_failures(out)
    assert (record["input"], record["output"], record["error"], record["attempts"]) == (
        str(photos["broken"]), "broken", "ImageLoadError", 1)
    assert record["message"].startswith("corrupt or truncated image")

    # ...and a run finished on Ray resumes locally; broken.jpg, not among its inputs, keeps its record.
    (out / "a_photo" / cli.RECORD_NAME).unlink()
    status, stdout, _ = run_main(segment_argv(photos, models, out, "--skip-existing"))
    assert status == 0 and "4 images: 1 processed, 3 skipped, 0 failed" in stdout
    assert_same_outputs(local_segment, out, folders=(*GOOD_KEYS, cli.ANNOTATIONS_NAME))
    assert read_failures(out) == [record]


def test_auto_masks_from_uris_on_ray_equal_the_local_run(cluster, photos, tiny_sam_checkpoint, tmp_path):
    flags = [*AMG_FLAGS, "--checkpoint", str(tiny_sam_checkpoint), "--device", "cpu"]
    files = [photos["root"] / "a" / "photo.png", photos["root"] / "b" / "photo.png"]
    status, stdout, stderr = run_main(["auto-masks", *map(str, files), "--out", str(tmp_path / "local"), *flags])
    assert status == 0, stderr
    uris = [path.as_uri() for path in files]  # file:///...: read through pyarrow, as s3:// would be
    status, stdout, stderr = run_main(["auto-masks", *uris, "--out", str(tmp_path / "ray"), *flags,
                                       "--ray", "--workers", "1", "--batch-size", "2"])
    assert status == 0, stderr
    assert "2 images: 2 processed, 0 skipped, 0 failed" in stdout
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    written = files_under(tmp_path / "ray")
    assert {"a_photo.json", "b_photo.json", "a_photo_masks/001.png", "b_photo_masks/overlay.jpg"} <= set(written)


def test_workers_that_cannot_load_the_models_stop_the_run_once(cluster, photos, tiny_sam_checkpoint, tmp_path):
    out = tmp_path / "out"
    status, _, stderr = run_main(["segment", *map(str, photos["good"]), "--text", "cat", "--out", str(out),
                                  "--sam-type", "auto", "--sam-checkpoint", str(tiny_sam_checkpoint),
                                  "--detector", str(tmp_path / "no-such-model"), "--ray", "--workers", "1"])
    assert status == 1
    assert stderr.count("cannot load the models") == 1 and "no-such-model" in stderr
    assert not list(out.rglob(cli.RECORD_NAME))
    wait_for_free_cpus()


def _label_proposals(project_dir: Path) -> dict[str, list]:
    """{image path: [(label, box, score, mask)]} of a labelling project, and its object ids."""
    from langsam.label import Project

    with Project.open(project_dir) as project:
        return {image.path: [(o.id, o.label, o.box, o.score, o.mask) for o in project.objects(image.id)]
                for image in project.images()}


def test_label_propose_on_ray_equals_a_local_propose_reports_bad_files_and_resumes(cluster, photos, models,
                                                                                    tmp_path, monkeypatch,
                                                                                    one_torch_thread):
    import langsam.label.propose as propose_module

    images = tmp_path / "images"  # three readable photos (one EXIF-rotated) and a truncated one
    for path in (photos["root"] / "a" / "photo.png", photos["root"] / "gray.png", photos["root"] / "rotated.jpg",
                 photos["broken"]):
        target = images / path.relative_to(photos["root"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    flags = ["--top-k", "2", "--box-threshold", "0", "--text-threshold", "0", *models]
    for name in ("local", "ray"):
        status, _, stderr = run_main(["label", "init", str(tmp_path / name), "--images", str(images),
                                      "--classes", "a cat, a dog", "--val-fraction", "0"])
        assert status == 0, stderr
    status, stdout, stderr = run_main(["label", "propose", str(tmp_path / "local"), *flags])
    assert status == 1 and "4 images: 3 processed, 0 skipped, 1 failed" in stdout, stderr

    # A local run stopped (Ctrl-C) right after its first image is stored...
    real_store, stored = propose_module.store_proposals, []

    def store_then_stop(project, image_id, document, round):
        real_store(project, image_id, document, round)
        stored.append(image_id)
        raise KeyboardInterrupt

    monkeypatch.setattr(propose_module, "store_proposals", store_then_stop)
    status, _, stderr = run_main(["label", "propose", str(tmp_path / "ray"), *flags])
    assert status == cli.EXIT_INTERRUPTED and "1 images were proposed and are stored" in stderr, stderr
    first = {path: rows for path, rows in _label_proposals(tmp_path / "ray").items() if rows}
    assert len(stored) == 1 and len(first) == 1

    # ...is resumed on Ray: the rest is proposed, never that image again, and the broken file reported.
    monkeypatch.setattr(propose_module, "store_proposals", real_store)
    status, stdout, stderr = run_main(["label", "propose", str(tmp_path / "ray"), *flags, "--ray", "--workers", "1"])
    assert status == 1, stderr
    assert "4 images: 2 processed, 1 skipped, 1 failed" in stdout
    assert f"{images / 'broken.jpg'}: corrupt or truncated image" in stderr
    local, on_ray = _label_proposals(tmp_path / "local"), _label_proposals(tmp_path / "ray")
    for path, rows in first.items():
        assert [row[0] for row in on_ray[path]] == [row[0] for row in rows]  # the same objects, not redone
    assert sorted(on_ray) == sorted(local) and not local["broken.jpg"] and not on_ray["broken.jpg"]
    for path, expected in local.items():
        got = on_ray[path]
        assert [row[1] for row in got] == [row[1] for row in expected], path
        for (_, _, box, score, mask), (_, _, want_box, want_score, want_mask) in zip(got, expected):
            np.testing.assert_allclose(box, want_box, rtol=1e-5, atol=1e-4, err_msg=path)
            assert score == pytest.approx(want_score, rel=1e-5, abs=1e-6), path
            np.testing.assert_array_equal(mask, want_mask, err_msg=path)
    assert sum(len(rows) for rows in local.values()) == 6  # top 2 of each readable image
    assert all(0 < row[4].mean() < 1 for rows in local.values() for row in rows)
    wait_for_free_cpus()


# ------------------------------------------------------------------------------------------
# The Python API
# ------------------------------------------------------------------------------------------


def test_segment_dataset_matches_langsam_on_paths_and_bytes(cluster, photos, models, tmp_path):
    from langsam import LangSAM
    from langsam.distributed import segment_dataset

    options = dict(zip(models[::2], models[1::2]))
    model_kwargs = {"sam_type": "auto", "sam_checkpoint": options["--sam-checkpoint"],
                    "detector": options["--detector"], "device": "cpu"}
    paths = [photos["root"] / "a" / "photo.png", photos["root"] / "rotated.jpg"]
    rows = [{"image_id": "by-path", "path": str(paths[0]), "bytes": None},
            {"image_id": "by-bytes", "path": None, "bytes": paths[1].read_bytes()},
            {"image_id": "bad-bytes", "path": None, "bytes": b"GIF89a not really"}]
    results = segment_dataset(ray.data.from_items(rows), ["a cat", "a dog"], box_threshold=0.0, text_threshold=0.0,
                              top_k=2, workers=1, **model_kwargs).materialize()  # run once, read twice
    found = {row["image_id"]: row for row in results.iter_rows()}
    assert sorted(found) == ["bad-bytes", "by-bytes", "by-path"]
    assert found["bad-bytes"]["error"].startswith("bad-bytes: ") and found["bad-bytes"]["error_kind"] == "image"
    pipeline = LangSAM(**model_kwargs)
    for image_id, path in (("by-path", paths[0]), ("by-bytes", paths[1])):
        row, expected = found[image_id], pipeline.segment(str(path), ["a cat", "a dog"], box_threshold=0.0,
                                                           text_threshold=0.0, top_k=2)
        assert row["error"] is None and row["labels"] == expected.labels
        assert (row["height"], row["width"]) == expected.image_size
        np.testing.assert_allclose(row["boxes"], expected.boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(row["scores"], expected.scores, rtol=1e-5)
        decoded = [mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
                   for rle in row["segmentation"]]
        np.testing.assert_array_equal(np.stack(decoded), expected.masks)
    # The fixed schema writes to Parquet as is.
    results.write_parquet(str(tmp_path / "parquet"))
    assert list((tmp_path / "parquet").glob("*.parquet"))


def test_segment_dataset_refuses_bad_arguments_before_running(cluster):
    from langsam.distributed import segment_dataset

    ds = ray.data.from_items([{"path": "x.jpg"}])
    with pytest.raises(ValueError, match="mode must be one of"):
        segment_dataset(ds, "a cat", mode="magic")
    with pytest.raises(ValueError, match="box_threshold"):
        segment_dataset(ds, "a cat", box_threshold=2)
    with pytest.raises(ValueError, match="unknown argument.*sam_typo"):
        segment_dataset(ds, "a cat", sam_typo="vit_b")
    with pytest.raises(ValueError, match="'path' or a 'bytes' column"):
        segment_dataset(ray.data.from_items([{"image": 1}]).materialize(), "a cat")


# ------------------------------------------------------------------------------------------
# No cluster needed
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--ray", "nowhere/"], "expected local, auto, ray://HOST:PORT or HOST:PORT, got 'nowhere/'"),
    (["--workers", "2"], "--workers: cluster options need --ray"),
    (["--ray", "--workers", "0"], "must be at least 1"),
    (["--ray", "--gpus-per-worker", "-1"], "must be at least 0.0"),
    (["--ray-max-retries", "1"], "--ray-max-retries: cluster options need --ray"),
    (["--ray", "--ray-max-retries", "-1"], "must be at least 0"),
])
def test_cluster_usage_errors_exit_2(tmp_path, extra, message):
    Image.fromarray(real_photo("coffee")[:32, :32]).save(tmp_path / "img.png")
    status, _, stderr = run_main(["segment", str(tmp_path / "img.png"), "--text", "cat", "--out",
                                  str(tmp_path / "out"), *extra])
    assert status == 2 and message in stderr, stderr


def test_uri_inputs_need_ray(tmp_path):
    Image.fromarray(real_photo("coffee")[:32, :32]).save(tmp_path / "img.png")
    status, _, stderr = run_main(["auto-masks", (tmp_path / "img.png").as_uri(), "--out", str(tmp_path / "out")])
    assert status == 2 and "URIs are read on a cluster only: add --ray" in stderr


def test_missing_ray_names_the_extra(tmp_path):
    Image.fromarray(real_photo("coffee")[:32, :32]).save(tmp_path / "img.png")
    script = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed
from langsam.cli import main
status = main(["segment", {str(tmp_path / "img.png")!r}, "--text", "cat", "--out", {str(tmp_path / "o")!r}, "--ray"])
from langsam.distributed import RayMissingError, segment_dataset
try:
    segment_dataset(None, "cat")
except RayMissingError as error:
    print("API:", error)
sys.exit(status)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 2, completed.stderr
    assert 'pip install "langsam[distributed]"' in completed.stderr
    assert 'API: running on a Ray cluster needs Ray Data' in completed.stdout
    assert 'pip install "langsam[distributed]"' in completed.stdout
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
