"""Fine-tuning SAM on your own masks: the SAM paper's recipe as a plain PyTorch loop.

Read `finetune` top to bottom; each step of the recipe is a named function:

1. `select_trainable` - freeze everything, then unfreeze what `TrainConfig` names: the mask
   decoder (default), the prompt encoder, the image encoder's last N blocks, or LoRA adapters on
   its attention (`apply_lora`, through ``peft``). Frozen weights are never touched.
2. `EmbeddingCache` - while the encoder is frozen, image features are computed once and
   memory-mapped, so a step costs only the decoder.
3. `make_optimizer` / `learning_rate` - AdamW, linear warm-up, then step decay.
4. `train_step` - for each image of a batch: `image_targets` (ground truth on the low-res grid,
   boxes in the model-input frame), then `interactive_loss` (first prompt, 8 error-region
   points, 2 logits-only rounds; focal + dice + IoU-head loss each round, see `losses`), and
   the gradients of the batch are accumulated into one optimizer step. On CUDA the decoder
   runs under bf16 autocast.
5. `validate` - 1-click and box mIoU on the validation set after every epoch (and before the
   first); the best weights are kept.
6. `save_training_state` / `load_training_state` - atomic checkpoints; `resume=True` continues
   a stopped run and ends with the same weights as an uninterrupted one (all randomness is
   drawn from (seed, epoch) and (seed, step)).

Outputs in `out_dir`: ``best.pth`` and ``best.safetensors`` (official layout, LoRA merged:
``build_sam("auto", "best.pth")``, Meta's code and ``LangSAM(sam_checkpoint=...)`` load it
strictly), ``last.pth``, ``train_state.pt`` (for resuming) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import SegmentationDataset, boxes_from_masks
from .embedding_cache import EmbeddingCache
from ..files import atomic_torch_save, atomic_write, atomic_write_json
from .losses import LossTerms, sam_loss
from .prompts import error_points, first_points, noisy_boxes, round_schedule

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
BEST_NAME = "best.pth"
BEST_SAFETENSORS_NAME = "best.safetensors"
LAST_NAME = "last.pth"
METRICS_NAME = "metrics.json"
CACHE_DIR_NAME = "embeddings"
STATE_FORMAT = "langsam-finetune/1"
#: Settings that may differ between a stopped run and its resumption.
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every")


@dataclass
class TrainConfig:
    """Everything that decides a fine-tuning run (defaults: the SAM paper's recipe, with a
    smaller learning rate for fine-tuning)."""

    epochs: int = 10
    batch_size: int = 4  # images whose gradients are accumulated into one optimizer step
    objects_per_image: int = 16  # masks drawn from each image per step (SAM used up to 64)
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 250  # linear warm-up (at most a tenth of the run)
    lr_decay_at: tuple[float, ...] = (0.667, 0.963)  # fractions of the run where the lr drops
    lr_decay_factor: float = 0.1
    point_probability: float = 0.5  # first prompt: a point (else a noisy box)
    num_points: int = 8  # error-region point rounds after the first prompt
    num_refine: int = 2  # rounds with the previous logits only
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    train_decoder: bool = True
    train_prompt_encoder: bool = False
    train_encoder_blocks: int = 0  # the image encoder's last N blocks (and its neck)
    lora_rank: int = 0  # > 0: LoRA adapters on the image encoder's attention (needs peft)
    lora_alpha: float | None = None  # None: equal to the rank
    lora_targets: tuple[str, ...] = ("qkv",)  # attention linears that get adapters ("qkv", "proj")
    cache_embeddings: bool = True  # only while the image encoder is frozen
    cache_dtype: str = "float32"  # or "float16" (half the disk)
    amp: bool = True  # bf16 autocast on CUDA (ignored on other devices)
    val_clicks: int = 1  # clicks of the validation protocol (plus a box prompt)
    seed: int = 0
    max_steps: int | None = None  # stop (and save) after this many optimizer steps in total
    checkpoint_every: int = 0  # also save the training state every N steps (0: each epoch)

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "batch_size", "objects_per_image"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("num_points", "num_refine", "train_encoder_blocks", "lora_rank", "warmup_steps",
                     "checkpoint_every", "val_clicks"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if not 0.0 <= self.point_probability <= 1.0:
            problems.append("point_probability must be in [0, 1]")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be at least 1 (or None)")
        if self.train_encoder_blocks and self.lora_rank:
            problems.append("choose either train_encoder_blocks or lora_rank, not both")
        if not (self.train_decoder or self.train_prompt_encoder or self.train_encoder_blocks or self.lora_rank):
            problems.append("nothing to train: enable the decoder, the prompt encoder, encoder blocks or LoRA")
        if self.cache_dtype not in ("float32", "float16"):
            problems.append("cache_dtype must be float32 or float16")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def encoder_frozen(self) -> bool:
        return not self.train_encoder_blocks and not self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


@dataclass
class FinetuneResult:
    """Where the outputs went and how the run went."""

    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict[str, Any]]
    best_score: float | None
    steps: int
    stopped_early: bool = False


@dataclass
class _RunState:
    """What a checkpoint must restore besides the weights and the optimizer."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # steps of that epoch done
    loss_sum: float = 0.0  # of the epoch in progress
    loss_count: int = 0
    best_score: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# ================================================================================ what trains
def _parts(model: nn.Module) -> dict[str, nn.Module]:
    sam2 = getattr(model, "family", "sam1") == "sam2"
    return {
        "image_encoder": model.image_encoder,
        "prompt_encoder": model.sam_prompt_encoder if sam2 else model.prompt_encoder,
        "mask_decoder": model.sam_mask_decoder if sam2 else model.mask_decoder,
    }


def _encoder_blocks(model: nn.Module) -> nn.ModuleList:
    encoder = model.image_encoder
    return encoder.trunk.blocks if getattr(model, "family", "sam1") == "sam2" else encoder.blocks


def apply_lora(model: nn.Module, config: TrainConfig) -> None:
    """Add LoRA adapters (rank `config.lora_rank`) to the attention linears of the image
    encoder named in `config.lora_targets`, through ``peft``. The base weights stay frozen and
    unchanged; `merged_state_dict` folds the adapters back into the official layout."""
    if getattr(model, "family", "sam1") == "sam2":
        raise ValueError("LoRA on SAM 2's Hiera encoder is not supported: its attention reads the linear weights "
                         "directly, so adapters would be ignored. Use train_encoder_blocks instead.")
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'langsam[train]' (or pip install peft)") from error
    targets = tuple(config.lora_targets)
    valid = {"qkv", "proj"}
    if not targets or set(targets) - valid:
        raise ValueError(f"lora_targets must be some of {sorted(valid)}, got {list(targets)}")
    # A regular expression matched against whole module names: the attention linears of the
    # transformer blocks only (a bare "proj" would also catch the patch embedding).
    pattern = rf"blocks\.\d+\.attn\.({'|'.join(targets)})"
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, lora_dropout=0.0,
                           target_modules=pattern)
    # Adapter weights are drawn from torch's global generator: seed it for reproducible runs.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft.inject_adapter_in_model(lora, model.image_encoder)


def _is_lora_layer(module: nn.Module) -> bool:
    if not type(module).__module__.startswith("peft."):  # without adapters, never import peft
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def select_trainable(model: nn.Module, config: TrainConfig) -> dict[str, nn.Parameter]:
    """Freeze the whole model, then unfreeze (or add, for LoRA) what `config` trains.
    Returns {parameter name: parameter} of the trainable ones."""
    sam2 = getattr(model, "family", "sam1") == "sam2"
    if config.lora_rank:
        apply_lora(model, config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parts = _parts(model)
    trainable: list[nn.Module] = []
    if config.train_decoder:
        trainable.append(parts["mask_decoder"])
    if config.train_prompt_encoder:
        trainable.append(parts["prompt_encoder"])
    if config.train_encoder_blocks:
        blocks = _encoder_blocks(model)
        if config.train_encoder_blocks > len(blocks):
            raise ValueError(f"train_encoder_blocks={config.train_encoder_blocks} but the image encoder has "
                             f"{len(blocks)} blocks")
        trainable += list(blocks[len(blocks) - config.train_encoder_blocks:])
        trainable.append(model.image_encoder.neck)
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    if sam2 and config.encoder_frozen:
        # SAM 2 applies these two decoder convolutions to the high-resolution features while
        # encoding the image: they belong to the cached features, so they stay frozen.
        for module in (parts["mask_decoder"].conv_s0, parts["mask_decoder"].conv_s1):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    if config.lora_rank:
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.requires_grad_(True)
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def set_train_mode(model: nn.Module, config: TrainConfig) -> None:
    """Eval mode for the frozen parts, train mode for the trained ones."""
    model.eval()
    parts = _parts(model)
    if config.train_decoder:
        parts["mask_decoder"].train()
    if config.train_prompt_encoder:
        parts["prompt_encoder"].train()
    if config.train_encoder_blocks:
        for block in _encoder_blocks(model)[-config.train_encoder_blocks:]:
            block.train()
        model.image_encoder.neck.train()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout, on the CPU: LoRA adapters (if any) folded into
    their base weights, peft's key names mapped back to the official ones."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach()
    for name, module in model.named_modules():
        if _is_lora_layer(module):
            for adapter in module.active_adapters:
                key = f"{name}.weight"
                state[key] = state[key] + module.get_delta_weight(adapter).detach().to(state[key].dtype)
    return {key: value.to("cpu").contiguous() for key, value in state.items()}


def save_official(state: dict[str, torch.Tensor], family: str, path: Path) -> Path:
    """Write `state` atomically in the official layout: a flat state dict for SAM 1, ``{"model":
    ...}`` for SAM 2 (``.pth``/``.pt``); ``.safetensors`` is always flat."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda temporary: save_file(state, str(temporary)))
    return atomic_torch_save(path, {"model": state} if family == "sam2" else state)


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every frozen parameter and buffer: a resumed run must start from the same base."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return _fingerprint({name: tensor for name, tensor in model.state_dict().items() if name not in trainable})


# ================================================================================ optimisation
def make_optimizer(parameters: dict[str, nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; norms, biases and embeddings get no weight decay."""
    decay, no_decay = [], []
    for name, parameter in parameters.items():
        (no_decay if parameter.ndim <= 1 or "embed" in name or "token" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=config.lr, betas=tuple(config.betas))


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """The lr for optimizer step `step` (0-based): linear warm-up over `warmup_steps` (at most a
    tenth of the run), then multiplied by `lr_decay_factor` at each fraction in `lr_decay_at`."""
    warmup = min(config.warmup_steps, total_steps // 10)
    if warmup and step < warmup:
        return config.lr * (step + 1) / warmup
    drops = sum(1 for fraction in config.lr_decay_at if step >= fraction * total_steps)
    return config.lr * config.lr_decay_factor ** drops


def _step_generator(seed: int, *keys: int, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, *keys), so any step can be replayed on its own."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training images in `epoch` (seeded)."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


# ================================================================================ one image
@dataclass
class ImageTargets:
    """Ground truth of the objects drawn from one image, in the frames the decoder works in."""

    masks: torch.Tensor  # (B, 1, h, w) float in {0, 1}, low-res grid
    boxes: torch.Tensor  # (B, 4) xyxy, model-input frame
    input_size: tuple[int, int]  # (h, w) of the image in the model-input frame
    scale: float  # model-input pixels per low-res cell


def low_res_masks(masks: np.ndarray, input_size: tuple[int, int], image_size: int,
                  low_res_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N, H, W) bool original-image masks -> (N, 1, h, w) float {0, 1} on the low-res grid that
    covers the model-input square: resized like the image (area average, then >= 0.5) and
    zero-padded where SAM 1 pads the image."""
    grid_h, grid_w = low_res_size
    covered = (max(1, round(input_size[0] * grid_h / image_size)), max(1, round(input_size[1] * grid_w / image_size)))
    resized = []
    for mask in masks:  # one at a time: original-size float copies of many masks add up
        tensor = torch.from_numpy(np.ascontiguousarray(mask)).to(device=device, dtype=torch.float32)
        resized.append(F.adaptive_avg_pool2d(tensor[None, None], covered)[0] >= 0.5)
    stacked = torch.stack(resized).float()
    return F.pad(stacked, (0, grid_w - covered[1], 0, grid_h - covered[0]))


def image_targets(masks: np.ndarray, predictor: Any, original_size: tuple[int, int],
                  input_size: tuple[int, int]) -> ImageTargets:
    """Low-res target masks and model-input-frame boxes for (N, H, W) bool masks."""
    model = predictor.model
    low_res_size = tuple(predictor.prompt_encoder.mask_input_size)
    targets = low_res_masks(masks, input_size, model.image_size, low_res_size, predictor.device)
    boxes = torch.as_tensor(boxes_from_masks(masks), dtype=torch.float64)
    boxes = predictor.transform.apply_boxes_torch(boxes, original_size).to(predictor.device)
    return ImageTargets(masks=targets, boxes=boxes, input_size=tuple(input_size), scale=model.image_size / low_res_size[1])


def interactive_loss(model: nn.Module, features: Any, targets: ImageTargets, config: TrainConfig,
                     generator: torch.Generator, autocast: bool) -> tuple[torch.Tensor, LossTerms]:
    """The SAM paper's simulated interactive session on B objects of one image.

    Round 0: a foreground point (3 masks, lowest loss backpropagated) or a noisy box (1 mask).
    Then `round_schedule`: rounds adding an error-region point, and rounds feeding the previous
    logits back alone; every later round has the previous logits as mask_input and gives one
    mask. Returns the loss averaged over rounds, and the first round's loss terms.
    """
    use_point = bool(torch.rand(1, generator=generator, device=generator.device) < config.point_probability)
    points, boxes = None, None
    if use_point:
        points = first_points(targets.masks, generator, targets.scale)
    else:
        boxes = noisy_boxes(targets.boxes, generator, targets.input_size)
    rounds = [True] + round_schedule(config.num_points, config.num_refine, generator)
    multimask, mask_input = use_point, None
    total, first_terms = 0.0, None
    for number, adds_point in enumerate(rounds):
        if number > 0 and adds_point:
            new = error_points(mask_input, targets.masks, generator, targets.scale)
            points = new if points is None else (torch.cat([points[0], new[0]], 1), torch.cat([points[1], new[1]], 1))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            low_res, iou_predictions, object_scores = model.decode(features, points, boxes, mask_input, multimask)
        terms = sam_loss(low_res, iou_predictions, targets.masks, config.focal_weight, config.dice_weight,
                         config.iou_weight, object_scores)
        total = total + terms.total
        if first_terms is None:
            first_terms = terms
        # The next round sees the mask SAM would show: the highest predicted IoU.
        best = iou_predictions.detach().argmax(dim=1)
        mask_input = low_res.detach()[torch.arange(len(best), device=best.device), best][:, None].float()
        multimask = False
    return total / len(rounds), first_terms


def _draw_objects(count: int, limit: int, generator: torch.Generator) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted(torch.randperm(count, generator=generator, device=generator.device)[:limit].tolist())


def image_loss(model: nn.Module, predictor: Any, dataset: SegmentationDataset, index: int,
               cache: EmbeddingCache | None, config: TrainConfig, generator: torch.Generator,
               autocast: bool) -> tuple[torch.Tensor, LossTerms] | None:
    """The interactive loss of up to `objects_per_image` objects of image `index` (None if it
    has no usable object)."""
    objects, masks = dataset.object_masks(index)
    chosen = _draw_objects(len(objects), config.objects_per_image, generator)
    if not chosen:
        return None
    masks = masks[chosen]
    if cache is not None:
        features, original_size, input_size = cache.get(index)
    else:
        image = dataset.load_image(index)
        original_size = image.shape[:2]
        input_size = predictor.transform.get_preprocess_shape(*original_size, predictor.transform.target_length)
        pixels = predictor.transform.to_input_tensor(image, predictor.device).to(predictor.dtype)
        with torch.set_grad_enabled(not config.encoder_frozen), \
                torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            features = model.encode_image(pixels)
    targets = image_targets(masks, predictor, original_size, input_size)
    keep = targets.masks.flatten(1).any(dim=1)  # objects too small for the low-res grid drop out
    if not keep.any():
        return None
    if not keep.all():
        targets = ImageTargets(targets.masks[keep], targets.boxes[keep], targets.input_size, targets.scale)
    return interactive_loss(model, features, targets, config, generator, autocast)


def train_step(model: nn.Module, predictor: Any, dataset: SegmentationDataset, indices: list[int],
               cache: EmbeddingCache | None, optimizer: torch.optim.Optimizer, lr: float, config: TrainConfig,
               generator: torch.Generator, autocast: bool) -> float | None:
    """One optimizer step over the images `indices`: their gradients are accumulated (each
    image's loss divided by the batch size), then AdamW steps. Returns the mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for index in indices:
        result = image_loss(model, predictor, dataset, index, cache, config, generator, autocast)
        if result is None:
            continue
        loss, _ = result
        (loss / len(indices)).backward()
        losses.append(float(loss.detach()))
    if not losses:
        return None
    optimizer.step()
    return float(np.mean(losses))


# ================================================================================ validation
def validate(predictor: Any, dataset: SegmentationDataset, cache: EmbeddingCache | None,
             config: TrainConfig) -> dict[str, Any]:
    """1-click (and `val_clicks`) and box mIoU on `dataset`, with the model in eval mode; the
    score used to keep the best weights is their mean."""
    from ..evaluation import evaluate_prompts

    predictor.model.eval()
    with torch.no_grad():
        evaluation = evaluate_prompts(predictor, dataset, num_clicks=config.val_clicks, box=True, embeddings=cache)
    summary = evaluation.summary()
    values = [summary[key] for key in ("miou_click_1", "miou_box") if summary.get(key) is not None]
    summary["score"] = float(np.mean(values)) if values else None
    return summary


# ================================================================================ checkpoints
def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run: _RunState,
                        config: TrainConfig, base: str) -> None:
    """Atomically write what `resume` needs: trainable weights, optimizer, counters, history."""
    trainable = {name: parameter.detach().to("cpu").clone() for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    atomic_torch_save(path, {
        "format": STATE_FORMAT,
        "config": config.to_dict(),
        "base_fingerprint": base,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "run": dataclasses.asdict(run),
    })


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                        base: str) -> _RunState:
    """Restore a `save_training_state` file into `model` and `optimizer`; the run must have the
    same settings (but `RESUMABLE_CHANGES`) and start from the same base weights."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"cannot resume from {path}: the file is unreadable ({error}); start without resume") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"cannot resume from {path}: not a langsam fine-tuning state")
    saved, current = state["config"], config.to_dict()
    changed = [key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]]
    if changed:
        details = ", ".join(f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in changed)
        raise ValueError(f"cannot resume from {path}: the run used other settings ({details}); "
                         f"resume with the same settings or start a new run in another folder")
    if state["base_fingerprint"] != base:
        raise ValueError(f"cannot resume from {path}: the frozen weights differ from the stopped run's "
                         f"(another --sam-type or checkpoint?)")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            if name not in parameters or not parameters[name].requires_grad:
                raise ValueError(f"cannot resume from {path}: it trains {name!r}, which this run does not")
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    return _RunState(**state["run"])


# ================================================================================ the run
def finetune(
    model: nn.Module,
    train: SegmentationDataset,
    out_dir: str | Path,
    val: SegmentationDataset | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune `model` (a ``sam.Sam`` or ``sam.Sam2``; trained in place) on `train`.

    out_dir: where checkpoints, the embedding cache and metrics go. val: the validation set
    (None: no validation; the last weights are also the "best", written when the run ends).
    resume: continue the run
    stopped in `out_dir`. cache_dir: the embedding cache (default ``out_dir/embeddings``).
    """
    from ..predictor import SamPredictor

    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = getattr(model, "family", "sam1")
    state_path = out_dir / STATE_NAME
    if resume and not state_path.is_file():
        raise ValueError(f"nothing to resume in {out_dir}: {STATE_NAME} is missing")
    if not resume and state_path.is_file():
        raise ValueError(f"{out_dir} already holds a run ({STATE_NAME}); pass resume=True (--resume) to continue "
                         f"it, or choose another output folder")
    if train.num_objects == 0:
        raise ValueError(f"the training set {train.name} has no objects to train on")
    if val is not None and val.num_objects == 0:
        logger.warning("the validation set %s has no objects: training without validation", val.name)
        val = None
    if device is not None:
        model.to(device)

    # 1. What trains.
    trainable = select_trainable(model, config)
    base = frozen_fingerprint(model)
    predictor = SamPredictor(model)
    autocast = config.amp and predictor.device.type == "cuda"
    logger.info("training %d parameters (%d tensors)", sum(p.numel() for p in trainable.values()), len(trainable))

    # 2. Features computed once while the encoder is frozen.
    train_cache = val_cache = None
    if config.encoder_frozen and config.cache_embeddings:
        cache_root = Path(cache_dir) if cache_dir is not None else out_dir / CACHE_DIR_NAME
        train_cache = EmbeddingCache(cache_root / "train", predictor, train, config.cache_dtype, progress).build()
        if val is not None and len(val):
            val_cache = EmbeddingCache(cache_root / "val", predictor, val, config.cache_dtype, progress).build()

    # 3. Optimizer and schedule.
    optimizer = make_optimizer(trainable, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    run = _RunState()
    if resume:
        run = load_training_state(state_path, model, optimizer, config, base)
        logger.info("resuming at epoch %d, step %d", run.epoch + 1, run.step)

    def save_state() -> None:
        save_training_state(state_path, model, optimizer, run, config, base)

    def write_metrics() -> None:
        atomic_write_json(out_dir / METRICS_NAME, {"config": config.to_dict(), "family": family,
                                                    "steps": run.step, "best_score": run.best_score,
                                                    "history": run.history})

    def keep_if_best(summary: dict[str, Any] | None, weights: dict[str, torch.Tensor] | None = None) -> None:
        score = None if summary is None else summary.get("score")
        if summary is None or (score is not None and (run.best_score is None or score > run.best_score)):
            run.best_score = score
            weights = merged_state_dict(model) if weights is None else weights
            save_official(weights, family, out_dir / BEST_NAME)
            save_official(weights, family, out_dir / BEST_SAFETENSORS_NAME)

    # 5 (before training). The starting point is a candidate too: tuning can make things worse.
    if not resume and val is not None and len(val):
        summary = validate(predictor, val, val_cache, config)
        run.history.append({"epoch": 0, "step": 0, "train_loss": None, "val": summary})
        keep_if_best(summary)
        logger.info("before training: %s", _describe(summary))
        write_metrics()

    # 4. The loop.
    from tqdm.auto import tqdm

    stopped = False
    updating = False
    try:
        while run.epoch < config.epochs and not stopped:
            order = epoch_order(len(train), config.seed, run.epoch)
            set_train_mode(model, config)
            bar = tqdm(total=steps_per_epoch, initial=run.step_in_epoch, desc=f"epoch {run.epoch + 1}/{config.epochs}",
                       unit="step", disable=not progress, leave=False)
            started = time.perf_counter()
            try:
                while run.step_in_epoch < steps_per_epoch:
                    if config.max_steps is not None and run.step >= config.max_steps:
                        stopped = True
                        break
                    first = run.step_in_epoch * config.batch_size
                    indices = order[first:first + config.batch_size].tolist()
                    generator = _step_generator(config.seed, run.step, device=predictor.device)
                    lr = learning_rate(run.step, total_steps, config)
                    updating = True
                    loss = train_step(model, predictor, train, indices, train_cache, optimizer, lr, config,
                                      generator, autocast)
                    run.step += 1
                    run.step_in_epoch += 1
                    updating = False
                    if loss is not None:
                        run.loss_sum += loss
                        run.loss_count += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{run.loss_sum / max(run.loss_count, 1):.4f}", lr=f"{lr:.2e}", refresh=False)
                    if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                        save_state()
            finally:
                bar.close()
            if stopped:
                break
            # 5. Validation, best weights, checkpoints. The state is saved first, and an interrupt
            # from here to the next save resumes from it: the epoch's end is redone as a whole, so
            # best.pth and best.safetensors can never come from different weights.
            save_state()
            updating = True
            train_loss = run.loss_sum / run.loss_count if run.loss_count else None
            summary = validate(predictor, val, val_cache, config) if val is not None and len(val) else None
            run.history.append({"epoch": run.epoch + 1, "step": run.step, "train_loss": train_loss, "val": summary,
                                "seconds": time.perf_counter() - started})
            logger.info("epoch %d/%d: train loss %s, %s", run.epoch + 1, config.epochs,
                        "-" if train_loss is None else f"{train_loss:.4f}", _describe(summary))
            weights = merged_state_dict(model)
            if summary is not None:
                keep_if_best(summary, weights)
            save_official(weights, family, out_dir / LAST_NAME)
            run.epoch += 1
            run.step_in_epoch = 0
            run.loss_sum, run.loss_count = 0.0, 0
            save_state()
            updating = False
            write_metrics()
    except KeyboardInterrupt:
        if not updating:  # between steps the weights, optimizer and counters agree
            save_state()
            logger.warning("interrupted at step %d: state saved, continue with resume=True", run.step)
        raise
    if stopped:
        save_state()
        save_official(merged_state_dict(model), family, out_dir / LAST_NAME)
        write_metrics()
    if val is None or not len(val):  # without validation, the best weights are the last ones
        keep_if_best(None)
    model.eval()
    return FinetuneResult(best_checkpoint=out_dir / BEST_NAME, last_checkpoint=out_dir / LAST_NAME,
                          history=run.history, best_score=run.best_score, steps=run.step, stopped_early=stopped)


def _describe(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "no validation set"
    parts = [f"{key.replace('miou_', 'mIoU ').replace('_', ' ')} {value:.3f}" for key, value in summary.items()
             if key.startswith("miou_") and isinstance(value, float)]
    return ", ".join(parts)
