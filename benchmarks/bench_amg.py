"""Automatic mask generation: ours vs Meta's reference, same random weights, same settings.

    python benchmarks/bench_amg.py [--model vit_b|sam2.1_hiera_tiny|...] [--points-per-side 16] [--repeats 3] [--large]

SAM 1 types compare with `segment_anything.SamAutomaticMaskGenerator`; SAM 2 / 2.1 types with
`sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator` (real-size model from its bundled config).

Runs alternate (reference, ours, reference, ...) after one warm-up each and report medians.
Besides end-to-end time, each run is split into model time (image encoder + mask decoder,
timed with forward hooks; the model code is shared work) and pipeline time (everything
else: upscaling, filters, NMS, RLE), which is what the generator itself controls.
Peak memory is the process RSS high-water mark during the run, above the RSS at its start
(sampled every 2 ms; torch allocations are invisible to tracemalloc).
``--large`` also runs ours alone on a 4000x3000 photo to show memory stays bounded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sam_factory import make_reference_sam, randomize_parameters, real_photo  # noqa: E402

from sam import build_sam, make_mask_generator  # noqa: E402
from sam.build import SAM2_SPECS  # noqa: E402

# Random weights predict low quality scores and low-contrast logits; these let masks through.
SETTINGS = dict(pred_iou_thresh=0.2, stability_score_thresh=0.2, stability_score_offset=0.5)


class PeakRss:
    """Highest resident set size seen while the block runs, minus the RSS at its start."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.bytes = self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class ModelTimer:
    """Accumulates wall time spent inside the image encoder and mask decoder forwards."""

    def __init__(self, model):
        self.seconds = 0.0
        decoder = model.sam_mask_decoder if hasattr(model, "sam_mask_decoder") else model.mask_decoder
        for module in (model.image_encoder, decoder):
            module.register_forward_pre_hook(self._start)
            module.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        self.seconds += time.perf_counter() - self._t0


def _photo(long_side: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.fromarray(real_photo("chelsea"))
    if size is None:
        scale = long_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(size, Image.BILINEAR))


def _run(generator, image, timer):
    timer.seconds = 0.0
    with PeakRss() as memory:
        start = time.perf_counter()
        records = generator.generate(image)
        total = time.perf_counter() - start
    return records, total, timer.seconds, memory.bytes


def _compare(ours, reference) -> str:
    """How close the two outputs are (the decoders differ in the last float bits)."""
    if len(ours) != len(reference):
        return f"different mask counts: ours {len(ours)}, reference {len(reference)}"
    exact, worst_iou, iou_diff, stability_diff = 0, 1.0, 0.0, 0.0
    for a, b in zip(ours, reference):
        inter = np.logical_and(a["segmentation"], b["segmentation"]).sum()
        union = np.logical_or(a["segmentation"], b["segmentation"]).sum()
        worst_iou = min(worst_iou, inter / max(union, 1))
        exact += int(np.array_equal(a["segmentation"], b["segmentation"]))
        iou_diff = max(iou_diff, abs(a["predicted_iou"] - b["predicted_iou"]))
        stability_diff = max(stability_diff, abs(a["stability_score"] - b["stability_score"]))
    return (f"{len(ours)} masks each; {exact} bit-identical; worst mask IoU {worst_iou:.6f}; "
            f"max |d predicted_iou| {iou_diff:.2e}; max |d stability| {stability_diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", help="a registry type (default vit_b)")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7,
                        help="1.0 keeps every mask that passes the filters (random masks all span the image)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--large", action="store_true", help="also run ours on a 4000x3000 photo")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours_model = randomize_parameters(build_sam(args.model), seed=0).eval()
    if args.model in SAM2_SPECS:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as ReferenceGenerator
        from sam2_factory import REFERENCE_CONFIGS, build_reference_sam2

        layout = args.model.split("_hiera_")[1]
        version = SAM2_SPECS[args.model].version
        if (version, layout) not in REFERENCE_CONFIGS:
            raise SystemExit(f"no reference config wired for {args.model}; see tests/sam2_factory.py")
        reference_model = build_reference_sam2(version, layout, width=None)
        reference_model.load_state_dict(ours_model.state_dict(), strict=True)
        reference_model.eval()
    else:
        from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator

        reference_model = make_reference_sam(ours_model)
    image = _photo(long_side=1024)
    params = dict(points_per_side=args.points_per_side, box_nms_thresh=args.box_nms_thresh, **SETTINGS)
    generators = {
        "reference": (ReferenceGenerator(reference_model, **params), ModelTimer(reference_model)),
        "ours": (make_mask_generator(ours_model, **params), ModelTimer(ours_model)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; image {image.shape[1]}x{image.shape[0]}; "
          f"{args.model} random weights; {params}")

    results = {name: [] for name in generators}
    outputs = {}
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        for name, (generator, timer) in generators.items():
            records, total, model_s, peak = _run(generator, image, timer)
            outputs[name] = records
            tag = "warm-up" if round_index == 0 else f"run {round_index}"
            print(f"  {tag:8s} {name:9s} total {total:7.2f} s  model {model_s:7.2f} s  "
                  f"pipeline {total - model_s:6.2f} s  peak +{peak / 2**20:7.1f} MiB  masks {len(records)}")
            if round_index:
                results[name].append((total, model_s, total - model_s, peak))

    med = {name: [statistics.median(r[i] for r in runs) for i in range(4)] for name, runs in results.items()}
    print(f"\noutput: {_compare(outputs['ours'], outputs['reference'])}")
    print(f"{'median':10s} {'total s':>9s} {'model s':>9s} {'pipeline s':>11s} {'peak MiB':>9s}")
    for name in generators:
        total, model_s, pipeline_s, peak = med[name]
        print(f"{name:10s} {total:9.2f} {model_s:9.2f} {pipeline_s:11.2f} {peak / 2**20:9.1f}")
    ratio = [med["ours"][i] / med["reference"][i] for i in range(4)]
    print(f"{'ratio':10s} {ratio[0]:9.2f}x {ratio[1]:8.2f}x {ratio[2]:10.2f}x {ratio[3]:8.2f}x   (ours / reference)")

    if args.large:
        large = _photo(size=(4000, 3000))
        generator = make_mask_generator(ours_model, output_mode="coco_rle", **params)
        records, total, model_s, peak = _run(generator, large, generators["ours"][1])
        print(f"\nours on 4000x3000 (coco_rle): total {total:.2f} s, model {model_s:.2f} s, "
              f"peak +{peak / 2**20:.1f} MiB, {len(records)} masks")


if __name__ == "__main__":
    main()
