"""Real signals on `langsam segment --ray`: SIGINT and SIGTERM sent to the command's own process
while it is held after a known number of finished images; its exit status, the files it leaves,
a resume, and that every Ray process the run started (GCS, raylet, workers) ends with it. The
failures file of local runs (segment and auto-masks) is tested here too."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from langsam import cli
from langsam.cli.batch import FAILURES_NAME
from test_cli_segment import run_main
from test_hardening_files import _check_finished_images

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray", reason='the distributed tests need pip install "langsam[distributed]"')
from test_distributed import QUERY_FLAGS, models, photos, segment_argv  # noqa: E402,F401 (module fixtures)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

#: Run as the CLI's process: once the k-th image is written, name the finished images in the
#: marker file and wait for a signal, so the test's signal lands mid-run whatever the speed.
_PAUSE_AFTER = """
import pathlib, signal, sys
from langsam.cli import main, segment
marker, after, write, written = pathlib.Path(sys.argv[1]), int(sys.argv[2]), segment._write_files, []
def write_then_wait(*args, **kwargs):
    write(*args, **kwargs)
    written.append(args[1])
    if len(written) == after:
        marker.write_text("\\n".join(written))
        signal.pause()  # returns only through the signal's exception
segment._write_files = write_then_wait
sys.exit(main(sys.argv[3:]))
"""


def _alive(processes: list) -> list:
    """The processes still running (a zombie waiting to be reaped has ended)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:120]}"
    except psutil.Error:
        return str(process.pid)


@pytest.mark.parametrize(("signal_number", "exit_status", "word"), [
    (signal.SIGINT, cli.EXIT_INTERRUPTED, "interrupted"),
    (signal.SIGTERM, cli.EXIT_TERMINATED, "terminated"),
])
def test_a_signal_stops_segment_on_ray_and_every_ray_process_it_started(photos, models, tmp_path, signal_number,
                                                                       exit_status, word):
    out = tmp_path / "out"
    marker = tmp_path / "finished"
    argv = segment_argv(photos, models, out, "--ray", "--workers", "1")  # a cluster of its own
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER, str(marker), "2", *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    started = []
    try:
        deadline = time.monotonic() + 400
        while not marker.exists():  # the CLI now waits after its second image, until the signal
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no two images finished in time"
            time.sleep(0.05)
        started = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(_describe(child) for child in started)
        assert "gcs_server" in names and "raylet" in names and "ray::" in names, names
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == exit_status, stderr
    assert f"{word}; finished outputs are complete on disk" in stderr and "rerun with --skip-existing" in stderr
    assert "Traceback" not in stderr

    deadline = time.monotonic() + 60  # a bounded wait: Ray's processes end soon after the driver
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = _alive(started)
    for survivor in survivors:  # leave no process of ours behind, whatever the outcome
        survivor.kill()
    assert not survivors, "outlived the command: " + "; ".join(map(_describe, survivors))

    finished_keys = marker.read_text("utf-8").split("\n")
    finished = _check_finished_images(out)  # complete files, no temporary file
    assert sorted(record_path.parent.name for record_path in out.glob(f"*/{cli.RECORD_NAME}")) == sorted(finished_keys)
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == sorted(finished_keys)  # no half image
    if signal_number == signal.SIGINT:  # the state either signal leaves; resumed once, locally
        mtimes = {key: (out / key / cli.RECORD_NAME).stat().st_mtime_ns for key in finished_keys}
        status, stdout, stderr = run_main(segment_argv(photos, models, out, "--skip-existing"))
        assert status == cli.EXIT_OK, stderr
        assert "4 images: 2 processed, 2 skipped, 0 failed" in stdout
        assert {key: (out / key / cli.RECORD_NAME).stat().st_mtime_ns for key in finished_keys} == mtimes
        resumed = _check_finished_images(out)
        assert len(resumed) == 4 and all(resumed[name] == record for name, record in finished.items())


# ------------------------------------------------------------------------------------------
# failures.jsonl (local runs; the --ray runs of test_distributed.py check it too)
# ------------------------------------------------------------------------------------------


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / FAILURES_NAME).read_text("utf-8").splitlines()]


def test_failures_file_of_a_local_run(tmp_path, tiny_sam_checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(inputs / "a.png")
    (inputs / "empty.png").write_bytes(b"")
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(encoded, format="PNG")
    (inputs / "cut.png").write_bytes(encoded.getvalue()[:200])
    out = tmp_path / "out"
    status, stdout, _ = run_main(["auto-masks", str(inputs), "--out", str(out), "--checkpoint", str(tiny_sam_checkpoint),
                                  "--device", "cpu", "--points-per-side", "2"])
    assert status == cli.EXIT_FAILURES and "3 images: 1 processed, 0 skipped, 2 failed" in stdout
    assert f"failures: {(out / FAILURES_NAME).resolve()}" in stdout
    assert _failures(out) == [
        {"command": "auto-masks", "input": str(inputs / "cut.png"), "output": "cut", "error": "ImageLoadError",
         "message": _failures(out)[0]["message"], "attempts": 1},
        {"command": "auto-masks", "input": str(inputs / "empty.png"), "output": "empty", "error": "ImageLoadError",
         "message": "file is empty (0 bytes)", "attempts": 1}]
    assert _failures(out)[0]["message"].startswith("corrupt or truncated image")
    assert sorted(path.name for path in out.iterdir()) == ["a.json", FAILURES_NAME]  # no temporary file


def test_failures_file_keeps_the_records_of_images_not_done(tmp_path):
    from langsam.cli.batch import Failure, RunReport, write_failures

    def failure(key: str, message: str = "bad") -> Failure:
        return Failure(f"in/{key}.png", key, "ImageLoadError", message)

    first = RunReport(failures=[failure("a"), failure("b"), failure("c")])
    assert write_failures(tmp_path, "segment", first) == tmp_path / FAILURES_NAME
    assert [r["output"] for r in _failures(tmp_path)] == ["a", "b", "c"]
    write_failures(tmp_path, "auto-masks", RunReport(failures=[failure("a", "other command")]))
    # A resumed run that finished a, failed b again and was interrupted before c: c's record stays.
    write_failures(tmp_path, "segment", RunReport(failures=[failure("b", "again")], finished={"a"}))
    assert [(r["command"], r["output"], r["message"]) for r in _failures(tmp_path)] == [
        ("segment", "c", "bad"), ("auto-masks", "a", "other command"), ("segment", "b", "again")]
    (tmp_path / FAILURES_NAME).write_text((tmp_path / FAILURES_NAME).read_text("utf-8") + "not json\n", "utf-8")
    write_failures(tmp_path, "segment", RunReport(finished={"b", "c"}))
    assert _failures(tmp_path) == [failure("a", "other command").to_json("auto-masks")]
    assert write_failures(tmp_path, "auto-masks", RunReport(finished={"a"})) is None
    assert list(tmp_path.iterdir()) == []  # nothing failed and is not done: no file
