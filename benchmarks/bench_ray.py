"""`langsam segment --ray` against the local run: wall time of the whole command over the same
small images, each run a fresh process, alternating after a warm-up.

    python benchmarks/bench_ray.py [--images 8] [--repeats 3] [--workers 2] [--side 320]

Three commands on the same inputs and tiny random models (no weights can be downloaded here):

* local: ``langsam segment IMAGES ...``
* ray (cold): ``... --ray --workers N``: starts a local Ray cluster, starts N workers (each
  imports torch and loads the models), runs, stops the cluster. What a one-off user pays.
* ray (warm cluster): ``... --ray HOST:PORT --workers N``, joining a cluster this script
  started once: the job's own cost (workers, scheduling, results back to the driver).

Prints each median, the ratio to local (target on this machine: ray <= 1.5x local) and checks
that every run wrote the same masks. With tiny models a run is almost all start-up, so the
ratio is the worst case; on real models the per-image work is the same in both engines and
the fixed cost is divided over more images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--side", type=int, default=320, help="longest image side in pixels")
    args = parser.parse_args()

    import numpy as np
    import ray
    from PIL import Image
    from sam_factory import real_photo, save_tiny_sam_checkpoint
    from tiny_gdino import save_tiny_grounding_dino

    workspace = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    names = ["chelsea", "coffee", "astronaut", "rocket", "cat", "camera", "hubble_deep_field", "immunohistochemistry"]
    for index in range(args.images):
        image = Image.fromarray(np.ascontiguousarray(real_photo(names[index % len(names)])))
        image.thumbnail((args.side, args.side))
        image.save(workspace / f"img_{index:02d}.png")
    checkpoint = save_tiny_sam_checkpoint(workspace / "sam.pth")
    detector = save_tiny_grounding_dino(workspace / "gdino", seed=0)
    inputs = sorted(str(p) for p in workspace.glob("img_*.png"))
    common = [*inputs, "--text", "a cat", "--text", "a cup", "--box-threshold", "0", "--text-threshold", "0",
              "--top-k", "3", "--sam-type", "auto", "--sam-checkpoint", str(checkpoint), "--detector", str(detector),
              "--device", "cpu", "--quiet"]
    # Each new local cluster writes a fresh token to ~/.ray/auth_token, which would lock the
    # warm cluster's clients out once a cold run has started its own; this machine only.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False)  # the warm cluster
    address = ray.get_runtime_context().gcs_address
    commands = {
        "local": [],
        "ray (cold)": ["--ray", "--workers", str(args.workers)],
        "ray (warm cluster)": ["--ray", address, "--workers", str(args.workers)],
    }

    def run(name: str, repeat: int) -> tuple[float, Path]:
        out = workspace / f"out_{name.split()[0]}_{len(name)}_{repeat}"
        command = [sys.executable, "-m", "langsam", "segment", *common, "--out", str(out), *commands[name]]
        start = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workspace)
        elapsed = time.perf_counter() - start
        if completed.returncode != 0:
            raise SystemExit(f"{name} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        return elapsed, out

    for name in commands:  # warm-up: file caches, Ray's first worker start
        run(name, -1)
    times: dict[str, list[float]] = {name: [] for name in commands}
    outputs: dict[str, Path] = {}
    for repeat in range(args.repeats):
        for name in commands:
            elapsed, outputs[name] = run(name, repeat)
            times[name].append(elapsed)
    ray.shutdown()

    def masks(out: Path) -> dict:
        coco = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
        return {(a["image_id"], a["category_id"]): a["segmentation"]["counts"] for a in coco["annotations"]}

    same = all(masks(outputs[name]) == masks(outputs["local"]) for name in commands)
    local = statistics.median(times["local"])
    print(f"{args.images} images of at most {args.side} px, tiny random models, {os.cpu_count()} CPUs, "
          f"--workers {args.workers}")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:20s} median {median:6.2f} s  ({', '.join(f'{t:.2f}' for t in measured)})  "
              f"ratio to local {median / local:.2f}")
    print(f"ratio ray (cold) / local: {statistics.median(times['ray (cold)']) / local:.2f}; "
          f"ray (warm cluster) / local: {statistics.median(times['ray (warm cluster)']) / local:.2f}; target <= 1.5")
    print(f"same masks in every run: {same}")


if __name__ == "__main__":
    main()
