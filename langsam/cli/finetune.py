"""``langsam finetune``: fine-tune SAM on your own masks (the SAM paper's recipe).

Reads a dataset (COCO, SA-1B JSON or PNG masks), trains the mask decoder (optionally the prompt
encoder, the image encoder's last blocks or LoRA adapters) with simulated interactive prompts,
validates 1-click and box mIoU after every epoch and keeps the best weights in the official
layout, ready for ``LangSAM(sam_type="auto", sam_checkpoint=".../best.pth")`` or ``--sam-type auto
--sam-checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from langsam.cli.evaluate import add_dataset_arguments, load_data
from langsam.cli.options import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    add_model_arguments,
    fraction,
    number,
    validate_model_arguments,
)

NAME = "finetune"
TRAINABLE = ("decoder", "prompt-encoder")

EPILOG = """\
what trains (--train, --encoder-blocks, --lora-rank):
  the mask decoder by default; add the prompt encoder with --train decoder,prompt-encoder;
  the image encoder's last N blocks (and its neck) with --encoder-blocks N, or LoRA adapters
  on its attention with --lora-rank R (needs peft: pip install 'langsam[train]'). Everything
  else stays bit-for-bit unchanged. While the encoder is frozen, image embeddings are computed
  once and memory-mapped from --cache-dir, so an epoch costs only the decoder.

recipe (SAM paper): first prompt a point (3 masks, lowest loss trained) or a noisy box (std 10%
  of the side, at most 20 px), then --points error-region points and --refine-rounds rounds
  with the previous logits only; loss focal:dice 20:1 plus the IoU head's MSE; AdamW with
  linear warm-up and step decay (x0.1 at 2/3 and 26/27 of the run); bf16 autocast on CUDA.

outputs (under --out):
  best.pth, best.safetensors   the weights with the best validation score (mean of 1-click
                               and box mIoU), official layout (LoRA merged); the starting
                               weights count too, so tuning can never make 'best' worse
  last.pth                     the weights after the last epoch
  metrics.json                 settings and per-epoch train loss and validation mIoU
  train_state.pt               what --resume needs (written atomically each epoch)
  embeddings/                  the embedding cache (safe to delete)

exit status: 0 done, 1 bad dataset or model, 2 usage error, 130 interrupted (state saved:
rerun the same command with --resume).

examples:
  langsam finetune shapes/ --out runs/shapes --sam-type vit_b --epochs 20
  langsam finetune train.json --images train2017/ --val val.json --val-images val2017/ --out runs/coco
  langsam finetune masks/ --out runs/lora --lora-rank 8 --device cuda --batch-size 16
  langsam finetune shapes/ --out runs/shapes --resume
"""


def _trainable(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(item.strip().lower() for item in text.split(",") if item.strip()))
    unknown = [item for item in items if item not in TRAINABLE]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(unknown) or '(empty)'}; "
                                         f"choose from {','.join(TRAINABLE)}")
    return items


def _targets(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(item.strip().lower() for item in text.split(",") if item.strip()))
    if not items or set(items) - {"qkv", "proj"}:
        raise argparse.ArgumentTypeError(f"LoRA targets must be qkv and/or proj, got {text!r}")
    return items


def add_recipe_arguments(group: argparse._ArgumentGroup) -> None:
    """The training recipe's flags (epochs, batch, lr, warm-up, prompt rounds, seed, max steps),
    shared by ``finetune`` and ``label train``; :func:`recipe_kwargs` reads them back."""
    group.add_argument("--epochs", type=number(int, 1), default=10, metavar="N", help="epochs (default 10)")
    group.add_argument("--batch-size", type=number(int, 1), default=4, metavar="N",
                       help="images per optimizer step, gradients accumulated (default 4)")
    group.add_argument("--objects-per-image", type=number(int, 1), default=16, metavar="N",
                       help="masks drawn from each image per step (default 16)")
    group.add_argument("--lr", type=number(float, 1e-12), default=1e-4, metavar="LR", help="peak learning rate (default 1e-4)")
    group.add_argument("--weight-decay", type=number(float, 0.0), default=0.1, metavar="W",
                       help="AdamW weight decay (default 0.1)")
    group.add_argument("--warmup-steps", type=number(int, 0), default=250, metavar="N",
                       help="linear warm-up steps, at most a tenth of the run (default 250)")
    group.add_argument("--points", type=number(int, 0), default=8, metavar="N",
                       help="error-region point rounds after the first prompt (default 8)")
    group.add_argument("--refine-rounds", type=number(int, 0), default=2, metavar="N",
                       help="rounds with the previous logits only (default 2)")
    group.add_argument("--seed", type=number(int, 0), default=0,
                       help="seed of the data order and prompts (finetune: also of the split)")
    group.add_argument("--max-steps", type=number(int, 1), default=None, metavar="N",
                       help="stop (state saved, resumable) after N optimizer steps in total")


def recipe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `TrainConfig` fields of :func:`add_recipe_arguments`' flags."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, objects_per_image=args.objects_per_image, lr=args.lr,
                weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, num_points=args.points,
                num_refine=args.refine_rounds, seed=args.seed, max_steps=args.max_steps)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam finetune`` and its options."""
    parser = commands.add_parser(
        NAME, help="fine-tune SAM on your own masks",
        description="Fine-tune SAM (SAM paper recipe) on a dataset of masks; keep the best weights\n"
                    "by validation mIoU, in the official checkpoint layout.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataset_arguments(parser)
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    split = parser.add_argument_group("validation")
    split.add_argument("--val", metavar="DATA", help="validation dataset (default: a seeded random split of DATA)")
    split.add_argument("--val-images", metavar="DIR", help="image folder of --val (COCO / SA-1B)")
    split.add_argument("--val-fraction", type=fraction, default=0.1, metavar="F",
                       help="fraction of DATA's images held out when --val is not given (default 0.1; 0: none)")
    split.add_argument("--val-clicks", type=number(int, 1), default=1, metavar="N",
                       help="clicks of the validation point protocol (default 1)")
    add_recipe_arguments(parser.add_argument_group("training"))
    parts = parser.add_argument_group("what trains")
    parts.add_argument("--train", type=_trainable, default=("decoder",), metavar="LIST",
                       help="decoder and/or prompt-encoder (default decoder)")
    parts.add_argument("--encoder-blocks", type=number(int, 0), default=0, metavar="N",
                       help="also train the image encoder's last N blocks and its neck")
    parts.add_argument("--lora-rank", type=number(int, 0), default=0, metavar="R",
                       help="LoRA adapters of rank R on the image encoder's attention (SAM 1; needs peft)")
    parts.add_argument("--lora-alpha", type=number(float, 1e-12), default=None, metavar="A",
                       help="LoRA scaling alpha (default: the rank)")
    parts.add_argument("--lora-targets", type=_targets, default=("qkv",), metavar="LIST",
                       help="attention linears that get adapters: qkv and/or proj (default qkv)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--resume", action="store_true", help="continue the run stopped in --out")
    run_group.add_argument("--cache-dir", metavar="DIR", help="embedding cache folder (default OUT/embeddings)")
    run_group.add_argument("--no-cache", action="store_true", help="recompute image embeddings every step")
    run_group.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32",
                           help="embedding cache precision (float16 halves the disk; default float32)")
    run_group.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    run_group.add_argument("--checkpoint-every", type=number(int, 0), default=0, metavar="N",
                           help="also save the training state every N steps (default: each epoch)")
    add_model_arguments(parser, detector=False, clip=False)
    parser.set_defaults(handler=run, parser=parser)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The `TrainConfig` the flags describe (UsageError for an impossible combination)."""
    from sam.training import TrainConfig

    try:
        return TrainConfig(
            **recipe_kwargs(args), train_decoder="decoder" in args.train,
            train_prompt_encoder="prompt-encoder" in args.train, train_encoder_blocks=args.encoder_blocks,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
            cache_embeddings=not args.no_cache, cache_dtype=args.cache_dtype, amp=not args.no_amp,
            val_clicks=args.val_clicks,
            checkpoint_every=args.checkpoint_every,
        )
    except ValueError as error:
        raise UsageError(str(error).replace("invalid TrainConfig: ", "")) from None


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(SAM model, torch device): the model from the SAM options, the device as ``LangSAM``
    resolves it (cuda, then mps, then cpu)."""
    from langsam.cli.options import ModelLoadError

    try:
        from langsam.pipeline import DEFAULT_SAM_TYPE, resolve_device
        from langsam.weights import resolve_sam_checkpoint
        from sam import build_sam

        device = resolve_device(args.device)
        sam_type = args.sam_type or ("auto" if args.sam_checkpoint else DEFAULT_SAM_TYPE)
        checkpoint = resolve_sam_checkpoint(sam_type, args.sam_checkpoint)
        return build_sam(sam_type, checkpoint=checkpoint), device
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"cannot load SAM: {error}") from error


def run(args: argparse.Namespace) -> int:
    """Run ``langsam finetune`` with parsed ``args``; returns the exit status."""
    validate_model_arguments(args.parser, args)
    config = config_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if args.resume and not (out / "train_state.pt").is_file():
        raise UsageError(f"--resume: no stopped run in {args.out!r} (train_state.pt is missing)")
    if not args.resume and (out / "train_state.pt").is_file():
        raise UsageError(f"{args.out!r} already holds a run: add --resume to continue it, or choose another --out")
    if args.val is None and args.val_fraction >= 1:
        raise UsageError("--val-fraction must be below 1 (the training set needs images); 0 trains without validation")
    if config.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("--lora-rank needs peft: pip install 'langsam[train]' (or pip install peft)") from None

    from sam.training.data import AnnotationError

    try:
        dataset = load_data(args, args.data, args.images)
        if args.val is not None:
            train, val = dataset, load_data(args, args.val, args.val_images)
        elif args.val_fraction > 0:
            train, val = dataset.split(args.val_fraction, seed=args.seed)
        else:
            train, val = dataset, None
    except UsageError:
        raise
    except (AnnotationError, ValueError, FileNotFoundError) as error:
        print(f"langsam {NAME}: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    model, device = _load_model(args)
    print(f"train: {len(train)} images, {train.num_objects} objects; "
          f"val: {0 if val is None else len(val)} images, {0 if val is None else val.num_objects} objects")

    from sam.training import finetune

    try:
        result = finetune(model, train, out, val=val, config=config, resume=args.resume, device=device,
                          cache_dir=args.cache_dir, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished step is saved in {out}: rerun the same command with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (AnnotationError, ValueError, ImportError) as error:
        print(f"langsam {NAME}: error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    print_history(result.history)
    best = "-" if result.best_score is None else f"{result.best_score:.3f}"
    status = f"stopped after step {result.steps} (--max-steps); resume with --resume" if result.stopped_early \
        else f"{result.steps} steps"
    print(f"\n{status}; best validation score {best}")
    print(f"best weights: {result.best_checkpoint} (and {result.best_checkpoint.with_suffix('.safetensors').name})")
    print(f"use them: langsam segment IMAGE --text ... --sam-type auto --sam-checkpoint {result.best_checkpoint}")
    return EXIT_OK


def print_history(history: list[dict[str, Any]]) -> None:
    """The per-epoch table: train loss and validation mIoU."""
    from sam.evaluation import format_table

    if not history:
        return
    rows = []
    for entry in history:
        val = entry.get("val") or {}
        rows.append([entry["epoch"], entry["step"], entry.get("train_loss"), val.get("miou_click_1"),
                     val.get("miou_box"), val.get("score")])
    print(format_table(["epoch", "step", "train loss", "val 1 click", "val box", "score"], rows))
