"""SAM 3 on the CPU: onnxruntime (sam.export.OnnxSam3Predictor) vs PyTorch (sam.sam3.Sam3Predictor).

    python benchmarks/bench_onnx_sam3.py [--size tiny|released] [--repeats 5] [--threads N]

`tiny` is the test model of tests/sam3_factory.py (168 px, 3-layer ViT); `released` is Meta's
sizes (1008 px, 32-layer ViT, 24-layer text encoder, 840M parameters) with random weights: the
export takes minutes and about 7 GB of memory. The model is exported once
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


def _model(size: str, folder: Path):
    from sam.sam3 import Sam3Config, Sam3Image, load_sam3

    if size == "tiny":
        from sam3_factory import save_tiny_sam3

        return load_sam3(save_tiny_sam3(folder / "checkpoint")["meta"])
    torch.manual_seed(0)
    return Sam3Image(Sam3Config()).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "released"), default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from skimage import data

    from sam.export import OnnxSam3Predictor, export_sam3_onnx
    from sam.sam3 import Sam3Predictor
    from sam.sam3.text import tokenize

    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_sam3_"))
    model = _model(args.size, folder)
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
    sizes = ", ".join(f"{path.name} {sum(p.stat().st_size for p in path.parent.glob(path.name + '*')) / 2**20:.1f} MiB"
                      for path in (export.image_encoder, export.text_encoder, export.heads))
    print(f"SAM 3 {args.size} (random weights), threads {torch.get_num_threads()}, export {export_seconds:.0f} s, {sizes}")
    for stage, by_runtime in times.items():
        medians = {name: statistics.median(values) for name, values in by_runtime.items()}
        ratio = statistics.median(o / p for o, p in zip(by_runtime["onnxruntime"], by_runtime["pytorch"]))
        print(f"{stage:<6} pytorch {medians['pytorch'] * 1000:9.1f} ms   onnxruntime {medians['onnxruntime'] * 1000:9.1f} ms"
              f"   ratio onnxruntime/pytorch {ratio:.2f}")
    print(f"max |feature difference| {feature_error:.1e}; max |score difference| {score_error:.1e}")


if __name__ == "__main__":
    main()
