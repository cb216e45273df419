"""The SAM 2 prompt encoder and mask decoder.

Three things differ from SAM 1 and make the SAM 1 modules inexact here:
- the prompt encoder also takes box corners as points labelled 2 (top-left) and 3
  (bottom-right), which is how SAM 2 passes boxes;
- the two-way transformer's MLPs are named `mlp.layers.0/1` in the checkpoints (SAM 1:
  `mlp.lin1/lin2`); the computation is the same, so our transformer is reused with them;
- the mask decoder (a subclass of the shared `sam.modeling.MaskDecoder`) has an object-score
  token and head, adds the high-resolution backbone features (strides 4 and 8, through
  `conv_s0`/`conv_s1`) while upscaling, squashes IoU predictions with a sigmoid, and, asked
  for one mask, falls back to the best of the three multimask outputs when the single mask
  is unstable.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.common import MLP
from ..modeling.mask_decoder import MaskDecoder
from ..modeling.prompt_encoder import PromptEncoder
from ..modeling.transformer import TwoWayTransformer

# Point labels understood by the SAM 2 prompt encoder.
PADDING_LABEL, BACKGROUND_LABEL, FOREGROUND_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 0, 1, 2, 3


class Sam2PromptEncoder(PromptEncoder):
    """SAM 1's prompt encoder, with box corners accepted as points labelled 2 and 3."""

    point_labels = 4


class Sam2TwoWayTransformer(TwoWayTransformer):
    """Our two-way transformer with the MLP parameter names of the SAM 2 checkpoints."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__(depth=depth, embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim)
        for layer in self.layers:
            # Linear -> ReLU -> Linear, as MLPBlock, under the names `layers.0` / `layers.1`.
            layer.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2)


class Sam2MaskDecoder(MaskDecoder):
    """The shared mask decoder with SAM 2's settings switched on (object-score token and head,
    high-resolution features, sigmoid IoU) and SAM 2's outputs: object-score logits and the
    tokens for object pointers, and, asked for one mask, the fallback to the best multimask
    output where the single mask is unstable."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
            iou_prediction_use_sigmoid=iou_prediction_use_sigmoid,
            pred_obj_scores=pred_obj_scores,
            pred_obj_scores_mlp=pred_obj_scores_mlp,
            use_high_res_features=use_high_res_features,
        )
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def select_outputs(self, outputs: tuple[torch.Tensor, ...], multimask_output: bool) -> tuple[torch.Tensor, ...]:
        """SAM 2's outputs: low-res mask logits (B, M, 256, 256), IoU predictions (B, M), the
        output tokens for object pointers (B, 3 or 1, C) and object-score logits (B, 1);
        M = 3 or 1."""
        masks, iou_pred, mask_tokens_out, object_score_logits = outputs
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self.dynamic_multimask_via_stability_select(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at +delta and -delta: (B, M, H, W) -> (B, M); 1 if empty."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        intersection = (flat > delta).sum(dim=-1).float()
        union = (flat > -delta).sum(dim=-1).float()
        return torch.where(union > 0, intersection / union, 1.0)

    def dynamic_multimask_via_stability_select(
        self, all_mask_logits: torch.Tensor, all_iou_scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the single-mask output (token 0) where it is stable (score >= threshold);
        elsewhere take the multimask output (tokens 1..3) with the highest predicted IoU.
        (B, 4, H, W), (B, 4) -> (B, 1, H, W), (B, 1)."""
        multimask_iou = all_iou_scores[:, 1:]
        best = multimask_iou.argmax(dim=-1)
        rows = torch.arange(all_iou_scores.shape[0], device=all_iou_scores.device)
        best_logits = all_mask_logits[:, 1:][rows, best].unsqueeze(1)
        best_iou = multimask_iou[rows, best].unsqueeze(1)
        single_logits, single_iou = all_mask_logits[:, 0:1], all_iou_scores[:, 0:1]
        is_stable = self.stability_scores(single_logits) >= self.dynamic_multimask_stability_thresh
        logits = torch.where(is_stable[..., None, None], single_logits, best_logits)
        iou = torch.where(is_stable, single_iou, best_iou)
        return logits, iou
