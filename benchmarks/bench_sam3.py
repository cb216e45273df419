"""SAM 3 image model: ours (sam.sam3) vs transformers' Sam3Model on the same random weights, CPU.

    python benchmarks/bench_sam3.py [--depth 8 --image-size 504 --repeats 3] [--grounded] [--flops]
                                    [--threads N] [--cpu-time]

Full detector and text sizes, a shallower/smaller ViT by default so a run takes minutes on 2 cores
(`--depth 32 --image-size 1008` is the released model). Both sides run alternately in one process on
the same pixels and tokens; the transformers side gets the padded box so it computes what we do.
Reports medians of:

1. the whole call (image + text + heads), ours vs transformers (target <= 0.7x);
2. through `Sam3Predictor` on a real photo: the first query (`set_image` + `predict`) and an extra,
   never-seen query on the cached image (its text encoder runs; target <= 5% of the first);
3. with `--flops`: the FLOPs of the first query and of the extra one (torch's `FlopCounterMode`:
   matmuls, convolutions, attention; SDPA's CPU kernel given the usual formula, which torch lacks), so the extra query's share of the work is known apart from
   how fast each kernel runs;
4. with `--grounded`: our default grounded path (Grounding DINO swin-T + `sam2.1_hiera_small`, random
   weights at the released sizes, detector caches cleared) on the same photo and query, as the
   SAM 3 first query's ratio to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


CLOCK = time.perf_counter  # --cpu-time: time.process_time, this process's CPU seconds


def timed(function) -> float:
    start = CLOCK()
    function()
    return CLOCK() - start


def count_cpu_attention() -> None:
    """FlopCounterMode has no formula for SDPA's CPU kernel and counts it as 0 FLOPs (the ViT's
    attention and all of the DETR encoder's 5184-token self-attention): give it the usual one."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    try:
        @register_flop_formula(op)
        def _(query, key, value, *args, out_val=None, **kwargs):
            return sdpa_flop_count(query, key, value)
    except RuntimeError:  # already registered (a later torch, or a second call)
        pass


def grounded_pipeline():
    from transformers import GroundingDinoConfig

    from langsam.detector import GroundingDinoDetector
    from langsam.pipeline import LangSAM
    from sam import build_sam
    from tiny_gdino import make_grounding_dino, make_processor

    folder = Path(tempfile.mkdtemp(prefix="bench_sam3_gdino_"))
    make_grounding_dino(GroundingDinoConfig(), seed=0).save_pretrained(folder)  # grounding-dino-tiny sizes
    make_processor().save_pretrained(folder)
    detector = GroundingDinoDetector(str(folder))
    return LangSAM(sam_model=build_sam("sam2.1_hiera_small"), detector_model=detector, embedding_cache_size=0), detector


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=504)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--grounded", action="store_true", help="also time the default grounded path")
    parser.add_argument("--flops", action="store_true", help="also count the FLOPs of the first and an extra query")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time in CPU seconds of this process (steadier than wall time on a shared machine)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    from skimage import data
    from transformers import Sam3Config as HFConfig
    from transformers import Sam3Model

    from sam.sam3 import Sam3Predictor, load_sam3
    from sam.sam3.text import tokenize

    depth = args.depth
    globals_ = [i for i in range(depth) if i % 8 == 7] or [depth - 1]
    config = HFConfig(vision_config=dict(backbone_config=dict(
        model_type="sam3_vit_model", num_hidden_layers=depth, image_size=args.image_size,
        global_attn_indexes=globals_, layer_norm_eps=1e-5)))
    reference = Sam3Model(config).eval()
    root = Path(tempfile.mkdtemp(prefix="bench_sam3_"))
    reference.save_pretrained(root)
    ours = load_sam3(root)
    pixels = torch.randn(1, 3, args.image_size, args.image_size)
    ids = tokenize(["a dog"])
    box, label = torch.zeros(1, 1, 4), torch.full((1, 1), -10)
    photo = data.astronaut()

    def run_reference():
        out = reference(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(), input_boxes=box, input_boxes_labels=label)
        return out.pred_logits

    def run_ours():
        return ours.decode(ours.encode_image(pixels), *ours.encode_text(ids))["logits"]

    predictor = Sam3Predictor(ours)

    found = []

    def first_query():
        predictor.set_image(photo)
        found[:] = predictor.predict(text="a dog").scores

    with torch.inference_mode():
        torch.testing.assert_close(run_ours(), run_reference(), atol=1e-3, rtol=1e-3)
        times = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("transformers", run_reference)):
                times[name].append(timed(fn))
        first, extra = [], []
        for repeat in range(args.repeats):
            first.append(timed(first_query))
            extra.append(timed(lambda: predictor.predict(text=f"a cat number {repeat}")))  # a new text each time
    ours_t, ref_t = statistics.median(times["ours"]), statistics.median(times["transformers"])
    first_t, extra_t = statistics.median(first), statistics.median(extra)
    print(f"ViT depth {depth}, {args.image_size} px, {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    print(f"[1] full call: ours {ours_t:.2f} s, transformers {ref_t:.2f} s, ratio {ours_t / ref_t:.2f}x (target <= 0.7x)")
    print(f"[2] Sam3Predictor: first query {first_t:.2f} s; extra new query on the cached image {extra_t:.3f} s "
          f"= {extra_t / first_t:.1%} of the first (target <= 5%)")
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        count_cpu_attention()

        with torch.inference_mode():
            with FlopCounterMode(display=False) as first_counter:
                first_query()
            with FlopCounterMode(display=False) as extra_counter:
                predictor.predict(text="a bird on a wire")
        first_f, extra_f = first_counter.get_total_flops(), extra_counter.get_total_flops()
        print(f"[3] FLOPs: first query {first_f / 1e9:.0f} G, extra query {extra_f / 1e9:.0f} G "
              f"= {extra_f / first_f:.1%} of the first")
    if args.grounded:
        pipe, detector = grounded_pipeline()
        # Random detector weights pass every box: keep as many as SAM 3 returned, so both give the same masks.
        top = max(1, len(found))
        call = dict(box_threshold=0.0, text_threshold=0.0, top_k=top)
        with torch.inference_mode():
            pipe.segment(photo, "a dog", **call)  # warm-up
            seconds = [timed(lambda: (detector.clear_cache(), pipe.segment(photo, "a dog", **call))) for _ in range(args.repeats)]
        grounded_t = statistics.median(seconds)
        print(f"[4] grounded (Grounding DINO swin-T + sam2.1_hiera_small, top {top} boxes): {grounded_t:.2f} s; "
              f"SAM 3 first query / grounded = {first_t / grounded_t:.2f}x")


if __name__ == "__main__":
    main()
