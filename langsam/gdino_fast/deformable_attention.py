"""Multi-scale deformable attention (Deformable DETR) as one weighted gather.

transformers' pure-PyTorch path calls ``grid_sample`` once per feature level, stacks the
``(B*H, D, Q, L*P)`` samples, multiplies them by the attention weights and sums. For the
Grounding DINO encoder (20k queries at 800x1200 input) that materialises ~330 MB per layer and
reads it three times. Here every bilinear corner of every sampling point of every level becomes
one entry of a bag whose weight is ``attention weight x bilinear weight``, and
``torch.nn.functional.embedding_bag(mode="sum")`` sums the value rows of each bag without
materialising the samples. Runs on CPU and CUDA, no custom build.

``grid_sample``'s zero padding comes from padding each level's map with zeros (1 pixel before,
2 after, in both directions) and clamping coordinates into the padded frame: a corner outside
the map then reads a zero, and a point entirely outside reads only zeros.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["deformable_attention_pixels", "multi_scale_deformable_attention"]

# On CPU, queries go in chunks of at most this many sampling points (queries x heads x levels x
# points; ~70 bytes of temporaries each, so ~300 MB at most). The Grounding DINO encoder at
# 800 x 1333 samples ~2.7M points per layer: one chunk, as few (parallel) ops as possible.
_CPU_CHUNK_POINTS = 1 << 22


def multi_scale_deformable_attention(value: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                                     sampling_locations: Tensor, attention_weights: Tensor,
                                     chunk_queries: int | None = None) -> Tensor:
    """Sample ``value`` bilinearly at ``sampling_locations`` and sum with ``attention_weights``.

    Same result as transformers' ``MultiScaleDeformableAttention`` (``grid_sample`` with
    ``align_corners=False`` and zero padding), up to float rounding. ``value`` must be finite
    (a corner outside the map contributes ``0 * value``).

    Args:
        value: ``(B, S, H, D)``: the flattened feature maps of all levels, level after level,
            row-major (``S = sum(h * w)``), split into ``H`` heads of ``D`` channels.
        spatial_shapes: ``L`` pairs ``(height, width)``, one per level, in the order of ``value``.
        sampling_locations: ``(B, Q, H, L, P, 2)`` normalised ``(x, y)`` in each level's map:
            0 is the left/top edge of the first pixel, 1 the right/bottom edge of the last.
            Points partly or fully outside sample zeros there.
        attention_weights: ``(B, Q, H, L, P)``.
        chunk_queries: queries per step (bounds memory; the result is the same). Default: all
            at once on GPU, about four million sampling points per step on CPU.

    Returns:
        ``(B, Q, H * D)``: per query, the heads' weighted samples side by side.
    """
    batch, length, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {levels} sampling levels")
    if sum(h * w for h, w in spatial_shapes) != length:
        raise ValueError(f"spatial shapes cover {sum(h * w for h, w in spatial_shapes)} positions, value has {length}")
    # Pixel coordinates as grid_sample computes them (align_corners=False): loc * size - 0.5, in
    # at least float32 (in half precision a 150-pixel-wide map is addressed in 1/8-pixel steps).
    locations = sampling_locations.to(torch.promote_types(sampling_locations.dtype, torch.float32))
    sizes = torch.tensor(spatial_shapes, device=value.device, dtype=locations.dtype)  # (L, 2): h, w
    pixel_x = locations[..., 0] * sizes[:, 1, None] - 0.5
    pixel_y = locations[..., 1] * sizes[:, 0, None] - 0.5
    return deformable_attention_pixels(value, spatial_shapes, pixel_x, pixel_y, attention_weights, chunk_queries)


def deformable_attention_pixels(value: Tensor, spatial_shapes: Sequence[tuple[int, int]], pixel_x: Tensor,
                                pixel_y: Tensor, attention_weights: Tensor, chunk_queries: int | None = None) -> Tensor:
    """:func:`multi_scale_deformable_attention` with the sampling points already in pixels.

    pixel_x, pixel_y: ``(B, Q, H, L, P)`` coordinates in each level's map, pixel centres at
    integers (``0`` = the first pixel's centre; ``-0.5`` its left/top edge).
    """
    batch, _, heads, channels = value.shape
    queries, levels, points = pixel_x.shape[1], pixel_x.shape[3], pixel_x.shape[4]
    table, geometry = _padded_table(value, spatial_shapes)
    if chunk_queries is None:
        on_cpu = value.device.type == "cpu"
        chunk_queries = _CPU_CHUNK_POINTS // (batch * heads * levels * points) if on_cpu else queries
    chunk_queries = max(1, chunk_queries)
    if chunk_queries >= queries:
        return _sample(table, geometry, pixel_x, pixel_y, attention_weights)
    output = value.new_empty(batch, queries, heads * channels)
    for start in range(0, queries, chunk_queries):
        stop = min(start + chunk_queries, queries)
        output[:, start:stop] = _sample(table, geometry, pixel_x[:, start:stop], pixel_y[:, start:stop],
                                        attention_weights[:, start:stop])
    return output


def _padded_table(value: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, dict]:
    """Each level's map zero-padded by 1 pixel before and 2 after (both axes), all levels
    flattened head-major into one ``(B * H * S_padded, D)`` table (horizontal neighbours are
    neighbouring rows), plus the index arithmetic for it."""
    batch, _, heads, channels = value.shape
    device = value.device
    padded_length = sum((height + 3) * (width + 3) for height, width in spatial_shapes)
    if batch * heads * padded_length >= 2**31:
        raise ValueError(f"value has {batch * heads * padded_length} rows; at most 2**31 - 1 are supported")
    table = value.new_zeros(batch, heads, padded_length, channels)
    starts, start, offset = [], 0, 0
    for height, width in spatial_shapes:
        interior = table[:, :, start:start + (height + 3) * (width + 3)]
        interior = interior.view(batch, heads, height + 3, width + 3, channels)
        level = value[:, offset:offset + height * width].view(batch, height, width, heads, channels)
        interior[:, :, 1:height + 1, 1:width + 1] = level.permute(0, 3, 1, 2, 4)
        starts.append(start)
        start += (height + 3) * (width + 3)
        offset += height * width
    levels = len(spatial_shapes)
    sizes = torch.tensor(spatial_shapes, device=device)  # (L, 2) as (height, width)
    # Row of the table for (batch b, head h, padded position s) is (b * H + h) * S_padded + s.
    base = torch.arange(batch * heads, device=device, dtype=torch.int32).view(batch, 1, heads, 1, 1) * padded_length
    base = base + torch.tensor(starts, device=device, dtype=torch.int32).view(levels, 1)  # (B, 1, H, L, 1)
    geometry = {
        "width": sizes[:, 1].view(levels, 1),
        "height": sizes[:, 0].view(levels, 1),
        "row_step": (sizes[:, 1] + 3).to(torch.int32).view(levels, 1),
        "base": base,
    }
    return table.view(-1, channels), geometry


def _axis(pixel: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel coordinates along one axis -> (padded first pixel, its weight, next pixel's weight).

    Clamped into the padded frame, where -1 and ``size`` are pads: a point beyond reads zeros only.
    """
    pixel = torch.clamp(pixel, min=-1)
    pixel = torch.minimum(pixel, size.to(pixel.dtype))
    first = torch.floor(pixel)
    after = pixel.sub_(first)
    return first.to(torch.int32).add_(1), 1 - after, after


def _sample(table: Tensor, geometry: dict, pixel_x: Tensor, pixel_y: Tensor, attention_weights: Tensor) -> Tensor:
    batch, queries, heads, levels, points = pixel_x.shape
    # Coordinates and weights in at least float32: in half precision a 150-pixel-wide map would
    # be addressed in steps of 1/8 pixel.
    dtype = torch.promote_types(pixel_x.dtype, torch.float32)
    column, left, right = _axis(pixel_x.to(dtype), geometry["width"])  # each (B, Q, H, L, P)
    row, top, bottom = _axis(pixel_y.to(dtype), geometry["height"])
    top.mul_(attention_weights)
    bottom.mul_(attention_weights)
    # One bag per (b, q, h): its 4 corners x L levels x P points, corner-major.
    index = torch.empty((batch, queries, heads, 4, levels, points), dtype=torch.int32, device=table.device)
    top_left = torch.addcmul(geometry["base"], row, geometry["row_step"], out=index[:, :, :, 0]).add_(column)
    torch.add(top_left, 1, out=index[:, :, :, 1])
    torch.add(top_left, geometry["row_step"], out=index[:, :, :, 2])
    torch.add(index[:, :, :, 2], 1, out=index[:, :, :, 3])
    weights = torch.empty((batch, queries, heads, 4, levels, points), dtype=table.dtype, device=table.device)
    for corner, (vertical, horizontal) in enumerate(((top, left), (top, right), (bottom, left), (bottom, right))):
        torch.mul(vertical, horizontal, out=weights[:, :, :, corner])
    bag = 4 * levels * points
    output = F.embedding_bag(index.view(-1, bag), table, per_sample_weights=weights.view(-1, bag), mode="sum")
    return output.view(batch, queries, heads * table.shape[1])
