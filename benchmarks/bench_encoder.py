"""set_image (image encoder) time for vit_b: ours vs Meta's reference, same weights, same run.

    python benchmarks/bench_encoder.py [--model-type vit_b] [--repeats 5] [--threads N]

Prints the median time of each, their ratio (target: ours <= 0.75x the reference on CPU), and
the largest embedding difference (parity must hold while we are faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image
    from sam_factory import make_reference_sam, randomize_parameters, real_photo
    from segment_anything import SamPredictor as ReferencePredictor

    from sam import SamPredictor, build_sam

    torch.manual_seed(0)
    ours_model = randomize_parameters(build_sam(args.model_type), seed=0).to(args.device)
    reference_model = make_reference_sam(ours_model.cpu()).to(args.device)
    ours_model.to(args.device)
    # A real photo at 1024 px on its longest side.
    photo = Image.fromarray(real_photo("astronaut")).resize((1024, 1024), Image.Resampling.BICUBIC)
    image = np.asarray(photo)

    ours, reference = SamPredictor(ours_model), ReferencePredictor(reference_model)

    def timed(predictor) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        predictor.set_image(image)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(ours), timed(reference)  # warm-up
    ours_times, reference_times = [], []
    for _ in range(args.repeats):
        ours_times.append(timed(ours))
        reference_times.append(timed(reference))
    difference = (ours.features - reference.features).abs().max().item()
    ours_median, reference_median = statistics.median(ours_times), statistics.median(reference_times)
    ratios = [o / r for o, r in zip(ours_times, reference_times)]
    print(f"model {args.model_type}, image {image.shape[1]}x{image.shape[0]}, threads {torch.get_num_threads()}")
    print(f"reference set_image: median {reference_median:.3f} s  ({', '.join(f'{t:.3f}' for t in reference_times)})")
    print(f"ours      set_image: median {ours_median:.3f} s  ({', '.join(f'{t:.3f}' for t in ours_times)})")
    print(f"ratio ours/reference: {ours_median / reference_median:.3f} (median of pairwise {statistics.median(ratios):.3f}); target <= 0.75")
    print(f"max |embedding difference|: {difference:.2e}")


if __name__ == "__main__":
    main()
