"""Decoder-only fine-tuning: an epoch from the embedding cache vs an epoch that recomputes the
image embeddings, same model, same data, same run.

    python benchmarks/bench_finetune.py [--model-type vit_b] [--images 3] [--objects 4]
                                        [--points 0] [--refine 0] [--repeats 3] [--device cpu]

Both epochs run the same optimizer steps (`sam.training.trainer.train_step`, one image per step,
the recipe's prompts and loss); the uncached one encodes each image again (frozen encoder, no
gradient), the cached one reads the memory-mapped features. After a warm-up they alternate;
the script prints the median epoch times, their ratio (target: cached <= 0.1x uncached), steps
per second and the one-time cost of building the cache. Weights are random (the cost does not
depend on them); images are the synthetic textured shapes.

The ratio is decoder / (encoder + decoder) per image, so it depends on how much decoding a step
does: --objects masks per image, and 1 + --points + --refine decoder rounds per mask (the paper's
recipe uses 1 + 8 + 2). Checkpointing is left out of both epochs.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--images", type=int, default=3, help="images in the epoch (one step each)")
    parser.add_argument("--objects", type=int, default=4, help="masks per image per step")
    parser.add_argument("--points", type=int, default=0, help="error-region point rounds (recipe: 8)")
    parser.add_argument("--refine", type=int, default=0, help="logits-only rounds (recipe: 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sam_factory import make_tiny_sam, randomize_parameters

    from sam import SamPredictor, build_sam
    from sam.training import TrainConfig, load_dataset
    from sam.training.embedding_cache import EmbeddingCache
    from sam.training.synthetic import make_shapes_dataset
    from sam.training.trainer import _step_generator, make_optimizer, select_trainable, set_train_mode, train_step

    torch.manual_seed(0)
    model = make_tiny_sam() if args.model_type == "tiny" else randomize_parameters(build_sam(args.model_type), 0)
    model.to(args.device)
    config = TrainConfig(batch_size=1, objects_per_image=args.objects, num_points=args.points, num_refine=args.refine,
                         warmup_steps=0)
    trainable = select_trainable(model, config)
    predictor = SamPredictor(model)
    optimizer = make_optimizer(trainable, config)
    autocast = args.device.startswith("cuda")

    with tempfile.TemporaryDirectory() as folder:
        root = make_shapes_dataset(Path(folder) / "shapes", num_images=args.images, image_size=(240, 320),
                                   max_shapes=3, seed=0)
        dataset = load_dataset(root)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        start = time.perf_counter()
        cache = EmbeddingCache(Path(folder) / "cache", predictor, dataset).build()
        sync()
        build_seconds = time.perf_counter() - start

        def epoch(use_cache: bool) -> float:
            set_train_mode(model, config)
            sync()
            began = time.perf_counter()
            for step in range(len(dataset)):
                generator = _step_generator(0, step, device=predictor.device)
                train_step(model, predictor, dataset, [step], cache if use_cache else None, optimizer,
                           config.lr, config, generator, autocast)
            sync()
            return time.perf_counter() - began

        epoch(True), epoch(False)  # warm-up
        cached, uncached = [], []
        for _ in range(args.repeats):
            cached.append(epoch(True))
            uncached.append(epoch(False))

    cached_median, uncached_median = statistics.median(cached), statistics.median(uncached)
    rounds = 1 + args.points + args.refine
    print(f"model {args.model_type} on {args.device}, {args.images} images x {args.objects} masks, "
          f"{rounds} decoder round(s) per mask, {args.repeats} alternating repeats")
    print(f"cache build (one-time): {build_seconds:.2f} s ({build_seconds / args.images:.2f} s per image)")
    print(f"epoch from the cache:      {cached_median:.3f} s  ({args.images / cached_median:.3f} steps/s)")
    print(f"epoch recomputing features: {uncached_median:.3f} s  ({args.images / uncached_median:.3f} steps/s)")
    ratio = cached_median / uncached_median
    print(f"ratio cached / recomputed: {ratio:.3f}  (target <= 0.1: {'met' if ratio <= 0.1 else 'NOT met'})")


if __name__ == "__main__":
    main()
