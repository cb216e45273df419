"""Peak memory of segment() and of the automatic mask generator on a 4000x3000 photo.

Each measurement runs in a fresh subprocess (``--child``) and reports its peak resident set
size (``resource.getrusage(...).ru_maxrss``, which sees torch's allocations, unlike
tracemalloc) together with the RSS after the models are loaded, so the figures split into
"models" and "working memory for this image". Ours and Meta's segment_anything run on the same
weights, alternately, and the ratio of their working memories is printed (median over runs).

    python benchmarks/bench_memory.py                       # tiny SAM, 1 and 16 boxes, AMG
    python benchmarks/bench_memory.py --sam vit_b --runs 1  # real vit_b size (random weights)
    python benchmarks/bench_memory.py --calls 200           # RSS over 200 segment() calls
    python benchmarks/bench_memory.py --detector            # + Grounding DINO tiny on the photo
    python benchmarks/bench_memory.py --sam vit_b --e2e --boxes 10 --no-amg --no-reference

Weights are random (nothing is downloaded); memory does not depend on their values. There is
no warm-up run: every measurement is a fresh process, which is exactly what a peak is about.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
PHOTO_SIZE = (3000, 4000)  # (H, W)


# --------------------------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _make_sam(kind: str, seed: int = 0):
    sys.path.insert(0, str(REPO / "tests"))
    from sam_factory import make_tiny_sam, randomize_parameters

    from sam import build_sam

    if kind == "tiny":
        return make_tiny_sam(seed)
    return randomize_parameters(build_sam(kind), seed).eval()


class _FixedBoxes:
    """A detector returning ``count`` boxes spread over the image (the SAM stage is measured)."""

    def __init__(self, count: int):
        self.count = count

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        import numpy as np

        from langsam.detector import Detections

        height, width = image.shape[:2]
        index = np.arange(self.count, dtype=np.float32)
        x0 = (index % 4) * width / 4
        y0 = (index // 4 % 4) * height / 4
        boxes = np.stack([x0, y0, x0 + width / 3, y0 + height / 3], axis=1).astype(np.float32)
        return Detections(boxes=boxes, scores=np.linspace(0.9, 0.5, self.count, dtype=np.float32),
                          labels=[queries[0]] * self.count, label_ids=np.zeros(self.count, np.int64),
                          phrases=[queries[0]] * self.count, queries=list(queries))


def _child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_grad_enabled(False)
    model = _make_sam(args.sam)
    result: dict = {}
    if args.child == "segment_ours":
        from langsam.pipeline import LangSAM

        pipeline = LangSAM(sam_model=model, detector_model=_FixedBoxes(args.boxes), device="cpu")
        pipeline.predictor
        result["after_load"] = _rss()
        segmentation = pipeline.segment(args.photo, "a thing", multimask=args.multimask)
        result["objects"] = len(segmentation)
    elif args.child == "segment_reference":
        from PIL import Image
        from segment_anything import SamPredictor as ReferencePredictor
        from sam_factory import make_reference_sam

        predictor = ReferencePredictor(make_reference_sam(model))
        del model
        result["after_load"] = _rss()
        with Image.open(args.photo) as image:
            pixels = np.array(image.convert("RGB"))
        predictor.set_image(pixels)
        detections = _FixedBoxes(args.boxes).detect(pixels, ["a thing"])
        boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(detections.boxes), pixels.shape[:2])
        masks, scores, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=args.multimask)
        best = scores.argmax(dim=1)
        kept = masks[torch.arange(masks.shape[0]), best].numpy()
        result["objects"] = int(kept.shape[0])
    elif args.child == "amg_ours":
        from langsam.io import load_image
        from sam import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(model, **_amg_params(args))
        result["after_load"] = _rss()
        result["objects"] = len(generator.generate(load_image(args.photo)))
    elif args.child == "amg_reference":
        from PIL import Image
        from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator
        from sam_factory import make_reference_sam

        generator = ReferenceGenerator(make_reference_sam(model), **_amg_params(args))
        del model
        result["after_load"] = _rss()
        with Image.open(args.photo) as image:
            pixels = np.array(image.convert("RGB"))
        result["objects"] = len(generator.generate(pixels))
    elif args.child == "detector_ours":
        from tiny_gdino import make_processor
        from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

        from langsam.detector import GroundingDinoDetector
        from langsam.io import load_image

        del model
        torch.manual_seed(0)
        # grounding-dino-tiny's architecture (Swin-T + BERT-base), random weights, real resizing.
        detector = GroundingDinoDetector(model=GroundingDinoForObjectDetection(GroundingDinoConfig()).eval(),
                                         processor=make_processor(800, 1333), device="cpu")
        result["after_load"] = _rss()
        result["objects"] = len(detector.detect(load_image(args.photo), ["a person", "a rocket"]))
    elif args.child == "e2e_ours":
        from tiny_gdino import make_processor
        from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

        from langsam.detector import GroundingDinoDetector
        from langsam.pipeline import LangSAM

        torch.manual_seed(0)
        detector = GroundingDinoDetector(model=GroundingDinoForObjectDetection(GroundingDinoConfig()).eval(),
                                         processor=make_processor(800, 1333), device="cpu")
        pipeline = LangSAM(sam_model=model, detector_model=detector, device="cpu")
        pipeline.predictor
        result["after_load"] = _rss()
        # Thresholds 0: random weights would find nothing; top_k keeps a realistic object count.
        segmentation = pipeline.segment(args.photo, ["a person", "a rocket"], box_threshold=0.0,
                                        text_threshold=0.0, top_k=args.boxes)
        result["objects"] = len(segmentation)
    elif args.child == "calls_ours":
        from langsam.pipeline import LangSAM

        pipeline = LangSAM(sam_model=model, detector_model=_FixedBoxes(1), device="cpu")
        rng = np.random.default_rng(0)
        samples = []
        for call in range(args.calls):
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # a new image every call
            pipeline.segment(image, "a thing")
            if call in (9, args.calls - 1):
                samples.append(_rss())
        result["after_load"] = samples[0]  # after 10 warm-up calls
        result["rss_end"] = samples[-1]
        result["cache_length"] = len(pipeline._embeddings)
    else:
        raise SystemExit(f"unknown child {args.child}")
    result["peak"] = _peak()
    return result


def _amg_params(args: argparse.Namespace) -> dict:
    # Quality filters off so every decoded mask goes through upscaling and RLE encoding: the
    # worst case for memory. One points batch is the unit of the generator's peak memory.
    return {"points_per_side": args.points_per_side, "points_per_batch": args.points_per_batch,
            "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------


def _measure(kind: str, args: argparse.Namespace, photo: Path, **extra) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--photo", str(photo), "--sam", args.sam,
               "--points-per-side", str(args.points_per_side), "--points-per-batch", str(args.points_per_batch),
               "--calls", str(args.calls)]
    for key, value in extra.items():
        if value is True:
            command.append(f"--{key}")
        elif value is not False:
            command += [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - started
    return result


def _photo(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    import numpy as np
    from PIL import Image
    from sam_factory import real_photo

    path = folder / "photo_4000x3000.png"
    image = Image.fromarray(real_photo("astronaut")).resize(PHOTO_SIZE[::-1], Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).integers(0, 8, (*PHOTO_SIZE, 3), dtype=np.uint8)
    Image.fromarray(np.asarray(image) + noise).save(path)  # noise: a realistic (large) PNG
    return path


def _row(name: str, ours: list[dict], reference: list[dict] | None) -> str:
    def work(results):
        return statistics.median(r["peak"] - r["after_load"] for r in results) / MIB

    def peak(results):
        return statistics.median(r["peak"] for r in results) / MIB

    line = f"{name:<34} ours peak {peak(ours):8.0f} MiB  working {work(ours):8.0f} MiB"
    if reference:
        line += (f" | reference peak {peak(reference):8.0f} MiB  working {work(reference):8.0f} MiB"
                 f" | ratio (working) {work(ours) / work(reference):5.2f}")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 16], help="detected boxes per image")
    parser.add_argument("--multimask", action="store_true")
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--points-per-batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1, help="alternating runs per measurement (median)")
    parser.add_argument("--no-reference", action="store_true", help="skip Meta's segment_anything")
    parser.add_argument("--no-amg", action="store_true")
    parser.add_argument("--detector", action="store_true",
                        help="also measure Grounding DINO (tiny architecture, random weights) on the photo")
    parser.add_argument("--e2e", action="store_true",
                        help="also measure segment() with Grounding DINO tiny (random weights) as the detector")
    parser.add_argument("--calls", type=int, default=0, help="also measure RSS over this many segment() calls")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--photo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.boxes = args.boxes[0]
        print(json.dumps(_child(args)))
        return 0

    print(f"SAM {args.sam} (random weights), photo {PHOTO_SIZE[1]}x{PHOTO_SIZE[0]}, CPU, "
          f"peak = ru_maxrss of a fresh process, working = peak - RSS after loading the models")
    with tempfile.TemporaryDirectory() as folder:
        photo = _photo(Path(folder))
        for count in args.boxes:
            ours, reference = [], []
            for _ in range(args.runs):
                ours.append(_measure("segment_ours", args, photo, boxes=count, multimask=args.multimask))
                if not args.no_reference:
                    reference.append(_measure("segment_reference", args, photo, boxes=count,
                                              multimask=args.multimask))
            print(_row(f"segment(), {count} box(es)", ours, reference or None), flush=True)
        if not args.no_amg:
            ours, reference = [], []
            for _ in range(args.runs):
                ours.append(_measure("amg_ours", args, photo))
                if not args.no_reference:
                    reference.append(_measure("amg_reference", args, photo))
            name = f"AMG {args.points_per_side}^2 pts, batch {args.points_per_batch}"
            print(_row(name, ours, reference or None), flush=True)
        if args.detector:
            result = _measure("detector_ours", args, photo)
            print(_row("Grounding DINO tiny detect()", [result], None), flush=True)
        if args.e2e:
            result = _measure("e2e_ours", args, photo, boxes=args.boxes[-1])
            print(_row(f"segment() end to end, {result['objects']} objects", [result], None), flush=True)
        if args.calls:
            result = _measure("calls_ours", args, photo)
            growth = (result["rss_end"] - result["after_load"]) / MIB
            print(f"{args.calls} segment() calls on new 64x48 images: RSS after 10 calls "
                  f"{result['after_load'] / MIB:.0f} MiB, at the end {result['rss_end'] / MIB:.0f} MiB "
                  f"(growth {growth:+.1f} MiB), embedding cache length {result['cache_length']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
