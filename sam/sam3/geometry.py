"""SAM 3's geometry (exemplar) encoder: box prompts -> prompt tokens.

Meta's `SequenceGeometryEncoder` as SAM 3 builds it, names as in `sam3.pt` under
`detector.geometry_encoder.`: `label_embed` (negative, positive), `cls_embed`, `boxes_direct_project`,
`boxes_pool_project` (ROI-align, roi x roi conv), `boxes_pos_enc_project`, `final_proj` + `norm`,
`img_pre_norm`, `encode.N` (pre-norm layers) and `encode_norm`. The point projections
(`points_*`) exist in Meta's checkpoint; they are built only when the checkpoint has them, and
point prompts are not wired up yet.

The cls token is always appended, also when there is no box at all: that is Meta's text-only
path (transformers' `Sam3Model` skips the encoder then; see the package docstring).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from .layers import TWO_PI, PreNormLayer, box_cxcywh_to_xyxy, sine_features


def append_after_valid(seq: torch.Tensor, valid: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert `token` (B, C) right after the valid (left-aligned) entries of seq (B, N, C):
    returns (B, N + 1, C) and its valid mask (B, N + 1)."""
    batch, length, dim = seq.shape
    counts = valid.sum(dim=1)
    out = torch.cat((seq, seq.new_zeros(batch, 1, dim)), dim=1)
    out = out.scatter(1, counts.view(batch, 1, 1).expand(-1, 1, dim), token[:, None, :])
    positions = torch.arange(length + 1, device=seq.device)[None]
    return out, positions <= counts[:, None]


class GeometryEncoder(nn.Module):
    def __init__(self, d_model: int, num_layers: int, num_heads: int, ffn_dim: int, roi_size: int = 7, point_projections: bool = False):
        super().__init__()
        self.d_model = d_model
        self.roi_size = roi_size
        self.label_embed = nn.Embedding(2, d_model)
        self.cls_embed = nn.Embedding(1, d_model)
        if point_projections:
            self.points_direct_project = nn.Linear(2, d_model)
            self.points_pool_project = nn.Linear(d_model, d_model)
            self.points_pos_enc_project = nn.Linear(d_model, d_model)
        self.boxes_direct_project = nn.Linear(4, d_model)
        self.boxes_pool_project = nn.Conv2d(d_model, d_model, roi_size)
        self.boxes_pos_enc_project = nn.Linear(d_model + 2, d_model)
        self.final_proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.img_pre_norm = nn.LayerNorm(d_model)
        self.encode = nn.ModuleList(
            PreNormLayer(d_model, num_heads, ffn_dim, pos_at_self=False, pos_at_cross_keys=True) for _ in range(num_layers)
        )
        self.encode_norm = nn.LayerNorm(d_model)

    def _encode_boxes(self, boxes: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """boxes (B, N, 4) cxcywh in [0, 1], labels (B, N) 0/1, feats (B, C, H, W) -> (B, N, C)."""
        batch, count = boxes.shape[:2]
        embed = self.boxes_direct_project(boxes)
        height, width = feats.shape[-2:]
        scale = boxes.new_tensor([width, height, width, height])
        xyxy = box_cxcywh_to_xyxy(boxes) * scale
        pooled = roi_align(feats, list(xyxy.float().unbind(0)), self.roi_size)
        embed = embed + self.boxes_pool_project(pooled).view(batch, count, self.d_model)
        cx, cy, w, h = boxes.unbind(-1)
        half = self.d_model // 2
        pos = torch.cat(
            (sine_features(cy * TWO_PI, half), sine_features(cx * TWO_PI, half), h[..., None], w[..., None]), dim=-1
        )
        embed = embed + self.boxes_pos_enc_project(pos)
        return embed + self.label_embed(labels.long())

    def forward(
        self,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        feats: torch.Tensor,
        pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes (B, N, 4) cxcywh in [0, 1] (N may be 0), labels (B, N) 1 positive / 0 negative,
        valid (B, N) bool, left-aligned; feats/pos (B, C, H, W) of the finest-but-coarse level the
        DETR encoder also uses. Returns prompt tokens (B, N + 1, C) and their valid mask."""
        batch = feats.shape[0]
        memory = feats.flatten(2).transpose(1, 2)
        memory_pos = pos.flatten(2).transpose(1, 2)
        normed = self.img_pre_norm(memory).transpose(1, 2).reshape(feats.shape)
        if boxes.shape[1]:
            tokens = self._encode_boxes(boxes, labels, normed)
        else:
            tokens = memory.new_zeros(batch, 0, self.d_model)
        cls = self.cls_embed.weight.expand(batch, -1)
        tokens, valid = append_after_valid(tokens, valid, cls)
        tokens = self.norm(self.final_proj(tokens))
        for layer in self.encode:
            tokens = layer(tokens, memory, tgt_valid=valid, memory_pos=memory_pos)
        return self.encode_norm(tokens), valid
