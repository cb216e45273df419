"""SAM 2.1 set_image cost: ours vs Meta's reference (`sam2` package), same weights, same run.

    python benchmarks/bench_sam2_encoder.py [--model-type sam2.1_hiera_tiny sam2.1_hiera_base_plus]
                                            [--repeats 5] [--threads N]

Ours is `ResizeSquare.to_input_tensor` + `Sam2.encode_image`; the reference is
`SAM2ImagePredictor.set_image`: both take the uint8 photo to the multi-level features the
decoder uses. Runs alternate (ours, reference, ours, ...) after a warm-up of each; prints the
median times, their ratio (target: ours <= 0.75x the reference on CPU), and the largest
feature differences (parity must hold while we are faster). On a shared machine wall time is
noisy; the process CPU time is printed too (with --threads 1 it measures the work itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

REFERENCE_CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def run(model_type: str, image: np.ndarray, repeats: int, device: str) -> float:
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam_factory import randomize_parameters

    from sam import build_sam
    from sam.transforms import transform_for

    torch.manual_seed(0)
    ours_model = randomize_parameters(build_sam(model_type), seed=0)
    reference_model = build_sam2(REFERENCE_CONFIGS[model_type], None, device="cpu")
    reference_model.load_state_dict(ours_model.state_dict(), strict=True)
    ours_model.to(device).eval()
    reference_model.to(device).eval()
    reference = SAM2ImagePredictor(reference_model)
    transform = transform_for(ours_model)
    ours_features: dict = {}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(step) -> tuple[float, float]:
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        return time.perf_counter() - start, time.process_time() - start_cpu

    def ours_step() -> None:
        with torch.inference_mode():
            ours_features.update(ours_model.encode_image(transform.to_input_tensor(image, device)))

    def reference_step() -> None:
        reference.set_image(image)

    timed(ours_step), timed(reference_step)  # warm-up
    ours_times, reference_times = [], []
    for _ in range(repeats):
        ours_times.append(timed(ours_step))
        reference_times.append(timed(reference_step))
    differences = [(ours_features["image_embed"] - reference._features["image_embed"]).abs().max().item()]
    differences += [
        (a - b).abs().max().item()
        for a, b in zip(ours_features["high_res_feats"], reference._features["high_res_feats"])
    ]
    print(f"{model_type}, image {image.shape[1]}x{image.shape[0]}, threads {torch.get_num_threads()}, {device}")
    ratio = 1.0
    for index, clock in enumerate(("wall", "cpu")):
        ours_clock = [t[index] for t in ours_times]
        reference_clock = [t[index] for t in reference_times]
        ours_median, reference_median = statistics.median(ours_clock), statistics.median(reference_clock)
        pairwise = statistics.median(o / r for o, r in zip(ours_clock, reference_clock))
        print(f"  [{clock}] reference: median {reference_median:.3f} s  ({', '.join(f'{t:.2f}' for t in reference_clock)})")
        print(f"  [{clock}] ours:      median {ours_median:.3f} s  ({', '.join(f'{t:.2f}' for t in ours_clock)})")
        print(
            f"  [{clock}] ratio ours/reference: {ours_median / reference_median:.3f} "
            f"(median of pairwise {pairwise:.3f}); target <= 0.75"
        )
        if index == 0:
            ratio = ours_median / reference_median
    print(f"  max |feature difference| (embed, s0, s1): {', '.join(f'{d:.1e}' for d in differences)}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-type", nargs="+", default=["sam2.1_hiera_tiny", "sam2.1_hiera_base_plus"],
        choices=sorted(REFERENCE_CONFIGS),
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image
    from sam_factory import real_photo

    # A real photo at 1024x768.
    image = np.array(Image.fromarray(real_photo("astronaut")).resize((1024, 768), Image.Resampling.BICUBIC))
    for model_type in args.model_type:
        run(model_type, image, args.repeats, args.device)


if __name__ == "__main__":
    main()
