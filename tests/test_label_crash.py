"""`langsam label review` as a real process (tiny random SAM 1 in the official layout), acted on
through its HTTP API as the page does: `kill -9` between two requests, in the middle of an
action's transaction and after its commit but before its answer, then a restart on the same
project; and SIGTERM / SIGINT with a request in flight (graceful: it finishes, nothing outlives
the server, the port is free). The child is tests/label_server_support.py, which reports where it
is on stdout and holds an action on request, so every kill and signal lands at a known point.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from label_review_support import CLASSES, make_project

psutil = pytest.importorskip("psutil")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
START = 1_000_000.0  # the project's clock, in seconds (a file the child reads)
TTL = 120.0  # the review's lease (DEFAULT_LEASE_TTL_S; checked below)


class ReviewProcess:
    """``langsam label review PROJECT`` in a child process; its stdout lines in a queue."""

    def __init__(self, project_dir: Path, clock_file: Path, log: Path, checkpoint: Path, port: int = 0) -> None:
        argv = [sys.executable, str(TESTS / "label_server_support.py"), str(clock_file), "label", "review",
                str(project_dir), "--port", str(port), "--sam-type", "auto", "--sam-checkpoint", str(checkpoint),
                "--device", "cpu"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        env.pop("LANGSAM_API_KEY", None)
        self.log = log
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log.open("ab"), text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.expect("ready ")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str) -> str:
        """The rest of the next stdout line, which must start with ``prefix`` (60 s: a failure, not a wait)."""
        try:
            line = self.lines.get(timeout=60)
        except queue.Empty:
            line = "(nothing for 60 s)"
        if line is None or not line.startswith(prefix):
            raise AssertionError(f"expected {prefix!r} from the review server, got {line!r}; its log:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
        return line[len(prefix):]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def release(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(30) == -signal.SIGKILL


@pytest.fixture
def setup(tmp_path, tiny_sam_checkpoint):
    """(project folder, start(port=0) -> ReviewProcess, set_clock(seconds)); every child is killed at the end."""
    from langsam.label.review import DEFAULT_LEASE_TTL_S

    assert DEFAULT_LEASE_TTL_S == TTL
    make_project(tmp_path).close()
    clock_file = tmp_path / "clock"
    children: list[ReviewProcess] = []

    def set_clock(seconds: float) -> None:
        (tmp_path / "clock.new").write_text(repr(seconds))
        os.replace(tmp_path / "clock.new", clock_file)

    def start(port: int = 0) -> ReviewProcess:
        children.append(ReviewProcess(tmp_path / "project", clock_file, tmp_path / "server.log",
                                      tiny_sam_checkpoint, port))
        return children[-1]

    set_clock(START)
    yield tmp_path / "project", start, set_clock
    for child in children:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


def _open(project_dir: Path):
    from langsam.label import Project

    return Project.open(project_dir, clock=lambda: START)


def _post(client: httpx.Client, path: str, **body) -> dict:
    answer = client.post(path, json=body)
    assert answer.status_code == 200, (path, answer.status_code, answer.text)
    return answer.json()


def _served_queue(client: httpx.Client, name: str) -> list[int | None]:
    """The images the server hands to fresh tabs, in order, until it has none (then released)."""
    order, holders = [], []
    while True:
        holder = f"{name}-{len(order):02d}"
        image = _post(client, "/api/lease", holder=holder)["image"]
        order.append(None if image is None else image["id"])
        if image is None:
            break
        holders.append((holder, image["id"]))
    for holder, image_id in holders:
        _post(client, "/api/release", holder=holder, image_id=image_id)
    return order


def _in_flight(client: httpx.Client, path: str, body: dict) -> tuple[threading.Thread, list]:
    """POST on a thread; the list gets the answer, or the exception."""
    outcome: list = []

    def send() -> None:
        try:
            outcome.append(client.post(path, json=body))
        except httpx.HTTPError as error:
            outcome.append(error)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, outcome


def _state(project_dir: Path) -> tuple[list, dict]:
    """(action keys with kind and object, {object id: (status, label)}), from a fresh connection."""
    project = _open(project_dir)
    try:
        assert project.integrity_check() == "ok"
        actions = [(a["key"], a["kind"], a["object_id"], a["undone"]) for a in project.actions()]
        objects = {o.id: (o.status, o.label) for o in project.objects()}
        return actions, objects
    finally:
        project.close()


def test_kill_9_of_the_review_server_loses_at_most_the_action_in_flight(setup):
    project_dir, start, set_clock = setup
    project = _open(project_dir)
    chelsea, coffee, astronaut = project.queue()  # lowest confidence first: 0.1, 0.5, 0.9
    c1, c2, c3 = (o.id for o in project.objects(chelsea))
    o1, o2 = (o.id for o in project.objects(coffee))
    (s1,) = (o.id for o in project.objects(astronaut))
    proposal_c3 = project.object(c3).mask
    project.close()
    tab = {"holder": "tab-one-1", "reviewer": "ann"}

    # --- server A: four actions, then kill -9 between two requests.
    a = start()
    with httpx.Client(base_url=a.url, timeout=60) as client:
        assert _post(client, "/api/lease", holder="tab-one-1")["image"]["id"] == chelsea
        _post(client, f"/api/objects/{c1}/accept", **tab, key="key-a-01")
        _post(client, f"/api/objects/{c2}/reject", **tab, key="key-a-02")
        _post(client, f"/api/objects/{c3}/points", **tab, key="key-a-03", points=[[117, 55, 1]])
        view = _post(client, f"/api/images/{chelsea}/add", **tab, key="key-a-04", label=CLASSES[0],
                     box=[20, 70, 90, 115])
        added = max(o["id"] for o in view["objects"])
        served = _served_queue(client, "probe-a")  # chelsea is tab-one's
        assert served == [coffee, astronaut, None]
    a.kill9()

    done = [("key-a-01", "accept", c1, 0), ("key-a-02", "reject", c2, 0), ("key-a-03", "correct", c3, 0),
            ("key-a-04", "add", added, 0)]
    actions, objects = _state(project_dir)
    assert actions == done
    assert objects == {c1: ("accepted", CLASSES[0]), c2: ("rejected", CLASSES[1]), c3: ("corrected", CLASSES[2]),
                       o1: ("proposed", CLASSES[0]), o2: ("proposed", CLASSES[1]), s1: ("proposed", CLASSES[0]),
                       added: ("added", CLASSES[0])}
    project = _open(project_dir)
    corrected = project.object(c3).mask
    assert 0 < corrected.mean() < 1 and not np.array_equal(corrected, proposal_c3)  # SAM's mask, not the proposal
    queue_before = project.queue()
    project.close()
    assert queue_before == [coffee, astronaut, chelsea]  # chelsea has nothing left to review

    # --- server B, on the same port: the same queue; the dead server's lease still holds its image
    # for the open tab (which goes on, here with an undo), and lapses for everyone else after the TTL.
    b = start(a.port)
    assert b.port == a.port
    with httpx.Client(base_url=b.url, timeout=60) as client:
        assert _served_queue(client, "probe-b") == [coffee, astronaut, None]
        assert _post(client, "/api/renew", holder="tab-one-1", image_id=chelsea) == {"held": True}
        _post(client, "/api/undo", **tab, key="key-b-01", image_id=chelsea)  # undoes the added box
        set_clock(START + 2 * TTL)  # tab-one went away; its lease has lapsed
        assert _served_queue(client, "probe-c") == [coffee, astronaut, chelsea, None]
        assert _post(client, "/api/renew", holder="tab-one-1", image_id=chelsea) == {"held": False}

        # kill -9 inside an action's transaction: its rows are written, not committed.
        tab = {"holder": "tab-two-2", "reviewer": "bob"}
        assert _post(client, "/api/lease", holder="tab-two-2")["image"]["id"] == coffee
        body = {**tab, "key": "hold-log-01"}
        thread, outcome = _in_flight(client, f"/api/objects/{o1}/accept", body)
        assert b.expect("held ") == "hold-log-01"
        b.kill9()
        thread.join(30)
        assert isinstance(outcome[0], httpx.HTTPError)  # the client saw no answer
    done = [*done[:3], ("key-a-04", "add", added, 1), ("key-b-01", "undo", added, 0)]
    actions, objects = _state(project_dir)
    assert actions == done and added not in objects
    assert objects[o1] == ("proposed", CLASSES[0])  # the action in flight is the only one lost

    # --- server C: the page retries the lost request (same key): applied once. Then kill -9 after
    # an action's commit, before its answer.
    c = start()
    with httpx.Client(base_url=c.url, timeout=60) as client:
        assert _post(client, "/api/renew", holder="tab-two-2", image_id=coffee) == {"held": True}
        _post(client, f"/api/objects/{o1}/accept", **body)
        thread, outcome = _in_flight(client, f"/api/objects/{o2}/reject", {**tab, "key": "hold-done-01"})
        assert c.expect("held ") == "hold-done-01"
        c.kill9()
        thread.join(30)
        assert isinstance(outcome[0], httpx.HTTPError)
    done += [("hold-log-01", "accept", o1, 0), ("hold-done-01", "reject", o2, 0)]
    actions, objects = _state(project_dir)
    assert actions == done  # committed before the kill: kept, though its client never heard
    assert objects[o1] == ("accepted", CLASSES[0]) and objects[o2] == ("rejected", CLASSES[1])

    # --- server D: that retry is answered from the log, not applied twice; the queue is the project's.
    d = start()
    with httpx.Client(base_url=d.url, timeout=60) as client:
        view = _post(client, f"/api/objects/{o2}/reject", **tab, key="hold-done-01")
        assert {o["id"]: o["status"] for o in view["objects"]}[o2] == "rejected"
        _post(client, "/api/release", holder="tab-two-2", image_id=coffee)
        project = _open(project_dir)
        queue_now = project.queue()
        project.close()
        assert _served_queue(client, "probe-d") == [*queue_now, None]
    d.kill9()
    actions, _ = _state(project_dir)
    assert actions == done
    assert len({key for key, *_ in actions}) == len(actions)


def _port_is_free(port: int) -> bool:
    """Bind and listen on the port, as a new server would (SO_REUSEADDR, as uvicorn binds)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        return True
    except OSError:
        return False
    finally:
        sock.close()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_review_server_gracefully(setup, signal_number):
    project_dir, start, _ = setup
    project = _open(project_dir)
    chelsea = project.queue()[0]
    target = project.objects(chelsea)[2].id
    project.close()
    server = start()
    tab = {"holder": "tab-sig-1", "reviewer": "ann"}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert _post(client, "/api/lease", holder="tab-sig-1")["image"]["id"] == chelsea
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        # A correction in flight (SAM decoded it; its transaction is open) when the signal comes.
        thread, outcome = _in_flight(client, f"/api/objects/{target}/points",
                                     {**tab, "key": "hold-log-sig", "points": [[117, 55, 1]]})
        assert server.expect("held ") == "hold-log-sig"
        server.process.send_signal(signal_number)
        assert server.expect("signal ") == str(int(signal_number))
        server.release()  # the shutdown has begun; the request goes on and is answered
        thread.join(30)
        (answer,) = outcome
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
        assert {o["id"]: o["status"] for o in answer.json()["objects"]}[target] == "corrected"
    assert server.process.wait(30) == 0
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == [] and len(gone) == len(processes)
    assert _port_is_free(server.port)
    log = server.log.read_text()
    assert f"langsam label review: {server.url}" in log and "langsam label review: stopped" in log
    assert "Traceback" not in log
    actions, objects = _state(project_dir)
    assert actions == [("hold-log-sig", "correct", target, 0)] and objects[target][0] == "corrected"
