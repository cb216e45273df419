"""The child process of tests/test_label_crash.py: ``langsam label review`` as a user runs it,
with three test hooks patched in around the real code and a clock read from a file.

    python tests/label_server_support.py CLOCK_FILE label review PROJECT --port 0 ...

It reports on stdout, one line each (the test reads them to know where the server is, so a kill
or a signal lands at a known point whatever the machine's speed):

* ``ready URL`` once the port is open (the server's own line goes to stderr);
* ``held KEY`` when an action whose idempotency key starts with ``hold-log-`` has written its
  rows but not committed them (inside its transaction), or one whose key starts with
  ``hold-done-`` has committed but not answered yet. It then blocks until a line arrives on
  stdin. Each key is held once, the first time it comes (in any process: a marker file next to
  CLOCK_FILE), so a retried request goes through;
* ``signal N`` once uvicorn has taken signal N (it then begins its graceful shutdown).

The project's clock (leases, ``reviewed_at``) is the number in CLOCK_FILE, read at every call,
so the test expires leases without sleeping.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _hold(key: str, folder: Path) -> None:
    """Report and block, the first time ``key`` comes here in any process (a retry goes through)."""
    try:
        (folder / f"held-{key}").touch(exist_ok=False)
    except FileExistsError:
        return
    _report(f"held {key}")
    sys.stdin.readline()


def patch(clock_file: Path) -> None:
    import time

    import torch
    import uvicorn

    from langsam.label import project as project_module
    from langsam.label import review

    torch.set_num_threads(1)
    Project = project_module.Project

    def file_clock() -> float:
        return float(clock_file.read_text())

    real_init = Project.__init__

    def init(self, path, *, clock=time.time):
        real_init(self, path, clock=file_clock if clock is time.time else clock)

    Project.__init__ = init

    real_log = Project._log

    def log(db, key, *args):
        real_log(db, key, *args)
        if key.startswith("hold-log-"):
            _hold(key, clock_file.parent)

    Project._log = staticmethod(log)

    real_act = Project._act

    def act(self, kind, key, *args):
        result = real_act(self, kind, key, *args)
        if key.startswith("hold-done-"):
            _hold(key, clock_file.parent)
        return result

    Project._act = act

    real_run = review.ReviewServer.run

    def run(self):
        _report(f"ready {self.url}")
        return real_run(self)

    review.ReviewServer.run = run

    real_handle_exit = uvicorn.Server.handle_exit

    def handle_exit(self, sig, frame):
        real_handle_exit(self, sig, frame)
        _report(f"signal {int(sig)}")

    uvicorn.Server.handle_exit = handle_exit


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    patch(Path(sys.argv[1]))
    from langsam.cli import main

    sys.exit(main(sys.argv[2:]))
