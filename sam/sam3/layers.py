"""Blocks shared by the SAM 3 parts: attention with `nn.MultiheadAttention`'s parameter names,
Meta's `MLP`, sine position features and box conversions.

Conventions used across `sam.sam3`: tensors are batch-first, `(B, N, C)` for sequences and
`(B, C, H, W)` for maps; a `valid` mask is boolean `(B, N)`, True for a real token (Meta's code
stores the opposite, a padding mask); boxes are normalised to [0, 1], `cxcywh` unless named `xyxy`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TWO_PI = 2 * math.pi


class FusedAttention(nn.Module):
    """Multi-head attention holding one fused input projection, named as in
    `nn.MultiheadAttention` (`in_proj_weight` (3C, C), `in_proj_bias` (3C,), `out_proj`), so
    Meta's checkpoints load by name. Runs through `F.scaled_dot_product_attention`."""

    contiguous_from = 1 << 20  # query x key lengths from which the heads are made contiguous for SDPA

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """query (B, Nq, C), key/value (B, Nk, C); key_valid (B, Nk) bool; bias (B, heads, Nq, Nk)
        added to the logits. Returns (B, Nq, C)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        if q.shape[-2] * k.shape[-2] >= self.contiguous_from:
            # long attention (the DETR encoder's 5184 image tokens): SDPA's CPU kernel runs ~5% faster
            # on head-major contiguous inputs than on the (B, N, heads, d) views; the copies are small.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask = None
        if key_valid is not None:
            mask = key_valid[:, None, None, :]
        if bias is not None:
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """Meta's `MLP`: `num_layers` linear layers (`layers.0` ...) with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_features(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR sine features of coordinates already multiplied by the scale: (...,) -> (..., num_feats),
    sin and cos interleaved."""
    dim_t = torch.arange(num_feats, device=coords.device, dtype=coords.dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_grid(height: int, width: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised sine position map of a (height, width) grid: (dim, H, W), y features first."""
    eps = 1e-6
    y = torch.arange(1, height + 1, device=device, dtype=dtype) / (height + eps) * TWO_PI
    x = torch.arange(1, width + 1, device=device, dtype=dtype) / (width + eps) * TWO_PI
    pos_y = sine_features(y, dim // 2)[:, None, :].expand(height, width, -1)
    pos_x = sine_features(x, dim // 2)[None, :, :].expand(height, width, -1)
    return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class PreNormLayer(nn.Module):
    """Meta's pre-norm `TransformerEncoderLayer` as SAM 3 configures it for the geometry encoder and
    the DETR encoder: self-attention (position added to queries and keys when `pos_at_self`),
    cross-attention `cross_attn_image` (position added to the keys when `pos_at_cross_keys`), then a
    ReLU MLP (`linear1`, `linear2`), each behind `norm1..3` and a residual."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, pos_at_self: bool, pos_at_cross_keys: bool):
        super().__init__()
        self.self_attn = FusedAttention(dim, num_heads)
        self.cross_attn_image = FusedAttention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.pos_at_self = pos_at_self
        self.pos_at_cross_keys = pos_at_cross_keys

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_valid: torch.Tensor | None = None,
        tgt_pos: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
        memory_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt (B, N, C) attends to itself and to memory (B, M, C); returns (B, N, C)."""
        return self.attend_memory(self.attend_self(tgt, tgt_valid, tgt_pos), memory, memory_pos, memory_valid)

    def attend_self(self, tgt: torch.Tensor, tgt_valid: torch.Tensor | None = None, tgt_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The self-attention half (norm1, self_attn, residual): it reads tgt alone, so the DETR
        encoder's first layer computes it once per image (`FusionEncoder.image_terms`)."""
        x = self.norm1(tgt)
        qk = x + tgt_pos if self.pos_at_self else x
        return tgt + self.self_attn(qk, qk, x, key_valid=tgt_valid)

    def attend_memory(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor | None = None,
        memory_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rest after `attend_self`: cross-attention to memory, then the MLP."""
        x = self.norm2(tgt)
        key = memory + memory_pos if self.pos_at_cross_keys else memory
        tgt = tgt + self.cross_attn_image(x, key, memory, key_valid=memory_valid)
        x = self.norm3(tgt)
        return tgt + self.linear2(F.relu(self.linear1(x), inplace=True))
