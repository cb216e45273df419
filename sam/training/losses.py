"""The SAM paper's training loss.

Masks: focal loss and dice loss at 20:1 (as DETR combines them); the IoU head: mean squared
error between its prediction and the IoU of the predicted mask with the truth. For an ambiguous
prompt (several output masks) only the mask with the lowest mask loss is backpropagated; the
IoU head is supervised on every output mask, since its scores pick among them at inference.

All losses work on the low-res logits frame (B, C, h, w) (256x256 for the released models),
against targets (B, 1, h, w) in {0, 1} in the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels: (B, C, h, w) logits, (B, 1, h, w) targets -> (B, C)."""
    targets = targets.expand_as(logits)
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - p_true) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice coefficient: (B, C, h, w) logits, (B, 1, h, w) targets -> (B, C)."""
    probabilities = logits.sigmoid().flatten(2)
    targets = targets.expand_as(logits).flatten(2)
    numerator = 2 * (probabilities * targets).sum(-1)
    denominator = probabilities.sum(-1) + targets.sum(-1)
    return 1 - (numerator + smooth) / (denominator + smooth)


@torch.no_grad()
def mask_iou_from_logits(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of (logits > threshold) with the targets: (B, C, h, w), (B, 1, h, w) -> (B, C).
    Two empty masks count as IoU 1."""
    predicted = (logits > threshold).flatten(2)
    truth = (targets > 0.5).expand_as(logits).flatten(2)
    intersection = (predicted & truth).sum(-1).float()
    union = (predicted | truth).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LossTerms:
    """One decode's loss and its parts (each averaged over the B objects)."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    chosen: torch.Tensor  # (B,) index of the backpropagated mask
    object_score: torch.Tensor | None = None


def sam_loss(
    low_res_logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    targets: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    object_score_logits: torch.Tensor | None = None,
) -> LossTerms:
    """The SAM loss of one decode.

    low_res_logits: (B, C, h, w); iou_predictions: (B, C); targets: (B, 1, h, w) in {0, 1}.
    With C > 1 (multimask output) each object backpropagates only its lowest-loss mask.
    object_score_logits: SAM 2's (B, 1) object-presence logits; every training object is
    present, so they get a binary cross-entropy towards 1 (weight 1, as in SAM 2's loss).
    """
    logits = low_res_logits.float()
    targets = targets.to(logits.dtype)
    focal = focal_loss(logits, targets)
    dice = dice_loss(logits, targets)
    mask_loss = focal_weight * focal + dice_weight * dice  # (B, C)
    chosen = mask_loss.detach().argmin(dim=1)
    rows = torch.arange(len(chosen), device=chosen.device)
    true_iou = mask_iou_from_logits(logits.detach(), targets)
    iou_loss = F.mse_loss(iou_predictions.float(), true_iou, reduction="none").mean(dim=1)
    total = mask_loss[rows, chosen].mean() + iou_weight * iou_loss.mean()
    object_loss = None
    if object_score_logits is not None:
        object_loss = F.binary_cross_entropy_with_logits(
            object_score_logits.float(), torch.ones_like(object_score_logits, dtype=torch.float32))
        total = total + object_loss
    return LossTerms(total=total, focal=focal[rows, chosen].mean().detach(), dice=dice[rows, chosen].mean().detach(),
                     iou=iou_loss.mean().detach(), chosen=chosen,
                     object_score=None if object_loss is None else object_loss.detach())
