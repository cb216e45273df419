"""SAM 3's output heads: the query-vs-prompt dot-product scorer and the segmentation head.

Names follow Meta's `sam3.pt` under `detector.`: `dot_prod_scoring.{prompt_mlp.layers.N,
prompt_mlp.out_norm, prompt_proj, hs_proj}` and `segmentation_head.{pixel_decoder.conv_layers.N,
pixel_decoder.norms.N, mask_predictor.mask_embed.layers.N, instance_seg_head, semantic_seg_head,
cross_attend_prompt, cross_attn_norm}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, FusedAttention


class PromptMLP(MLP):
    """Meta's residual `MLP` with an output LayerNorm (`layers.0/1`, `out_norm`)."""

    def __init__(self, d_model: int, hidden_dim: int) -> None:
        super().__init__(d_model, hidden_dim, d_model, 2)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(x + super().forward(x))


class DotProductScoring(nn.Module):
    """Query logits: each query (B, Q, C) against the mean of the valid prompt tokens (B, P, C),
    scaled by 1/sqrt(C) and clamped to +-12 -> (B, Q)."""

    def __init__(self, d_model: int, hidden_dim: int) -> None:
        super().__init__()
        self.prompt_mlp = PromptMLP(d_model, hidden_dim)
        self.prompt_proj = nn.Linear(d_model, d_model)
        self.hs_proj = nn.Linear(d_model, d_model)
        self.scale = d_model**-0.5

    def forward(self, queries: torch.Tensor, prompt: torch.Tensor, prompt_valid: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_mlp(prompt)
        weight = prompt_valid.to(prompt.dtype)[..., None]
        pooled = (prompt * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        logits = torch.einsum("bqc,bc->bq", self.hs_proj(queries), self.prompt_proj(pooled)) * self.scale
        return logits.clamp(-12.0, 12.0)


class PixelDecoder(nn.Module):
    """Top-down FPN over the backbone levels (finest first): nearest upsampling, add, conv, GroupNorm, ReLU."""

    def __init__(self, d_model: int, num_stages: int) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(d_model, d_model, 3, padding=1) for _ in range(num_stages))
        self.norms = nn.ModuleList(nn.GroupNorm(8, d_model) for _ in range(num_stages))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for conv, norm, skip in zip(self.conv_layers, self.norms, reversed(feats[:-1])):
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return x


class MaskPredictor(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mask_embed = MLP(d_model, d_model, d_model, 3)


class SegmentationHead(nn.Module):
    """Instance masks: the encoded image tokens first cross-attend to the prompt, replace the coarsest
    backbone level, go through the pixel decoder, and meet each query's mask embedding.
    Returns mask logits (B, Q, H0, W0) at the finest backbone level."""

    def __init__(self, d_model: int, num_heads: int, num_stages: int = 3) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(d_model, num_stages)
        self.mask_predictor = MaskPredictor(d_model)
        self.instance_seg_head = nn.Conv2d(d_model, d_model, 1)
        self.semantic_seg_head = nn.Conv2d(d_model, 1, 1)
        self.cross_attend_prompt = FusedAttention(d_model, num_heads)
        self.cross_attn_norm = nn.LayerNorm(d_model)

    def forward(self, queries, feats, memory, prompt, prompt_valid) -> torch.Tensor:
        """queries (B, Q, C); feats: backbone levels (B, C, h, w), finest first; memory (B, hw, C)
        from the fusion encoder at the coarsest level; prompt (B, P, C) with prompt_valid (B, P)."""
        normed = self.cross_attn_norm(memory)
        memory = memory + self.cross_attend_prompt(normed, prompt, prompt, key_valid=prompt_valid)
        coarse = memory.transpose(1, 2).reshape(feats[-1].shape)
        pixels = self.pixel_decoder([*feats[:-1], coarse])
        instance = self.instance_seg_head(pixels)
        return torch.einsum("bqc,bchw->bqhw", self.mask_predictor.mask_embed(queries), instance)
