"""LangSAM pipeline cost: queries share one detector pass, images share one SAM embedding.

Real-size models with random weights (no download): Grounding DINO with the grounding-dino-tiny
architecture (Swin-T + BERT-base text encoder, 900 queries, real bert-base-uncased vocabulary)
and SAM vit_b. ``top_k`` = number of queries, so each query costs one SAM mask, as it would with
trained weights that find one object per query.

Three comparisons, each measured alternately in one process after a warm-up, reported as medians:

1. one image, M queries vs 1 query (target: at most 1.5x);
2. ``segment_batch`` of N images x M queries vs N*M single-query calls without any sharing
   (embedding cache off: what a per-prompt pipeline costs);
3. ``segment()`` on a new image vs the reference composition that Lang-SAM v1 and Grounded-SAM
   use (transformers' Grounding DINO forward and post-processing, then Meta's ``SamPredictor``
   on the top-M boxes), same weights, both with vit_b (target: at most 0.6x). Ours runs with its
   detector caches cleared before each call (a new caption too), and again with the caption of
   the previous call (the CLI's case). ``--sam-type`` adds a line for ours with another SAM.

    python benchmarks/bench_pipeline.py [--device cpu] [--images 2] [--queries 8] [--batch-queries 4] [--repeats 3]
                                        [--only 1,2,3] [--sam-type sam2.1_hiera_tiny]
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

QUERIES = ["a cat", "a dog", "a remote control", "a sofa", "a blanket", "a cup", "a person", "a rocket",
           "a tree", "a car", "a chair", "a window"]


def build_pipelines(device: str, small: bool):
    from transformers import GroundingDinoConfig

    from langsam.detector import GroundingDinoDetector
    from langsam.pipeline import LangSAM
    from sam import build_sam
    from tiny_gdino import make_grounding_dino, make_processor, make_tiny_gdino_config

    config = make_tiny_gdino_config() if small else GroundingDinoConfig()  # defaults = grounding-dino-tiny
    folder = Path(tempfile.mkdtemp(prefix="bench_gdino_"))
    make_grounding_dino(config, seed=0).save_pretrained(folder)
    make_processor().save_pretrained(folder)  # 800 / 1333 resize, as released
    sam_model = build_sam("vit_b") if not small else build_sam("vit_b", encoder_depth=2, encoder_embed_dim=64,
                                                                encoder_num_heads=2, encoder_global_attn_indexes=(1,))
    detector = GroundingDinoDetector(str(folder), device=device)
    ours = LangSAM(sam_model=sam_model, detector_model=detector, device=device)
    # The baseline shares the models (same weights, same device) but never reuses an embedding.
    naive = LangSAM(sam_model=ours.predictor, detector_model=detector, device=device, embedding_cache_size=0)
    return ours, naive


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-queries", type=int, default=None, help="M for comparison 2 (default: --queries)")
    parser.add_argument("--batch-repeats", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="tiny models (smoke test of the script)")
    parser.add_argument("--only", default="1,2,3", help="which comparisons to run, e.g. 3 or 1,2")
    parser.add_argument("--sam-type", default=None, help="[3]: also time ours with this SAM (random weights)")
    args = parser.parse_args(argv)
    only = {part.strip() for part in args.only.split(",")}

    from sam_factory import real_photo

    ours, naive = build_pipelines(args.device, args.small)
    photos = [real_photo(name) for name in ("chelsea", "coffee", "astronaut", "rocket")][: args.images]
    many = QUERIES[: args.queries]
    encoder_calls = [0]
    ours.predictor.model.image_encoder.register_forward_hook(lambda *_: encoder_calls.__setitem__(0, encoder_calls[0] + 1))
    print(f"device={args.device} torch threads={torch.get_num_threads()} "
          f"models={'tiny' if args.small else 'real-size (GDINO-T random, SAM vit_b random)'}")

    if "3" in only:
        _compare_with_reference_composition(args, ours, naive, photos[0], many)
    if "1" not in only and "2" not in only:
        return

    # -- 1. M queries vs 1 query on one image (embedding recomputed every call: a fresh image each time)
    def one(queries):
        return naive.segment(photos[0], queries, box_threshold=0.0, top_k=len(queries))

    one([many[0]])  # warm-up
    one(many)
    single_times, multi_times = [], []
    for _ in range(args.repeats):
        single_times.append(timed(lambda: one([many[0]])))
        multi_times.append(timed(lambda: one(many)))
    t1, tm = statistics.median(single_times), statistics.median(multi_times)
    print(f"[1] one image: M=1 {t1:.2f}s  M={len(many)} {tm:.2f}s  ratio M={len(many)}/M=1 = {tm / t1:.2f}x "
          f"(target <= 1.5x)")

    # -- 2. N images x M queries: segment_batch vs N*M single calls
    many = QUERIES[: args.batch_queries or args.queries]
    def batch():
        ours.clear_cache()
        return ours.segment_batch(photos, many, box_threshold=0.0, top_k=len(many))

    def singles():
        return [naive.segment(image, [query], box_threshold=0.0, top_k=1) for image in photos for query in many]

    passes_before, encoder_before = ours.detector.forward_passes, encoder_calls[0]
    batch()
    print(f"    segment_batch: {ours.detector.forward_passes - passes_before} detector passes, "
          f"{encoder_calls[0] - encoder_before} SAM encodings for {len(photos)} images x {len(many)} queries")
    batch_times, single_call_times = [], []
    for _ in range(args.batch_repeats):
        batch_times.append(timed(batch))
        single_call_times.append(timed(singles))
    tb, ts = statistics.median(batch_times), statistics.median(single_call_times)
    print(f"[2] {len(photos)} images x {len(many)} queries: segment_batch {tb:.2f}s  "
          f"{len(photos) * len(many)} single calls {ts:.2f}s  ratio ours/singles = {tb / ts:.3f} "
          f"({ts / tb:.1f}x faster)")


def _compare_with_reference_composition(args, ours, naive, photo, queries) -> None:
    """[3] segment() on a new image vs transformers' Grounding DINO + Meta's SamPredictor."""
    from segment_anything import SamPredictor as MetaPredictor
    from sam_factory import make_reference_sam

    from langsam.detector import caption_text

    detector = ours.detector
    model, processor = detector.model, detector.processor
    meta = MetaPredictor(make_reference_sam(ours.predictor.model.cpu()).to(args.device))
    ours.predictor.model.to(args.device)
    caption = " ".join(caption_text(q) + "." for q in queries)
    top = len(queries)

    def reference():  # as Lang-SAM v1 / Grounded-SAM compose them
        inputs = processor(images=photo, text=caption, return_tensors="pt").to(args.device)
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.25, target_sizes=[photo.shape[:2]])[0]
        boxes = result["boxes"][result["scores"].argsort(descending=True)[:top]]
        meta.set_image(photo)
        masks, _, _ = meta.predict_torch(None, None, boxes=meta.transform.apply_boxes_torch(boxes, photo.shape[:2]),
                                         multimask_output=False)
        return masks

    def ours_new():  # a new image and a new caption: nothing cached
        detector.clear_cache()
        return naive.segment(photo, queries, box_threshold=0.0, top_k=top)

    def ours_same_caption():  # a new image, the caption of the previous call
        return naive.segment(photo, queries, box_threshold=0.0, top_k=top)

    reference(), ours_new(), ours_same_caption()  # warm-up
    times = {"reference": [], "new": [], "same": []}
    for _ in range(args.repeats):
        times["reference"].append(timed(reference))
        times["new"].append(timed(ours_new))
        times["same"].append(timed(ours_same_caption))
    reference_median = statistics.median(times["reference"])
    print(f"[3] segment() on a new image, {top} queries, vit_b: reference composition {reference_median:.2f}s")
    for key, label in (("new", "new caption"), ("same", "same caption")):
        ratio = statistics.median([o / r for o, r in zip(times[key], times["reference"])])
        print(f"    ours ({label}): {statistics.median(times[key]):.2f}s  ratio {ratio:.3f} (target <= 0.6)")
    if args.sam_type:
        from langsam.pipeline import LangSAM
        from sam import build_sam

        other = LangSAM(sam_model=build_sam(args.sam_type), detector_model=detector, device=args.device,
                        embedding_cache_size=0)
        other.segment(photo, queries, box_threshold=0.0, top_k=top)  # warm-up
        seconds = [timed(lambda: (detector.clear_cache(), other.segment(photo, queries, box_threshold=0.0, top_k=top)))
                   for _ in range(args.repeats)]
        print(f"    ours with {args.sam_type} (new caption): {statistics.median(seconds):.2f}s  "
              f"ratio to the vit_b reference composition {statistics.median(seconds) / reference_median:.3f}")


if __name__ == "__main__":
    main()
