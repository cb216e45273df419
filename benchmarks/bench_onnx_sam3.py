"""SAM 3 on the CPU: onnxruntime (sam.export.OnnxSam3Predictor) vs PyTorch (sam.sam3.Sam3Predictor).

    python benchmarks/bench_onnx_sam3.py [--size tiny|released] [--repeats 5] [--threads N]
    python benchmarks/bench_onnx_sam3.py --size released --vit-depth 2 --text-layers 2 --repeats 3

`tiny` is the test model of tests/sam3_factory.py (168 px, 3-layer ViT); `released` is Meta's
sizes (1008 px, 32-layer ViT, 24-layer text encoder, 840M parameters) with random weights: the
export takes minutes and about 7 GB of memory; `--vit-depth` / `--text-layers` make it shallower
(1008 px, released widths and heads). The model is exported once
(sam.export.export_sam3_onnx), then each stage is timed alternately after a warm-up, in one
process with the same thread count:

* image: `set_image` of a 512x512 photo (preprocessing + image encoder);
* text: the text encoder on one query (`model.encode_text`, what a new query costs once);
* heads: `predict(text=...)` with the text cached (DETR heads + post-processing to the photo).

Prints median times, median ratios onnxruntime / PyTorch (below 1: onnxruntime is faster), and the
largest differences of the features and scores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _model(args, folder: Path):
    from sam.sam3 import Sam3Config, Sam3Image, load_sam3

    if args.size == "tiny":
        from sam3_factory import save_tiny_sam3

        return load_sam3(save_tiny_sam3(folder / "checkpoint")["meta"])
    torch.manual_seed(0)
    depth = args.vit_depth
    global_blocks = tuple(i for i in (7, 15, 23, 31) if i < depth) or (depth - 1,)
    config = Sam3Config(image_size=args.image_size, vit_depth=depth, global_blocks=global_blocks,
                        text_layers=args.text_layers)
    return Sam3Image(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "released"), default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vit-depth", type=int, default=32, help="released: ViT blocks (32 as released)")
    parser.add_argument("--image-size", type=int, default=1008, help="released: input size (1008 as released)")
    parser.add_argument("--text-layers", type=int, default=24, help="released: text encoder layers (24 as released)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from skimage import data

    from sam.export import OnnxSam3Predictor, export_sam3_onnx
    from sam.sam3 import Sam3Predictor
    from sam.sam3.text import tokenize

    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_sam3_"))
    model = _model(args, folder)
    start = time.perf_counter()
    export = export_sam3_onnx(model, folder / "onnx", verify=False)
    export_seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    photo = data.astronaut()
    ours, onnx = Sam3Predictor(model), OnnxSam3Predictor(export.directory, session_options=options)
    ids = tokenize(["an astronaut"], model.config.context_length)

    def timed(function, *arguments, **keywords) -> float:
        begin = time.perf_counter()
        function(*arguments, **keywords)
        return time.perf_counter() - begin

    def encode_text(predictor) -> None:
        with torch.inference_mode():
            predictor.model.encode_text(ids)

    stages = {
        "image": lambda predictor: predictor.set_image(photo),
        "text": encode_text,
        "heads": lambda predictor: predictor.predict(text="an astronaut"),
    }
    times: dict[str, dict[str, list[float]]] = {}
    for stage, run in stages.items():
        timed(run, ours), timed(run, onnx)  # warm-up (and, for "heads", the text cache)
        times[stage] = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.repeats):
            times[stage]["pytorch"].append(timed(run, ours))
            times[stage]["onnxruntime"].append(timed(run, onnx))

    feature_error = max(float((a - b).abs().max()) for a, b in zip(onnx._features.feats, ours._features.feats))
    expected, result = ours.predict(text="an astronaut", threshold=0.0), onnx.predict(text="an astronaut", threshold=0.0)
    score_error = float(np.abs(expected.scores - result.scores).max())
    box_error = float(np.abs(expected.boxes - result.boxes).max()) / max(photo.shape[:2])
    ious = [float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(result.masks, expected.masks)]
    sizes = ", ".join(f"{path.name} {sum(p.stat().st_size for p in path.parent.glob(path.name + '*')) / 2**20:.1f} MiB"
                      for path in (export.image_encoder, export.text_encoder, export.heads))
    shape = "" if args.size == "tiny" else (f" ({args.image_size} px, ViT depth {args.vit_depth}, text layers "
                                            f"{args.text_layers})")
    print(f"SAM 3 {args.size}{shape} (random weights), threads {torch.get_num_threads()}, export {export_seconds:.0f} s, {sizes}")
    for stage, by_runtime in times.items():
        medians = {name: statistics.median(values) for name, values in by_runtime.items()}
        ratio = statistics.median(o / p for o, p in zip(by_runtime["onnxruntime"], by_runtime["pytorch"]))
        print(f"{stage:<6} pytorch {medians['pytorch'] * 1000:9.1f} ms   onnxruntime {medians['onnxruntime'] * 1000:9.1f} ms"
              f"   ratio onnxruntime/pytorch {ratio:.2f}")
    print(f"max |feature difference| {feature_error:.1e}; max |score difference| {score_error:.1e}; max |box "
          f"difference| {box_error:.1e} of the image size; mask IoU min {min(ious):.5f} over {len(ious)} queries")


if __name__ == "__main__":
    main()
