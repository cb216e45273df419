"""FPN neck of the SAM 2 image encoder, its sine position encoding, and the trunk + neck wrapper.

The neck projects each Hiera stage to `d_model` channels with a 1x1 convolution. Only the
levels in `fpn_top_down_levels` (the two coarsest in every official config) also receive the
2x-upsampled level below them; the two fine levels stay purely lateral, and after `scalp`
drops the coarsest level the image path keeps strides 4, 8 and 16.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import Hiera


class PositionEmbeddingSine(nn.Module):
    """The DETR sine/cosine encoding of (y, x) on a grid, normalised to (0, 2*pi].

    Output (B, num_pos_feats, H, W): the first half of the channels encode y, the second x;
    within each half, even channels are sines and odd channels cosines. No parameters; grids
    are cached per (H, W, device).
    """

    def __init__(
        self, num_pos_feats: int, temperature: float = 10000, normalize: bool = True, scale: float | None = None
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError("PositionEmbeddingSine needs an even number of channels")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple, torch.Tensor] = {}

    def _axis(self, length: int, device: torch.device) -> torch.Tensor:
        """(length, num_pos_feats) interleaved sin/cos encoding of positions 1..length."""
        positions = torch.arange(1, length + 1, dtype=torch.float32, device=device)
        if self.normalize:
            positions = positions / (positions[-1:] + 1e-6) * self.scale
        index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        frequencies = self.temperature ** (2 * (index // 2) / self.num_pos_feats)
        angles = positions[:, None] / frequencies
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    def grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(num_pos_feats * 2, H, W) float32 encoding, cached."""
        key = (height, width, device)
        if key not in self._cache:
            along_y = self._axis(height, device)  # (H, F)
            along_x = self._axis(width, device)  # (W, F)
            channels = along_y.shape[1]
            encoding = torch.cat(
                [
                    along_y.t()[:, :, None].expand(channels, height, width),
                    along_x.t()[:, None, :].expand(channels, height, width),
                ]
            )
            self._cache[key] = encoding.contiguous()
        return self._cache[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) (only its shape and device are used) -> (B, num_pos_feats, H, W)."""
        grid = self.grid(x.shape[-2], x.shape[-1], x.device)
        return grid[None].expand(x.shape[0], -1, -1, -1)


class FpnNeck(nn.Module):
    """Lateral 1x1 convs (`convs.i.conv`, i = 0 for the coarsest level) plus top-down sums."""

    def __init__(
        self,
        d_model: int,
        backbone_channel_list: Sequence[int],
        position_encoding: nn.Module | None = None,
        fpn_top_down_levels: Sequence[int] | None = None,
        fpn_interp_model: str = "bilinear",
        fuse_type: str = "sum",
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', not {fuse_type!r}")
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.position_encoding = position_encoding or PositionEmbeddingSine(d_model)
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, d_model, kernel_size=1)))
            for channels in self.backbone_channel_list
        )
        levels = len(self.convs)
        self.fpn_top_down_levels = list(range(levels) if fpn_top_down_levels is None else fpn_top_down_levels)
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type

    def lateral(self, level: int) -> nn.Conv2d:
        """The 1x1 conv of feature level `level` (0 = highest resolution)."""
        return self.convs[len(self.convs) - 1 - level].conv

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """2x upsampling of a (B, C, H, W) map, as the reference does it (computed in float32)."""
        align = None if self.fpn_interp_model == "nearest" else False
        upsampled = F.interpolate(
            x.float(), scale_factor=2.0, mode=self.fpn_interp_model, align_corners=align, antialias=False
        )
        return upsampled.to(x.dtype)

    def forward(
        self, features: Sequence[torch.Tensor], with_position: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """features: trunk maps (B, C_i, H_i, W_i), highest resolution first.

        Returns the FPN maps (B, d_model, H_i, W_i) in the same order and, if asked, their
        position encodings.
        """
        if len(features) != len(self.convs):
            raise ValueError(f"the neck expects {len(self.convs)} feature maps, got {len(features)}")
        outputs: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
        previous = None
        for level in range(len(features) - 1, -1, -1):
            lateral = self.lateral(level)(features[level])
            if level in self.fpn_top_down_levels and previous is not None:
                lateral = lateral + self.upsample(previous)
                if self.fuse_type == "avg":
                    lateral = lateral / 2
            previous = lateral
            outputs[level] = lateral
        if not with_position:
            return outputs, None
        return outputs, [self.position_encoding(x).to(x.dtype) for x in outputs]


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck (`image_encoder.trunk.*`, `image_encoder.neck.*`)."""

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk widths {trunk.channel_list} do not match the neck's {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, pixels: torch.Tensor, with_position: bool = True) -> dict:
        """pixels: (B, 3, 1024, 1024) normalised. Returns, like the reference:
        "backbone_fpn": FPN maps at strides 4, 8, 16 (the coarsest `scalp` levels dropped),
        "vision_pos_enc": their sine encodings (None without `with_position`),
        "vision_features": the stride-16 map (B, d_model, 64, 64)."""
        features, positions = self.neck(self.trunk(pixels), with_position=with_position)
        if self.scalp > 0:
            features = features[: -self.scalp]
            positions = positions[: -self.scalp] if positions is not None else None
        return {"vision_features": features[-1], "vision_pos_enc": positions, "backbone_fpn": features}
