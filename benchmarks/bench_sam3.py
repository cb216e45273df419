"""SAM 3 image model: ours (sam.sam3) vs transformers' Sam3Model on the same random weights, CPU.

    python benchmarks/bench_sam3.py [--depth 8 --image-size 504 --repeats 3]

Full detector and text sizes, a shallower/smaller ViT by default so a run takes minutes on 2 cores
(`--depth 32 --image-size 1008` is the released model). Both sides run alternately in one process on
the same pixels and tokens; the transformers side gets the padded box so it computes what we do.
Reports medians of: the whole call (image + text + heads) and an extra query on cached features.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=504)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import Sam3Config as HFConfig
    from transformers import Sam3Model

    from sam.sam3 import load_sam3
    from sam.sam3.text import tokenize

    depth = args.depth
    globals_ = [i for i in range(depth) if i % 8 == 7] or [depth - 1]
    config = HFConfig(vision_config=dict(backbone_config=dict(
        model_type="sam3_vit_model", num_hidden_layers=depth, image_size=args.image_size,
        global_attn_indexes=globals_, layer_norm_eps=1e-5)))
    reference = Sam3Model(config).eval()
    root = Path("/tmp/bench_sam3")
    reference.save_pretrained(root)
    ours = load_sam3(root)
    pixels = torch.randn(1, 3, args.image_size, args.image_size)
    ids = tokenize(["a dog"])
    box, label = torch.zeros(1, 1, 4), torch.full((1, 1), -10)

    def run_reference():
        out = reference(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(), input_boxes=box, input_boxes_labels=label)
        return out.pred_logits

    def run_ours():
        return ours.decode(ours.encode_image(pixels), *ours.encode_text(ids))["logits"]

    with torch.inference_mode():
        torch.testing.assert_close(run_ours(), run_reference(), atol=1e-3, rtol=1e-3)
        times = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("transformers", run_reference)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        image = ours.encode_image(pixels)
        extra = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours.decode(image, *ours.encode_text(tokenize(["a cat"])))
            extra.append(time.perf_counter() - start)
    ours_t, ref_t = statistics.median(times["ours"]), statistics.median(times["transformers"])
    print(f"ViT depth {depth}, {args.image_size} px, {torch.get_num_threads()} threads")
    print(f"full call: ours {ours_t:.2f} s, transformers {ref_t:.2f} s, ratio {ours_t / ref_t:.2f}x")
    print(f"extra query on cached image: {statistics.median(extra):.3f} s ({statistics.median(extra) / ours_t:.1%} of a call)")


if __name__ == "__main__":
    main()
