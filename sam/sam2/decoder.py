"""The SAM 2 prompt encoder and mask decoder.

Three things differ from SAM 1 and make the SAM 1 modules inexact here:
- the prompt encoder also takes box corners as points labelled 2 (top-left) and 3
  (bottom-right), which is how SAM 2 passes boxes;
- the two-way transformer's MLPs are named `mlp.layers.0/1` in the checkpoints (SAM 1:
  `mlp.lin1/lin2`); the computation is the same, so our transformer is reused with them;
- the mask decoder has an object-score token and head, adds the high-resolution backbone
  features (strides 4 and 8, through `conv_s0`/`conv_s1`) while upscaling, squashes IoU
  predictions with a sigmoid, and, asked for one mask, falls back to the best of the three
  multimask outputs when the single mask is unstable.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.common import MLP, LayerNorm2d
from ..modeling.prompt_encoder import PromptEncoder
from ..modeling.transformer import TwoWayTransformer

# Point labels understood by the SAM 2 prompt encoder.
PADDING_LABEL, BACKGROUND_LABEL, FOREGROUND_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 0, 1, 2, 3


class Sam2PromptEncoder(PromptEncoder):
    """SAM 1's prompt encoder, with box corners accepted as points labelled 2 and 3."""

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box the decoder was trained to see one extra padding point.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == PADDING_LABEL, self.not_a_point_embed.weight, embedding)
        for label, table in enumerate(self.point_embeddings):
            embedding = embedding + torch.where(labels == label, table.weight, 0.0)
        return embedding


class Sam2TwoWayTransformer(TwoWayTransformer):
    """Our two-way transformer with the MLP parameter names of the SAM 2 checkpoints."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__(depth=depth, embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim)
        for layer in self.layers:
            # Linear -> ReLU -> Linear, as MLPBlock, under the names `layers.0` / `layers.1`.
            layer.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2)


class Sam2MaskDecoder(nn.Module):
    """Output tokens (object score, IoU, 4 masks) + prompt tokens through the two-way
    transformer, then hypernetwork MLPs against the upscaled image tokens."""

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
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        # Mask token 0 is the single-mask output; tokens 1..3 are the ambiguity-aware outputs.
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied once per image (in Sam2.encode_image), not per prompt.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
            )
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """image_embeddings: (1 or B, C, 64, 64); image_pe: (1, C, 64, 64); sparse: (B, N, C);
        dense: (B, C, 64, 64); high_res_features: [(1 or B, C/8, 256, 256), (1 or B, C/4, 128, 128)]
        already through conv_s0 / conv_s1.

        Returns low-res mask logits (B, M, 256, 256), IoU predictions (B, M), the output tokens
        for object pointers (B, 3 or 1, C) and object-score logits (B, 1); M = 3 or 1.
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features
        )
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

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All four masks (B, 4, 256, 256), their IoU (B, 4), the mask tokens (B, 4, C) and the
        object-score logits (B, 1)."""
        batch = sparse_prompt_embeddings.shape[0]
        first = 1 if self.pred_obj_scores else 0  # index of the IoU token
        token_tables = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            token_tables.insert(0, self.obj_score_token.weight)
        output_tokens = torch.cat(token_tables, dim=0).unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        dense_shared = dense_prompt_embeddings.shape[0] == 1 or dense_prompt_embeddings.stride(0) == 0
        if image_embeddings.shape[0] == 1 and dense_shared:
            # Without mask prompts every prompt sees the same image tokens: keep a batch of 1 and
            # let the transformer broadcast it, instead of copying the image once per prompt.
            src = image_embeddings + dense_prompt_embeddings[:1]
        else:
            src = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        _, channels, height, width = src.shape

        hs, src = self.transformer(src, image_pe[:1], tokens)
        if src.shape[0] != batch:  # only with a transformer of depth 0
            src = src.expand(batch, -1, -1)
        iou_token_out = hs[:, first, :]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this decoder needs the high-resolution features (strides 4 and 8)")
            deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(norm1(deconv1(src) + feat_s1))
            upscaled = act2(deconv2(upscaled) + feat_s0)
        else:
            upscaled = self.output_upscaling(src)

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, index, :]) for index, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        _, up_channels, up_h, up_w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(batch, up_channels, up_h * up_w)).reshape(batch, -1, up_h, up_w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:
            # A confident "object present" when the model has no object-score head.
            object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, object_score_logits

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
