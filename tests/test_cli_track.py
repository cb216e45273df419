"""`langsam track` end to end: the real SAM 2.1 video predictor on a tiny random model (at a
128-pixel input, so a frame takes milliseconds), the tiny Grounding DINO saved with
save_pretrained, and short clips made from a real photo (an H.264 .mp4 and a JPEG folder),
next to a broken file, a folder with an unreadable frame and an over-long clip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from langsam import cli
from langsam.cli import track
from tiny_gdino import save_tiny_grounding_dino
from video_support import make_clip, make_video_sam2, read_mp4, write_frame_folder, write_mp4

QUERIES = ["a cat", "a sofa"]
FRAMES = 8
#: Input side of the tiny SAM 2.1: an 8x8 memory grid, so a frame takes tens of milliseconds.
VIDEO_SIZE = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

SETTINGS = ["--detect-every", "3", "--box-threshold", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def registered():
    """`langsam track` is in the command table (so ``langsam.cli.main`` dispatches to it)."""
    assert track in cli.COMMANDS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A LangSAM factory on the tiny models; the CLI's model loading is replaced by it (the tiny
    SAM 2.1 runs at a 128-pixel input, which a checkpoint file cannot say)."""
    from langsam.pipeline import LangSAM

    gdino = save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino"), logit_scale=0.1, num_queries=2)
    model = make_video_sam2(VIDEO_SIZE)
    loads = []

    def load(args, mode):
        loads.append(mode)
        return LangSAM(sam_model=model, detector=str(gdino), device="cpu")

    load.gdino = gdino  # for a CLI in a subprocess, which builds the same models
    return load, loads


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    clip = make_clip(FRAMES, 120, 160)
    write_mp4(clip, root / "clips" / "cat.mp4")
    write_frame_folder(make_clip(FRAMES, 120, 160, photo="coffee"), root / "clips" / "frames", ext="jpg")
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    bad_frames = write_frame_folder(clip[:4], root / "badframes", ext="png")
    (bad_frames / "00002.png").write_bytes(b"not a png")
    return root, clip


def run_cli(monkeypatch, models, *argv):
    load, _ = models
    monkeypatch.setattr(track, "load_pipeline", load)
    return cli.main(["track", *argv])


def decode(rle) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_batch_with_bad_videos_exits_1_and_finishes_the_good_ones(monkeypatch, models, inputs, tmp_path, capsys):
    root, clip = inputs
    out = tmp_path / "out"
    loads = len(models[1])
    code = run_cli(monkeypatch, models, str(root / "clips"), str(root / "badframes"), "--text", "a cat",
                   "--text", "a sofa", "--out", str(out), "--save", "all", *SETTINGS)
    captured = capsys.readouterr()
    assert code == 1
    broken = [line for line in captured.err.splitlines() if "broken.mp4" in line]
    assert broken == [f"error: {root / 'clips' / 'broken.mp4'}: cannot read the video: Invalid data found when "
                      "processing input"]  # the path once, FFmpeg's reason without its errno
    assert f"error: {root / 'badframes'}: cannot read frame 2 (00002.png): not an image file" in captured.err
    assert "4 videos: 2 processed, 0 skipped, 2 failed" in captured.out
    assert models[1][loads:] == ["grounded"]  # loaded once, at the first readable video, kept after a failure
    # Outputs are named after the path under the common input folder.
    assert sorted(p.name for p in out.iterdir()) == ["badframes", "clips_cat", "clips_frames"]
    # The frames before the unreadable one are tracked and written; the JSON says where it broke.
    damaged = json.loads((out / "badframes" / "tracks.json").read_text())
    assert damaged["videos"][0]["length"] == 2 and damaged["info"]["damaged"]["first_bad_frame"] == 2
    assert sorted(p.name for p in (out / "badframes" / "masks").iterdir()) == ["000000.png", "000001.png"]
    assert not list(out.rglob("*.tmp"))

    # The good video's JSON equals the same tracking run in-process, frame by frame.
    from langsam.video import track_video

    data = json.loads((out / "clips_cat" / "tracks.json").read_text())
    assert data["videos"][0]["file_name"] == "clips/cat.mp4" and data["videos"][0]["length"] == FRAMES
    assert [c["name"] for c in data["categories"]] == QUERIES
    expected = track_video(models[0](None, "grounded"), root / "clips" / "cat.mp4", QUERIES, detect_every=3,
                           box_threshold=0.0)
    frames = list(expected)
    assert data["info"]["detection_frames"] == [0, 3, 6]
    annotations = {a["id"]: a for a in data["annotations"]}
    seen = sorted({int(i) for f in frames for i in f.obj_ids})
    assert sorted(annotations) == seen and seen
    for frame in frames:
        for obj_id in annotations:
            mask = frame.mask_of(obj_id)
            rle = annotations[obj_id]["segmentations"][frame.frame_index]
            if mask is None:
                assert rle is None
            else:
                np.testing.assert_array_equal(decode(rle), mask)
    for obj_id, track_info in expected.tracks.items():
        if obj_id in annotations:
            assert annotations[obj_id]["label"] == track_info.label in QUERIES
            assert annotations[obj_id]["first_frame"] == track_info.first_frame

    # The overlay has every frame; the id maps match the JSON.
    import av
    from PIL import Image

    with av.open(str(out / "clips_cat" / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
    for index in range(FRAMES):
        ids = np.asarray(Image.open(out / "clips_cat" / "masks" / f"{index:06d}.png"))
        for obj_id, annotation in annotations.items():
            rle = annotation["segmentations"][index]
            if rle is not None:  # the higher id wins where masks overlap
                higher = np.zeros_like(ids, dtype=bool)
                for other, other_annotation in annotations.items():
                    if other > obj_id and other_annotation["segmentations"][index] is not None:
                        higher |= decode(other_annotation["segmentations"][index])
                np.testing.assert_array_equal(ids[decode(rle) & ~higher], obj_id)
    assert json.loads((out / "clips_frames" / "tracks.json").read_text())["videos"][0]["length"] == FRAMES


def test_a_video_cut_short_is_tracked_up_to_the_cut_reported_and_retried(monkeypatch, models, tmp_path, capsys):
    """A 12-frame MP4 (index first) cut to 60% of its bytes: the frames before the first one
    that does not decode are tracked and written exactly as the same pixels are tracked
    in-process; the error line names the path once and that frame; exit 1; --skip-existing
    does not count it as done."""
    clip = make_clip(12, 120, 160)
    whole = write_mp4(clip, tmp_path / "whole" / "clip.mp4", faststart=True)
    cut = tmp_path / "cut" / "clip.mp4"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    argv = ["--text", "a cat", "--save", "all", *SETTINGS]
    assert run_cli(monkeypatch, models, str(cut), "--out", str(tmp_path / "out_cut"), *argv) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].count(str(cut)) == 1, errors
    assert errors[0].startswith(f"error: {cut}: cannot decode frame ")
    bad = int(errors[0].split("cannot decode frame ")[1].split()[0])
    assert 0 < bad < 12 and "1 videos: 0 processed, 0 skipped, 1 failed" in captured.out

    # The same frames (decoded from the whole file), as many listed as in the cut file (the
    # object-pointer time encoding depends on the video's length), tracked in-process.
    from langsam.video import track_video
    from sam.video import open_frames

    listed = len(open_frames(cut))
    decoded, _, _ = read_mp4(whole)
    expected = track_video(models[0](None, "grounded"), decoded[:listed], ["a cat"], detect_every=3,
                           box_threshold=0.0)
    expected.save(tmp_path / "expected", ("json",))
    expected = json.loads((tmp_path / "expected" / "tracks.json").read_text())
    got = json.loads((tmp_path / "out_cut" / "clip" / "tracks.json").read_text())
    assert got["videos"][0]["length"] == bad and got["info"]["damaged"]["first_bad_frame"] == bad
    assert got["annotations"], "random weights still track something"
    expected_by_id = {a["id"]: a for a in expected["annotations"]}
    for annotation in got["annotations"]:  # the frames before the cut: the same masks as in the whole file
        assert annotation["segmentations"] == expected_by_id[annotation["id"]]["segmentations"][:bad]
    overlay, _, _ = read_mp4(tmp_path / "out_cut" / "clip" / "overlay.mp4")
    assert len(overlay) == bad == len(list((tmp_path / "out_cut" / "clip" / "masks").iterdir()))

    loads = len(models[1])
    run_cli(monkeypatch, models, str(cut), "--out", str(tmp_path / "out_cut"), *argv, "--skip-existing", "-q")
    assert len(models[1]) == loads + 1  # tracked again, not skipped


@pytest.mark.parametrize("rotation", [90, -90])
def test_overlay_keeps_the_inputs_orientation_and_frame_times(monkeypatch, models, tmp_path, rotation):
    """A phone-style video: a rotation tag and a variable frame rate. The overlay shows the
    frames the way the input is displayed (upright, no tag needed) and at the input's times,
    and the JSON's sizes are the displayed ones (masks and boxes are in displayed pixels)."""
    clip = make_clip(6, 120, 160)
    pts_ms = [0, 33, 66, 200, 233, 400]
    video = write_mp4(clip, tmp_path / "phone.mp4", rotation=rotation, pts_ms=pts_ms)
    _, input_times, _ = read_mp4(video)
    # --box-threshold 1: nothing is found, so the overlay is the frames themselves.
    assert run_cli(monkeypatch, models, str(video), "--text", "a cat", "--out", str(tmp_path / "out"),
                   *SETTINGS, "--box-threshold", "1", "-q") == 0
    overlay, times, rotations = read_mp4(tmp_path / "out" / "phone" / "overlay.mp4")
    assert times == pytest.approx(input_times, abs=1e-6) and input_times == pytest.approx([t / 1000 for t in pts_ms])
    assert rotations == [0] * 6
    displayed = np.rot90(clip, 1 if rotation == 90 else -1, axes=(1, 2))  # how a player shows the input
    assert overlay.shape == displayed.shape == (6, 160, 120, 3)
    upright = np.abs(overlay.astype(int) - displayed.astype(int)).mean()
    turned = np.abs(overlay.astype(int) - np.rot90(displayed, 2, axes=(1, 2)).astype(int)).mean()
    assert upright < 6 and turned > 5 * upright, (upright, turned)  # two H.264 generations apart
    data = json.loads((tmp_path / "out" / "phone" / "tracks.json").read_text())
    assert (data["videos"][0]["height"], data["videos"][0]["width"]) == (160, 120)


def test_skip_existing_really_skips_and_changed_settings_redo(monkeypatch, models, inputs, tmp_path, capsys):
    root, _ = inputs
    out = tmp_path / "out"
    video = str(root / "clips" / "cat.mp4")
    argv = [video, "--text", "a cat", "--out", str(out), *SETTINGS]
    assert run_cli(monkeypatch, models, *argv, "-q") == 0
    record = out / "cat" / "tracks.json"
    before = (record.stat().st_mtime_ns, (out / "cat" / "overlay.mp4").stat().st_mtime_ns)

    def must_not_load(args, mode):
        raise AssertionError("a finished video must not load the models")

    monkeypatch.setattr(track, "load_pipeline", must_not_load)
    assert cli.main(["track", *argv, "--skip-existing"]) == 0
    assert "1 videos: 0 processed, 1 skipped, 0 failed" in capsys.readouterr().out
    assert (record.stat().st_mtime_ns, (out / "cat" / "overlay.mp4").stat().st_mtime_ns) == before
    # Another detector interval is another result: redone, and the masks asked for now appear.
    loads = len(models[1])
    argv[argv.index("3")] = "4"
    assert run_cli(monkeypatch, models, *argv, "--skip-existing", "--save", "json,masks", "-q") == 0
    assert len(models[1]) == loads + 1
    data = json.loads(record.read_text())
    assert data["info"]["settings"]["detect_every"] == 4 and data["info"]["detection_frames"] == [0, 4]
    assert len(list((out / "cat" / "masks").iterdir())) == FRAMES
    assert not (out / "cat" / "overlay.mp4").exists()  # not asked for: the stale one is gone


def test_limits_are_reported_with_the_flag(monkeypatch, models, inputs, tmp_path, capsys):
    root, _ = inputs
    code = run_cli(monkeypatch, models, str(root / "clips" / "cat.mp4"), "--text", "cat", "--out", str(tmp_path),
                   "--max-frames", "5", *SETTINGS)
    err = capsys.readouterr().err
    assert code == 1 and f"{FRAMES} frames, more than the limit of 5" in err and "--max-frames" in err
    code = run_cli(monkeypatch, models, str(root / "clips" / "cat.mp4"), "--text", "cat", "--out", str(tmp_path),
                   "--max-side", "100", *SETTINGS)
    err = capsys.readouterr().err
    assert code == 1 and "160x120" in err and "limit of 100" in err


@pytest.mark.parametrize("extra, message", [
    ([], "no queries"),
    (["--text", "cat", "--sam-type", "vit_b"], "needs a SAM 2"),
    (["--text", "cat", "--save", "gif"], "unknown output gif"),
    (["--text", "cat", "--detect-every", "0"], "must be at least 1"),
])
def test_usage_errors_exit_2_before_any_model_loads(monkeypatch, inputs, tmp_path, capsys, extra, message):
    root, _ = inputs

    def must_not_load(args, mode):
        raise AssertionError("usage errors must not load the models")

    monkeypatch.setattr(track, "load_pipeline", must_not_load)
    assert cli.main(["track", str(root / "clips" / "cat.mp4"), "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["track", str(tmp_path / "missing.mp4"), "--text", "cat", "--out", str(tmp_path)]) == 2


def test_help_lists_outputs_and_examples(capsys):
    assert cli.main(["track", "--help"]) == 0
    text = capsys.readouterr().out
    for expected in ("--detect-every", "--save", "--skip-existing", "--max-frames", "--max-side", "tracks.json",
                     "YouTube-VIS", "overlay.mp4", "--sam-type", "exit status"):
        assert expected in text


# ------------------------------------------------------------------------------------------
# A real SIGINT / SIGTERM in the middle of a batch of videos
# ------------------------------------------------------------------------------------------

#: Run as the CLI's process, on the tiny models of `models`: once the ``pause_at``-th mask frame
#: of the run is written (a frame in the middle of the second video), say so in the marker file
#: and wait for a signal, so the test's signal lands mid-video whatever the machine's speed.
_PAUSE_MID_VIDEO = """
import pathlib, signal, sys, torch
from langsam.cli import main, track
from langsam.pipeline import LangSAM
from langsam.video import writers
from video_support import make_video_sam2
torch.set_num_threads(1)
marker, gdino, pause_at = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model = make_video_sam2(int(sys.argv[4]))
track.load_pipeline = lambda args, mode: LangSAM(sam_model=model, detector=gdino, device="cpu")
add, written = writers.MaskPngWriter.add, []
def add_then_wait(self, frame):
    add(self, frame)
    written.append(frame.frame_index)
    if len(written) == pause_at:
        marker.write_text(str(frame.frame_index))
        signal.pause()  # returns only through the signal's exception
writers.MaskPngWriter.add = add_then_wait
sys.exit(main(sys.argv[5:]))
"""


#: Frames of each clip of `three_videos` (short: the signal test tracks 1.5 of them in a subprocess).
SHORT = 4


@pytest.fixture(scope="module")
def three_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("three_videos")
    write_mp4(make_clip(SHORT, 120, 160), root / "a.mp4")
    write_mp4(make_clip(SHORT, 120, 160, photo="coffee"), root / "b.mp4")
    write_frame_folder(make_clip(SHORT, 120, 160, photo="astronaut"), root / "c", ext="jpg")
    return root


def _check_finished_videos(out: Path) -> dict[str, dict]:
    """Every folder under ``out`` is a finished video: its tracks.json, one id map per frame and
    an overlay of every frame; no temporary file anywhere. Returns {folder: tracks.json}."""
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    finished = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        assert (folder / "tracks.json").is_file(), f"{folder.name}: outputs of an unfinished video left behind"
        record = json.loads((folder / "tracks.json").read_text("utf-8"))
        assert record["videos"][0]["length"] == SHORT
        assert sorted(p.name for p in (folder / "masks").iterdir()) == [f"{i:06d}.png" for i in range(SHORT)]
        assert len(read_mp4(folder / "overlay.mp4")[0]) == SHORT
        finished[folder.name] = record
    return finished


@pytest.mark.parametrize(("signal_number", "exit_status", "word"), [
    (signal.SIGINT, cli.EXIT_INTERRUPTED, "interrupted"),
    (signal.SIGTERM, cli.EXIT_TERMINATED, "terminated"),
])
def test_a_signal_mid_video_leaves_only_finished_videos_and_resume_redoes_none(monkeypatch, models, three_videos,
                                                                               tmp_path, capsys, signal_number,
                                                                               exit_status, word):
    out, marker = tmp_path / "out", tmp_path / "paused"
    argv = [str(three_videos), "--text", "a cat", "--out", str(out), "--save", "all", *SETTINGS]
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    pause_at = SHORT + 3  # the third frame of the second video (b.mp4)
    process = subprocess.Popen([sys.executable, "-c", _PAUSE_MID_VIDEO, str(marker), str(models[0].gdino),
                                str(pause_at), str(VIDEO_SIZE), "track", *argv],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():  # the CLI now waits in the middle of b.mp4, until the signal
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the second video was not reached in time"
            time.sleep(0.05)
        assert (out / "b" / "masks" / "000002.png").is_file()  # b.mp4 was half written
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert marker.read_text() == "2"
    assert process.returncode == exit_status, stderr
    assert f"{word}; finished outputs are complete on disk" in stderr and "rerun with --skip-existing" in stderr
    assert "Traceback" not in stderr
    # a.mp4 is complete; nothing of the half-done b.mp4 (nor of c, never begun) is left.
    assert list(_check_finished_videos(out)) == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    if signal_number != signal.SIGINT:
        return  # either signal leaves the same state; resumed once

    first = {p.name: p.stat().st_mtime_ns for p in (out / "a").rglob("*")}
    loads = len(models[1])
    capsys.readouterr()
    assert run_cli(monkeypatch, models, *argv, "--skip-existing") == cli.EXIT_OK
    assert "3 videos: 2 processed, 1 skipped, 0 failed" in capsys.readouterr().out
    assert len(models[1]) == loads + 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "a").rglob("*")} == first  # not redone
    assert sorted(_check_finished_videos(out)) == ["a", "b", "c"]
