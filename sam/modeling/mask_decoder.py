"""The mask decoder every SAM family shares: output tokens (IoU + mask tokens) with the prompt
tokens through the two-way transformer, then hypernetwork MLPs against the upscaled image
tokens.

What SAM 2 adds to the modules are parameters here (off by default, which is SAM 1): an
object-score token and head, the high-resolution backbone features added while upscaling, a
sigmoid on the IoU head. They are parameters, not a subclass's modules, so that the parameters
register in the official order of both checkpoints. What SAM 2 changes in the outputs (the
object-score logits and pointer tokens, the single-mask fallback) is the subclass
`sam.sam2.decoder.Sam2MaskDecoder`."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        iou_prediction_use_sigmoid: bool = False,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_high_res_features: bool = False,
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
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # Applied once per image (in Sam2.encode_image), not per prompt.
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
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

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """image_embeddings: (1 or B, C, 64, 64); image_pe: (1, C, 64, 64); sparse: (B, N, C);
        dense: (B, C, 64, 64); high_res_features (with `use_high_res_features`):
        [(1 or B, C/8, 256, 256), (1 or B, C/4, 128, 128)], already through conv_s0 / conv_s1.

        Returns what `select_outputs` picks: here low-res mask logits (B, M, 256, 256) and IoU
        predictions (B, M), M = 3 or 1."""
        outputs = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features
        )
        return self.select_outputs(outputs, multimask_output)

    def select_outputs(self, outputs: tuple[torch.Tensor, ...], multimask_output: bool) -> tuple[torch.Tensor, ...]:
        """SAM 1's outputs, from what `predict_masks` returns: the three multimask outputs or
        the single one, (B, M, 256, 256) and (B, M)."""
        masks, iou_pred = outputs[:2]
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def output_tokens(self) -> torch.Tensor:
        """The learned output tokens in the order the transformer sees them, (T, C): the
        object-score token (if any), the IoU token, the mask tokens."""
        tables = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            tables.insert(0, self.obj_score_token.weight)
        return torch.cat(tables, dim=0)

    def upscale(self, src: torch.Tensor, high_res_features: list[torch.Tensor] | None) -> torch.Tensor:
        """Image tokens (B, C, 64, 64) -> (B, C/8, 256, 256); with high-resolution features,
        the stride-8 and stride-4 ones are added after the first and the second transposed
        convolution."""
        if not self.use_high_res_features:
            return self.output_upscaling(src)
        if high_res_features is None:
            raise ValueError("this decoder needs the high-resolution features (strides 4 and 8)")
        deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        upscaled = act1(norm1(deconv1(src) + feat_s1))
        return act2(deconv2(upscaled) + feat_s0)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
        batch_invariant: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All four masks (B, 4, 256, 256), their IoU predictions (B, 4), the mask tokens out of
        the transformer (B, 4, C) and the object-score logits (B, 1).

        batch_invariant: compute each prompt set's numbers exactly (bit for bit, on CPU) as a
        batch of that one set would, so that prompt sets of different requests, each with its
        own image (image_embeddings and high_res_features of batch B), can share one call. Two
        things would round differently in a batch: the transformer's folded projections
        (never used for a batch of 1) and the small heads, where one set's (1, C) token is a
        matrix-vector product but several sets' (B, C) tokens a matrix product."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = self.output_tokens()
        first = output_tokens.shape[0] - 1 - self.num_mask_tokens  # index of the IoU token
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        dense_shared = dense_prompt_embeddings.shape[0] == 1 or dense_prompt_embeddings.stride(0) == 0
        if image_embeddings.shape[0] == 1 and dense_shared:
            # Without mask prompts every prompt sees the same image tokens: keep a batch of 1 and
            # let the transformer broadcast it, instead of copying the image once per prompt.
            src = image_embeddings + dense_prompt_embeddings[:1]
        else:
            src = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        _, channels, height, width = src.shape

        hs, src = self.transformer(src, image_pe[:1], tokens, fold_projections=not batch_invariant)
        if src.shape[0] != batch:  # only with a transformer of depth 0
            src = src.expand(batch, -1, -1)
        iou_token_out = hs[:, first, :]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = self.upscale(src, high_res_features)
        rows = [slice(row, row + 1) for row in range(batch)] if batch_invariant else [slice(None)]

        def head(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([module(tokens[row]) for row in rows]) if len(rows) > 1 else module(tokens)

        hyper_in = torch.stack(
            [head(mlp, mask_tokens_out[:, index, :]) for index, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        _, up_channels, up_h, up_w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(batch, up_channels, up_h * up_w)).reshape(batch, -1, up_h, up_w)
        iou_pred = head(self.iou_prediction_head, iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = head(self.pred_obj_score_head, hs[:, 0, :])
        else:
            # A confident "object present" when the model has no object-score head.
            object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, object_score_logits
