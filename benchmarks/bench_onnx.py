"""onnxruntime vs PyTorch on the CPU: SAM's image encoder and its prompt encoder + mask decoder.

    python benchmarks/bench_onnx.py [--model-type vit_b] [--repeats 5] [--threads N]

Exports a randomly initialised model of the given type (sam.export.export_onnx, int8 decoder
included), then times, alternating after a warm-up, in one process with the same thread count:

* encoder: `SamPredictor.set_image` vs `OnnxSamPredictor.set_image` (a 1024x1024 photo);
* decoder: `predict` of one click with three candidate masks, upscaled to the photo, on the
  same embedding: PyTorch vs onnxruntime fp32 vs onnxruntime with the int8 decoder.

Prints median times and median ratios onnxruntime / PyTorch (below 1 means onnxruntime is
faster), and the largest output differences.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b", help="vit_b, vit_l, vit_h, sam2.1_hiera_tiny, ...")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decoder-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fast-upscale", action="store_true", help="export with onnxruntime's Resize upscaling")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from PIL import Image
    from sam_factory import randomize_parameters, real_photo

    from sam import SamPredictor, build_sam
    from sam.export import OnnxSamPredictor, export_onnx

    torch.manual_seed(0)
    model = randomize_parameters(build_sam(args.model_type), seed=0).eval()
    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    start = time.perf_counter()
    export = export_onnx(model, folder, quantize=True, verify=False, exact_upscale=not args.fast_upscale)
    export_seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    image = np.asarray(Image.fromarray(real_photo("astronaut")).resize((1024, 1024), Image.Resampling.BICUBIC))

    ours = SamPredictor(model)
    fp32 = OnnxSamPredictor(folder, session_options=options)
    int8 = OnnxSamPredictor(folder, quantized=True, session_options=options)

    def timed(function, *arguments, **keywords) -> float:
        begin = time.perf_counter()
        function(*arguments, **keywords)
        return time.perf_counter() - begin

    # Encoder.
    timed(ours.set_image, image), timed(fp32.set_image, image)  # warm-up
    encoder_times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(args.repeats):
        encoder_times["pytorch"].append(timed(ours.set_image, image))
        encoder_times["onnxruntime"].append(timed(fp32.set_image, image))
    features = ours.features
    if isinstance(features, dict):
        embedding_error = max(float((fp32.features["image_embed"] - features["image_embed"]).abs().max()),
                              *(float((a - b).abs().max()) for a, b in zip(fp32.features["high_res_feats"],
                                                                           features["high_res_feats"])))
    else:
        embedding_error = float((fp32.features - features).abs().max())

    # Decoder, on the same embedding.
    for predictor in (fp32, int8):
        predictor.set_embedding(ours.features, ours.original_size, ours.input_size)
    click = dict(point_coords=np.array([[500.0, 380.0]]), point_labels=np.array([1]))
    decoders = {"pytorch": ours, "onnxruntime": fp32, "onnxruntime int8": int8}
    for predictor in decoders.values():
        predictor.predict(**click)  # warm-up
    decoder_times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.decoder_repeats):
        for name, predictor in decoders.items():
            decoder_times[name].append(timed(predictor.predict, **click))
    reference = ours.predict(**click, return_logits=True)
    mask_error = float(np.abs(fp32.predict(**click, return_logits=True)[0] - reference[0]).max())
    int8_masks, _, _ = int8.predict(**click)
    ious = [float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(int8_masks, reference[0] > 0)]

    def ratio(times: dict[str, list[float]], name: str) -> float:
        return statistics.median(o / p for o, p in zip(times[name], times["pytorch"]))

    sizes = {path.name: path.stat().st_size / 2**20 for path in (export.encoder, export.decoder,
                                                                  export.quantized_decoder)}
    print(f"model {args.model_type} (random weights), threads {torch.get_num_threads()}, "
          f"{'fast' if args.fast_upscale else 'exact'} upscaling, export {export_seconds:.0f} s, "
          + ", ".join(f"{name} {size:.1f} MiB" for name, size in sizes.items()))
    for name, times in encoder_times.items():
        print(f"encoder {name:<17} median {statistics.median(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)})")
    print(f"encoder ratio onnxruntime/pytorch: {ratio(encoder_times, 'onnxruntime'):.2f}; "
          f"max |embedding difference| {embedding_error:.1e}")
    for name, times in decoder_times.items():
        print(f"decoder {name:<17} median {statistics.median(times) * 1000:.1f} ms")
    for name in ("onnxruntime", "onnxruntime int8"):
        print(f"decoder ratio {name}/pytorch: {ratio(decoder_times, name):.2f}")
    print(f"decoder max |mask logit difference| fp32 {mask_error:.1e}; int8 mask IoU vs PyTorch "
          f"{', '.join(f'{v:.3f}' for v in ious)}")


if __name__ == "__main__":
    main()
