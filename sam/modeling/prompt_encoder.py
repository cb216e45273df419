"""SAM prompt encoder: points, boxes and dense masks -> sparse and dense prompt embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier-feature positional encoding of (x, y) coordinates normalised to [0, 1]."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] -> (..., 2 * num_pos_feats)."""
        projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an (h, w) grid of cell centres -> (C, h, w)."""
        height, width = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(height, device=matrix.device, dtype=matrix.dtype) + 0.5) / height
        xs = (torch.arange(width, device=matrix.device, dtype=matrix.dtype) + 0.5) / width
        grid = torch.stack(
            [xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1
        )
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) xy pixel coordinates in the model-input frame -> (B, N, C)."""
        normalised = coords.clone()
        normalised[:, :, 0] = normalised[:, :, 0] / image_size[1]
        normalised[:, :, 1] = normalised[:, :, 1] / image_size[0]
        return self._encode(normalised.to(self.positional_encoding_gaussian_matrix.dtype))


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Points carry labels 1 (foreground), 0 (background) or -1 (padding). Boxes are embedded
    as their two corners. A dense (B, 1, 256, 256) mask prompt is downscaled by convs to the
    image-embedding grid; without one, the learned `no_mask_embed` is broadcast.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    #: Point labels with a learned embedding: 0 background, 1 foreground (SAM 2 adds the box
    #: corners, 2 and 3). Padding points are labelled -1.
    point_labels = 2

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, C, 64, 64)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box the decoder was trained to see one extra padding point.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        for label in range(self.point_labels):
            embedding = embedding + torch.where(labels == label, self.point_embeddings[label].weight, 0.0)
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )
        return embedding + corner_embed

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points: ((B, N, 2) xy input frame, (B, N) labels); boxes: (B, 4) xyxy input frame;
        masks: (B, 1, 256, 256) logits. Returns sparse (B, N', C) and dense (B, C, 64, 64)."""
        batch = self._batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        dtype = self.point_embeddings[0].weight.dtype
        sparse = [torch.empty((batch, 0, self.embed_dim), device=device, dtype=dtype)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self.mask_downscaling(masks)
        else:
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse_embeddings, dense_embeddings
