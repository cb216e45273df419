"""Helpers the Ray workers of tests/test_distributed.py import (the tests folder is on their
PYTHONPATH): a pipeline builder whose pipeline kills its own process once, mid-run."""

from __future__ import annotations

import os
import signal
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
