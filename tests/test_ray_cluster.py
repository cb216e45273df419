"""`langsam segment --ray` on a cluster of three Ray nodes on this machine
(``ray.cluster_utils.Cluster``: a head and two worker nodes, each a raylet with its own logical
CPUs), one of which is lost in the middle of the job while its worker holds an image."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from langsam import cli
from langsam.cli.batch import FAILURES_NAME
from ray_support import NodeLossBuilder
from test_cli_segment import run_main

ray = pytest.importorskip("ray", reason='the distributed tests need pip install "langsam[distributed]"')
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from test_distributed import (GOOD_KEYS, assert_same_outputs, local_segment, models, photos,  # noqa: E402,F401
                              segment_argv)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: Generous bound on waiting for a worker that is loading its models (a loaded 2-core machine).
WAIT_S = 240


@ray.remote(num_cpus=1)
class _Seat:
    """Holds one logical CPU of the node it is pinned to, until killed."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


@pytest.fixture()
def three_nodes():
    """A head (1 CPU, held by a seat actor until the test frees it) and two worker nodes of 1
    CPU each, the test process connected as the driver. With the head's CPU taken, the two
    model workers of a run can only start one on each worker node; freeing it gives the worker
    of a lost node somewhere to restart."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
                                           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
        head = ray.get_runtime_context().get_node_id()
        seat = _Seat.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
        assert ray.get(seat.node.remote()) == head
        context = ray.data.DataContext.get_current()
        saved = context.enable_progress_bars, context.max_tasks_in_flight_per_actor
        # One image at a time per worker: one held image keeps its worker busy, and the others
        # wait for the second worker.
        context.enable_progress_bars, context.max_tasks_in_flight_per_actor = False, 1
        yield cluster, workers, seat
        context.enable_progress_bars, context.max_tasks_in_flight_per_actor = saved
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_losing_a_worker_node_mid_job_still_does_every_image_once(three_nodes, photos, models, local_segment,
                                                                  tmp_path, monkeypatch):
    cluster, (victim, survivor), seat = three_nodes
    markers, release = tmp_path / "markers", tmp_path / "release"
    markers.mkdir()
    monkeypatch.setattr("langsam.distributed.PipelineBuilder", functools.partial(
        NodeLossBuilder, markers=str(markers), victim_node=victim.node_id, release=str(release)))
    written = Counter()
    write = cli.segment._write_files

    def count_writes(out_dir, key, *args, **kwargs):
        written[key] += 1
        return write(out_dir, key, *args, **kwargs)

    monkeypatch.setattr(cli.segment, "_write_files", count_writes)

    problems = []

    def lose_the_victim() -> None:
        """Once the victim's worker holds an image: free the head's CPU, kill the victim node's
        processes (raylet, object store, its worker), then let the other worker go on."""
        try:
            deadline = time.monotonic() + WAIT_S
            while not (markers / "victim-started").exists():
                if time.monotonic() > deadline:
                    problems.append("the worker on the victim node never began an image")
                    break
                time.sleep(0.05)
            ray.kill(seat)
            cluster.remove_node(victim, allow_graceful=False)
        except Exception as error:  # reported by the test below, not lost in this thread
            problems.append(f"{type(error).__name__}: {error}")
        finally:
            release.touch()

    loser = threading.Thread(target=lose_the_victim, daemon=True)
    loser.start()
    out = tmp_path / "out"
    status, stdout, stderr = run_main(segment_argv(photos, models, out, "--ray", cluster.address, "--workers", "2"))
    loser.join(timeout=60)
    assert not problems, problems
    assert status == cli.EXIT_OK, stderr
    assert "4 images: 4 processed, 0 skipped, 0 failed" in stdout
    assert not (out / FAILURES_NAME).exists()

    # The victim's worker really had an image when its node went, and that image was begun
    # again elsewhere; every image was finished once on a live node and written once here.
    events = [name.split("-") for name in os.listdir(markers) if name != "victim-started"]
    started = Counter((node == victim.node_id, size) for event, node, size, _ in events if event == "started")
    finished = Counter((node, size) for event, node, size, _ in events if event == "finished")
    (lost_size,) = [size for on_victim, size in started if on_victim]
    assert started[(False, lost_size)] == 1
    assert all(node != victim.node_id for node, _ in finished)
    finished_sizes = Counter(size for _, size in finished.elements())
    assert len(finished_sizes) == len(GOOD_KEYS) and set(finished_sizes.values()) == {1}
    assert lost_size in finished_sizes
    assert written == {key: 1 for key in GOOD_KEYS}
    # ...and the files are those of a local run, nothing missing, nothing extra.
    assert_same_outputs(local_segment, out)
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert victim.node_id not in alive and survivor.node_id in alive
