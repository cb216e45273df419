"""CLIP mask scoring: cost of a further query on a cached image vs the first query.

    python benchmarks/bench_clip.py [--masks 100] [--model ViT-B-32] [--pretrained FILE] [--device cpu]

The first query on an image builds a ClipMaskIndex (crop + embed every mask, in batches) and then
answers the query; every further query only encodes its text and does one matrix product. The first
query's time here EXCLUDES the automatic mask generator (SAM), so the printed ratio is an upper
bound of what a user sees (SAM's whole-image pass makes the first query much slower still).

Also prints batched crop embedding vs the reference way (open_clip encode_image one crop at a time).
Runs alternate, after a warm-up; medians are reported. Random weights unless --pretrained is given
(speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langsam.clip_scorer import ClipScorer  # noqa: E402


def superpixel_masks(image: np.ndarray, count: int) -> np.ndarray:
    """``count`` real-looking masks: SLIC superpixels, then unions of 2, 3, 4 ... neighbouring
    superpixels (bigger objects), as SAM's automatic masks mix parts and wholes."""
    from skimage.segmentation import slic

    segments = slic(image, n_segments=max(2, count // 2), start_label=0, compactness=10)
    labels = np.unique(segments)
    masks = [segments == label for label in labels]
    group = 2
    while len(masks) < count and group <= len(labels):
        for start in range(0, len(labels) - group + 1, group):
            masks.append(np.isin(segments, labels[start:start + group]))
        group += 1
    return np.stack(masks[:count])


def timed(function) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time stays fair when other jobs share the machine."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="weights tag or file (default: random weights)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="first-query runs (each builds a new index)")
    parser.add_argument("--reference-masks", type=int, default=32)
    parser.add_argument("--queries-per-image", type=int, default=10)
    args = parser.parse_args(argv)

    from skimage import data

    image = data.astronaut()
    masks = superpixel_masks(image, args.masks)
    scorer = ClipScorer(args.model, pretrained=args.pretrained, device=args.device)
    print(f"{scorer}; {len(masks)} masks on a {image.shape[1]}x{image.shape[0]} image, "
          f"batch_size={scorer.batch_size}, torch threads={torch.get_num_threads()}")

    words = ["astronaut", "flag", "helmet", "rocket", "glove", "face", "suit", "sky", "badge", "hair",
             "person", "space shuttle", "patch", "zipper", "collar", "background object", "logo", "eye"]
    fresh_query = (f"{words[i % len(words)]} number {i}" for i in range(10**6))  # never in the text cache

    # warm-up: allocator, kernels, the background prompt's embedding
    scorer.build_index(image, masks[:scorer.batch_size]).query([next(fresh_query)])

    first_times, further_times = [], []
    for _ in range(args.repeats):
        holder = {}

        def first_query():
            holder["index"] = scorer.build_index(image, masks)
            holder["index"].query([next(fresh_query), next(fresh_query)])

        first_times.append(timed(first_query))
        for _ in range(args.queries_per_image):
            further_times.append(timed(lambda: holder["index"].query([next(fresh_query), next(fresh_query)])))
    (first_wall, first_cpu), (further_wall, further_cpu) = median_pair(first_times), median_pair(further_times)
    print(f"first query (index build + query, SAM excluded): median wall {first_wall * 1000:9.1f} ms, "
          f"cpu {first_cpu * 1000:9.1f} ms over {len(first_times)}")
    print(f"further query on the cached image (2 new texts):  median wall {further_wall * 1000:9.1f} ms, "
          f"cpu {further_cpu * 1000:9.1f} ms over {len(further_times)}")
    print(f"further / first = {further_wall / first_wall:.2%} wall, {further_cpu / first_cpu:.2%} cpu  (target < 5%)")

    # batched embedding vs the reference one-crop-per-call loop, alternating
    reference_masks = masks[:args.reference_masks]
    crops = [scorer.crop(image, mask) for mask in reference_masks]

    @torch.inference_mode()
    def reference_one_by_one():
        for crop in crops:
            scorer.model.encode_image(scorer.preprocess(crop)[None].to(scorer.device, scorer.dtype))

    def ours_batched():
        scorer.embed_masks(image, reference_masks)

    ratios = []
    for _ in range(3):
        ours_wall, ours_cpu = timed(ours_batched)
        reference_wall, reference_cpu = timed(reference_one_by_one)
        ratios.append((ours_wall / reference_wall, ours_cpu / reference_cpu))
    wall_ratio, cpu_ratio = median_pair(ratios)
    print(f"embed {len(crops)} masks: ours (batched, cropping included) / open_clip one crop per call "
          f"(crops given) = {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x cpu (median of {len(ratios)})")


if __name__ == "__main__":
    main()
