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


def _merge_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """A 3-tap kernel axis seen through nearest 2x upsampling: output phase 0 reads input rows
    (i-1, i) with taps (k0, k1 + k2), phase 1 reads (i, i+1) with (k0 + k1, k2). Returns the two
    2-tap kernels stacked in front."""
    k0, k1, k2 = weight.unbind(dim)
    return torch.stack((torch.stack((k0, k1 + k2), dim), torch.stack((k0 + k1, k2), dim)))


def upsampled_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`conv2d(interpolate(x, scale 2, nearest), weight, padding=1)` without a bias, computed at x's
    resolution: the four output phases are 2x2 convolutions of x (4 taps instead of 9 per output
    pixel, on a quarter of the pixels' inputs). x (B, C, h, w), weight (O, C, 3, 3) -> (B, O, 2h, 2w)."""
    out_channels = weight.shape[0]
    rows = _merge_taps(weight, 2)  # (2, O, C, 2, 3)
    kernel = torch.stack([_merge_taps(rows[a], 3) for a in range(2)])  # (2, 2, O, C, 2, 2)
    batch, _, height, width = x.shape
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel.reshape(4 * out_channels, -1, 2, 2))
    y = y.view(batch, 2, 2, out_channels, height + 1, width + 1)
    phases = [[y[:, a, b, :, a : a + height, b : b + width] for b in range(2)] for a in range(2)]
    out = torch.stack([torch.stack(row, dim=-1) for row in phases], dim=-3)  # (B, O, h, 2, w, 2)
    return out.reshape(batch, out_channels, 2 * height, 2 * width)


class PixelDecoder(nn.Module):
    """Top-down FPN over the backbone levels (finest first): nearest upsampling, add, conv, GroupNorm, ReLU.

    The conv is linear, so conv(skip + up(x)) = conv(skip) + conv(up(x)): the first term depends
    only on the image (`skip_terms`, cached per image by Sam3Predictor), the second is computed
    at the coarse resolution (`upsampled_conv`). Same values as Meta's order to float rounding.
    That pays only with the first term cached: without `skip_terms` (one prompt per image, as in
    video) the split costs 13 taps per output pixel against the direct order's 9, so the direct
    order (Meta's own) runs then."""

    def __init__(self, d_model: int, num_stages: int) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(d_model, d_model, 3, padding=1) for _ in range(num_stages))
        self.norms = nn.ModuleList(nn.GroupNorm(8, d_model) for _ in range(num_stages))

    def skip_terms(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """conv(skip) + bias for each stage's backbone level: the prompt-independent half."""
        return [conv(skip) for conv, skip in zip(self.conv_layers, reversed(feats[:-1]))]

    def forward(self, feats: list[torch.Tensor], skip_terms: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = feats[-1]
        for index, (conv, norm, skip) in enumerate(zip(self.conv_layers, self.norms, reversed(feats[:-1]))):
            if skip_terms is not None and skip.shape[-2:] == (2 * x.shape[-2], 2 * x.shape[-1]):
                x = skip_terms[index] + upsampled_conv(x, conv.weight)
            else:  # not an exact 2x step: the direct order
                x = conv(skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
            x = F.relu(norm(x), inplace=True)
        return x


class MaskPredictor(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mask_embed = MLP(d_model, d_model, d_model, 3)


class SegmentationHead(nn.Module):
    """Instance masks: the encoded image tokens first cross-attend to the prompt, replace the coarsest
    backbone level, go through the pixel decoder, and meet each query's mask embedding (through
    the 1x1 `instance_seg_head`, folded into the embedding). Returns mask logits (B, Q, H0, W0) at
    the finest backbone level."""

    def __init__(self, d_model: int, num_heads: int, num_stages: int = 3) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(d_model, num_stages)
        self.mask_predictor = MaskPredictor(d_model)
        self.instance_seg_head = nn.Conv2d(d_model, d_model, 1)
        self.semantic_seg_head = nn.Conv2d(d_model, 1, 1)
        self.cross_attend_prompt = FusedAttention(d_model, num_heads)
        self.cross_attn_norm = nn.LayerNorm(d_model)

    def forward(self, queries, feats, memory, prompt, prompt_valid, skip_terms=None) -> torch.Tensor:
        """queries (B, Q, C); feats: backbone levels (B, C, h, w), finest first; memory (B, hw, C)
        from the fusion encoder at the coarsest level; prompt (B, P, C) with prompt_valid (B, P);
        skip_terms: the image's PixelDecoder.skip_terms (computed here when None)."""
        normed = self.cross_attn_norm(memory)
        memory = memory + self.cross_attend_prompt(normed, prompt, prompt, key_valid=prompt_valid)
        coarse = memory.transpose(1, 2).reshape(feats[-1].shape)
        pixels = self.pixel_decoder([*feats[:-1], coarse], skip_terms)
        # The 1x1 instance_seg_head conv is linear: embed . (W pixels + b) = (embed W) . pixels + embed . b,
        # so it folds into the Q query embeddings instead of running over every fine pixel.
        embed = self.mask_predictor.mask_embed(queries)
        weight = self.instance_seg_head.weight.flatten(1)  # (C_out, C_in)
        batch, channels, height, width = pixels.shape
        masks = torch.baddbmm((embed @ self.instance_seg_head.bias)[..., None], embed @ weight, pixels.reshape(batch, channels, -1))
        return masks.view(batch, -1, height, width)
