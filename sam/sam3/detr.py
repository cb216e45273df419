"""SAM 3's DETR-style fusion encoder and query decoder (with the presence token and box refinement).

Names follow Meta's `sam3.pt` under `detector.transformer.`: `encoder.layers.N` (pre-norm:
`self_attn`, `cross_attn_image` over the prompt, `linear1/2`, `norm1..3`) and `decoder.`:
`layers.N.{self_attn, norm2, ca_text, catext_norm, cross_attn, norm1, linear1, linear2, norm3}`,
`norm`, `bbox_embed`, `query_embed`, `reference_points`, `presence_token`, `presence_token_head`,
`presence_token_out_norm`, `ref_point_head`, `boxRPB_embed_x`, `boxRPB_embed_y`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import TWO_PI, MLP, FusedAttention, PreNormLayer, box_cxcywh_to_xyxy, inverse_sigmoid, sine_features


class FusionEncoder(nn.Module):
    """Image tokens (B, HW, C) attend to themselves (with positions) and to the prompt tokens."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            PreNormLayer(d_model, num_heads, ffn_dim, pos_at_self=True, pos_at_cross_keys=False) for _ in range(num_layers)
        )

    def image_terms(self, image: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The first layer's self-attention half: it runs before anything reads the prompt, so it
        depends on the image alone (`first_self` of `forward`, cached per image by Sam3Predictor)."""
        return self.layers[0].attend_self(image, tgt_pos=pos)

    def forward(
        self,
        image: torch.Tensor,
        pos: torch.Tensor,
        prompt: torch.Tensor,
        prompt_valid: torch.Tensor,
        first_self: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image/pos (B, HW, C), prompt (B, P, C) with prompt_valid (B, P); first_self: this image's
        `image_terms` (computed here when None). Returns the conditioned image tokens (B, HW, C)."""
        for index, layer in enumerate(self.layers):
            if index == 0:
                image = self.image_terms(image, pos) if first_self is None else first_self.expand_as(image)
                image = layer.attend_memory(image, prompt, memory_valid=prompt_valid)
            else:
                image = layer(image, prompt, tgt_pos=pos, memory_valid=prompt_valid)
        return image


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, text (prompt) cross-attention, image
    cross-attention with the box relative-position bias, ReLU MLP."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = FusedAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ca_text = FusedAttention(d_model, num_heads)
        self.catext_norm = nn.LayerNorm(d_model)
        self.cross_attn = FusedAttention(d_model, num_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, prompt, prompt_valid, memory, memory_pos, bias):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt))
        tgt = self.catext_norm(tgt + self.ca_text(tgt + query_pos, prompt, prompt, key_valid=prompt_valid))
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, memory + memory_pos, memory, bias=bias))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def _log_deltas(deltas: torch.Tensor) -> torch.Tensor:
    deltas = deltas * 8
    return torch.sign(deltas) * torch.log2(deltas.abs() + 1.0) / math.log2(8)


class QueryDecoder(nn.Module):
    """`num_queries` object queries plus one presence token, refined layer by layer.

    Returns the last layer's normed query states (B, Q, C), boxes (B, Q, 4) cxcywh in [0, 1] and the
    presence logit (B,), clamped to +-10 as Meta does."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, ffn_dim: int, num_queries: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.reference_points = nn.Embedding(num_queries, 4)
        self.presence_token = nn.Embedding(1, d_model)
        self.presence_token_head = MLP(d_model, d_model, 1, 3)
        self.presence_token_out_norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.boxRPB_embed_x = MLP(2, d_model, num_heads, 2)
        self.boxRPB_embed_y = MLP(2, d_model, num_heads, 2)
        self.d_model = d_model

    def _box_bias(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Log-scaled distances of every image row/column to each box's edges, through the two MLPs:
        (B, heads, 1 + Q, H*W), with a zero row for the presence token."""
        xyxy = box_cxcywh_to_xyxy(boxes)
        rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype) / height
        cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype) / width
        dy = rows[None, None, :, None] - xyxy[:, :, None, 1::2]
        dx = cols[None, None, :, None] - xyxy[:, :, None, 0::2]
        bias_y = self.boxRPB_embed_y(_log_deltas(dy)).permute(0, 3, 1, 2)  # (B, heads, Q, H)
        bias_x = self.boxRPB_embed_x(_log_deltas(dx)).permute(0, 3, 1, 2)  # (B, heads, Q, W)
        if torch.jit.is_tracing():  # the ONNX export: no out= writes
            bias = (bias_y[..., None] + bias_x[..., None, :]).flatten(3)
            return F.pad(bias, (0, 0, 1, 0))
        batch, heads, count = bias_y.shape[:3]
        # written once, head-major and contiguous as SDPA reads it, row 0 (presence) zero
        bias = bias_y.new_empty(batch, heads, 1 + count, height, width)
        bias[:, :, 0] = 0
        torch.add(bias_y[..., None], bias_x[..., None, :], out=bias[:, :, 1:])
        return bias.flatten(3)

    def first_bias(self, height: int, width: int) -> torch.Tensor:
        """The first layer's box bias (1, heads, 1 + Q, H*W): its boxes are the learned reference
        points, so it depends on the map size alone (cached per image by Sam3Predictor)."""
        return self._box_bias(self.reference_points.weight.sigmoid()[None], height, width)

    def forward(self, memory, memory_pos, size, prompt, prompt_valid, first_bias=None):
        """memory/memory_pos (B, HW, C) from the fusion encoder, size (H, W), prompt (B, P, C);
        first_bias: `first_bias(*size)` (computed here when None)."""
        batch = memory.shape[0]
        tgt = torch.cat((self.presence_token.weight, self.query_embed.weight))[None].expand(batch, -1, -1)
        boxes = self.reference_points.weight.sigmoid()[None].expand(batch, -1, -1)
        half = self.d_model // 2
        for index, layer in enumerate(self.layers):
            cx, cy, w, h = (c * TWO_PI for c in boxes.unbind(-1))
            sine = torch.cat([sine_features(c, half) for c in (cy, cx, w, h)], dim=-1)
            query_pos = F.pad(self.ref_point_head(sine), (0, 0, 1, 0))
            if index == 0 and first_bias is not None:
                bias = first_bias.expand(batch, -1, -1, -1)
            else:
                bias = self._box_bias(boxes, *size)
            tgt = layer(tgt, query_pos, prompt, prompt_valid, memory, memory_pos, bias)
            queries = self.norm(tgt[:, 1:])
            boxes = (inverse_sigmoid(boxes) + self.bbox_embed(queries)).sigmoid()
        presence = self.presence_token_head(self.presence_token_out_norm(tgt[:, 0])).squeeze(-1)
        return queries, boxes, presence.clamp(-10.0, 10.0)
