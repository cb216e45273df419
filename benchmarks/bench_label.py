"""`langsam label propose` against `langsam segment` on the same folder: images per second of the
whole command, in one process, alternating after a warm-up, median ratio.

    python benchmarks/bench_label.py [--images 8] [--repeats 3] [--side 320]

Both commands run the same pipeline (tiny random SAM + Grounding DINO, the same queries,
``--top-k 3``) through ``langsam.cli.batch.process_items`` and load the models once per run.
``segment`` writes only its per-image ``result.json`` (``--save json``, its lightest output);
``propose`` writes each image's proposals into the project database (RLE per object, one
transaction per image, ``synchronous=FULL``). Each propose run gets a fresh project (``label
init`` is not timed). The difference is the bookkeeping: target overhead <= 5%. With tiny models
the model time per image is small, so the ratio is the worst case; real models only add the
same work to both sides. Also prints the time spent in the database per image.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=320, help="longest image side in pixels")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    import langsam.label.propose as propose_module
    from langsam.cli import main as langsam
    from sam_factory import real_photo, save_tiny_sam_checkpoint
    from tiny_gdino import save_tiny_grounding_dino

    torch.set_num_threads(1)  # a shared, loaded machine: one thread is the steadiest measure
    workspace = Path(tempfile.mkdtemp(prefix="bench_label_"))
    images = workspace / "images"
    images.mkdir()
    names = ["chelsea", "coffee", "astronaut", "rocket", "cat", "camera", "hubble_deep_field", "immunohistochemistry"]
    for index in range(args.images):
        image = Image.fromarray(np.ascontiguousarray(real_photo(names[index % len(names)])))
        image.thumbnail((args.side, args.side))
        image.save(images / f"img_{index:02d}.png")
    models = ["--sam-type", "auto", "--sam-checkpoint", str(save_tiny_sam_checkpoint(workspace / "sam.pth")),
              "--detector", str(save_tiny_grounding_dino(workspace / "gdino", seed=0)), "--device", "cpu",
              "--box-threshold", "0", "--text-threshold", "0", "--top-k", "3", "-q"]

    store_seconds = []
    real_store = propose_module.store_proposals

    def timed_store(*call_args, **kwargs):
        started = time.perf_counter()
        try:
            return real_store(*call_args, **kwargs)
        finally:
            store_seconds.append(time.perf_counter() - started)

    propose_module.store_proposals = timed_store
    runs = iter(range(10**6))

    def run(argv: list[str]) -> float:
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as stderr:
            status = langsam(argv)
        elapsed = time.perf_counter() - started
        if status != 0:
            raise SystemExit(f"langsam {' '.join(argv[:2])} failed ({status}):\n{stderr.getvalue()}")
        return elapsed

    def segment() -> float:
        return run(["segment", str(images), "--text", "a cat", "--text", "a dog", "--save", "json",
                    "--out", str(workspace / f"segment_{next(runs)}"), *models])

    def propose() -> float:
        project = workspace / f"project_{next(runs)}"
        run(["label", "init", str(project), "--images", str(images), "--classes", "a cat, a dog"])
        return run(["label", "propose", str(project), *models])

    segment(), propose()  # warm-up: imports, allocator, file cache
    store_seconds.clear()
    times: dict[str, list[float]] = {"segment": [], "propose": []}
    for _ in range(args.repeats):
        times["segment"].append(segment())
        times["propose"].append(propose())
    rates = {name: args.images / statistics.median(values) for name, values in times.items()}
    ratios = [p / s for p, s in zip(times["propose"], times["segment"])]
    print(f"{args.images} images of <= {args.side} px, {args.repeats} alternating runs each, 1 torch thread")
    for name, values in times.items():
        print(f"  {name:8s} median {statistics.median(values):6.2f} s  ({rates[name]:.2f} images/s)")
    print(f"  propose / segment wall time: median ratio {statistics.median(ratios):.3f} "
          f"(overhead {100 * (statistics.median(ratios) - 1):+.1f}%; target <= +5%)")
    print(f"  database per image (store_proposals): median {1000 * statistics.median(store_seconds):.1f} ms")


if __name__ == "__main__":
    main()
