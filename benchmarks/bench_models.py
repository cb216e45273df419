"""`SamPredictor.set_image` cost of each SAM type, relative to vit_b, in one process.

    python benchmarks/bench_models.py [--types vit_b,sam2.1_hiera_tiny,sam2.1_hiera_small,sam2.1_hiera_base_plus]
                                      [--repeats 3] [--threads N]

Random weights (the cost does not depend on them), a 1024x768 real photo, float32 on CPU. Types
are measured round-robin after one warm-up each, so machine load hits them alike; the table gives
medians, the ratio to vit_b and each model's parameter count. This is what picks the default SAM
of `LangSAM` (see the README's model table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sam_factory import randomize_parameters, real_photo  # noqa: E402

from sam import SamPredictor, build_sam  # noqa: E402

DEFAULT_TYPES = "vit_b,sam2.1_hiera_tiny,sam2.1_hiera_small,sam2.1_hiera_base_plus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = args.types.split(",")
    if "vit_b" not in types:
        types.insert(0, "vit_b")
    image = np.asarray(Image.fromarray(real_photo("chelsea")).resize((1024, 768), Image.BILINEAR))

    predictors = {}
    for name in types:
        torch.manual_seed(0)
        model = randomize_parameters(build_sam(name), seed=0).eval()
        predictors[name] = SamPredictor(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; image 1024x768; float32 CPU")

    times: dict[str, list[float]] = {name: [] for name in types}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.set_image(image)
            elapsed = time.perf_counter() - start
            if round_index:
                times[name].append(elapsed)
            print(f"  {'warm-up' if round_index == 0 else f'run {round_index}':8s} {name:24s} {elapsed:7.2f} s")

    baseline = statistics.median(times["vit_b"])
    print(f"\n{'type':24s} {'params (M)':>10s} {'set_image s':>12s} {'vs vit_b':>9s}")
    for name, predictor in predictors.items():
        params = sum(p.numel() for p in predictor.model.parameters()) / 1e6
        median = statistics.median(times[name])
        print(f"{name:24s} {params:10.1f} {median:12.2f} {median / baseline:8.2f}x")


if __name__ == "__main__":
    main()
