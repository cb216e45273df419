"""Helpers the Ray workers of tests/test_distributed.py import (the tests folder is on their
PYTHONPATH): pipeline builders whose pipeline kills its own process mid-image: once in a run
(:class:`CrashingBuilder`), or on given images once or at every attempt (:class:`DyingBuilder`);
and one whose pipeline holds its image until a node is lost (:class:`NodeLossBuilder`)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

from langsam.distributed import PipelineBuilder


class CrashingBuilder(PipelineBuilder):
    """Builds the real pipeline; the first worker process to reach its ``crash_after``-th image
    creates ``crash_marker`` and SIGKILLs itself in the middle of that image. The marker is
    created atomically before the kill, so exactly one process dies in the whole run."""

    def __init__(self, mode: str = "grounded", *, crash_marker: str, crash_after: int = 2, **model_kwargs: Any):
        super().__init__(mode, **model_kwargs)
        self.crash_marker = crash_marker
        self.crash_after = crash_after

    def __call__(self) -> Any:
        return _CrashingPipeline(super().__call__(), self.crash_marker, self.crash_after)


class _CrashingPipeline:
    def __init__(self, pipeline: Any, marker: str, after: int) -> None:
        self.pipeline, self.marker, self.after, self.calls = pipeline, marker, after, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def _maybe_die(self) -> None:
        self.calls += 1
        if self.calls < self.after:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process already died for this run
        os.kill(os.getpid(), signal.SIGKILL)

    def segment(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_die()
        return self.pipeline.segment(*args, **kwargs)

    def auto_masks(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_die()
        return self.pipeline.auto_masks(*args, **kwargs)


class DyingBuilder(PipelineBuilder):
    """Builds the real pipeline; a worker process that gets an image of one of ``die_sizes``
    (decoded ``(height, width)``) ends at once with ``os._exit(1)``, as a crashing decoder or an
    out-of-memory kill would: at every attempt for ``"always"`` sizes (a poison image), at the
    first attempt only for ``"once"`` sizes. Each death first creates a file
    ``HxW-<unique>`` under ``deaths``, so the test counts them per image."""

    def __init__(self, mode: str = "grounded", *, deaths: str, die_sizes: dict[tuple[int, int], str],
                 **model_kwargs: Any):
        super().__init__(mode, **model_kwargs)
        self.deaths = deaths
        self.die_sizes = {tuple(size): when for size, when in die_sizes.items()}

    def __call__(self) -> Any:
        return _DyingPipeline(super().__call__(), self.deaths, self.die_sizes)


class _DyingPipeline:
    def __init__(self, pipeline: Any, deaths: str, die_sizes: dict[tuple[int, int], str]) -> None:
        self.pipeline, self.deaths, self.die_sizes = pipeline, deaths, die_sizes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def _maybe_die(self, image: Any) -> None:
        size = tuple(image.shape[:2])
        when = self.die_sizes.get(size)
        if when is None:
            return
        name = f"{size[0]}x{size[1]}"
        if when == "once":
            try:  # atomic: only the first process to get here dies
                open(os.path.join(self.deaths, f"{name}-first"), "x").close()
            except FileExistsError:
                return
        else:
            open(os.path.join(self.deaths, f"{name}-{uuid.uuid4().hex}"), "x").close()
        os._exit(1)

    def segment(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        self._maybe_die(image)
        return self.pipeline.segment(image, *args, **kwargs)

    def auto_masks(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        self._maybe_die(image)
        return self.pipeline.auto_masks(image, *args, **kwargs)


class NodeLossBuilder(PipelineBuilder):
    """Builds the real pipeline for tests/test_ray_cluster.py; each image a worker begins and
    ends leaves a file under ``markers`` (``started-<node>-HxW-<unique>``, then
    ``finished-...``), ``<node>`` being the Ray node id. A worker on ``victim_node`` creates
    ``victim-started`` at its first image and then holds it until its process ends (the test
    removes that node); a worker elsewhere holds its image until the file ``release`` exists
    (the test creates it once the node is gone), so the victim surely gets an image to lose."""

    def __init__(self, mode: str = "grounded", *, markers: str, victim_node: str, release: str,
                 **model_kwargs: Any):
        super().__init__(mode, **model_kwargs)
        self.markers, self.victim_node, self.release = markers, victim_node, release

    def __call__(self) -> Any:
        import ray

        node = ray.get_runtime_context().get_node_id()
        return _NodeLossPipeline(super().__call__(), self, node)


class _NodeLossPipeline:
    def __init__(self, pipeline: Any, builder: NodeLossBuilder, node: str) -> None:
        self.pipeline, self.builder, self.node = pipeline, builder, node

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def _mark(self, event: str, image: Any) -> None:
        size = "x".join(map(str, image.shape[:2]))
        open(os.path.join(self.builder.markers, f"{event}-{self.node}-{size}-{uuid.uuid4().hex}"), "x").close()

    def segment(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        self._mark("started", image)
        if self.node == self.builder.victim_node:
            open(os.path.join(self.builder.markers, "victim-started"), "x").close()
            threading.Event().wait()  # until the node, and this process with it, is gone
        while not os.path.exists(self.builder.release):  # the test's go-ahead, not a guess at timing
            time.sleep(0.02)
        result = self.pipeline.segment(image, *args, **kwargs)
        self._mark("finished", image)
        return result
