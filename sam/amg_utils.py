"""Building blocks of the automatic mask generator.

Point grids, crop boxes, stability scores, mask boxes, exact and memory-bounded
upscaling of low-res logits, run-length encoding and small-region cleanup.

Masks travel between stages as *uncompressed RLE* in the COCO layout:
``{"size": [H, W], "counts": int64 array}``, where the counts alternate runs of
0 and 1 over the mask flattened in column-major (Fortran) order, starting with
a (possibly empty) run of zeros. Everything that needs the whole mask (area,
box, connected components) is computed from the runs, so no full-resolution
mask is kept alive between stages.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "masks_to_rle",
    "count_above",
    "threshold_to_rle",
    "remove_small_regions",
    "remove_small_regions_rle",
    "rle_to_box",
    "rle_to_mask",
    "to_sa1b_record",
    "uncrop_boxes_xyxy",
    "uncrop_points",
    "upscale_mask_logits",
]


# --------------------------------------------------------------------------- container


class MaskData:
    """Parallel per-mask columns (tensors, arrays or lists) that are filtered and
    concatenated together, so a long pipeline stays a sequence of small steps."""

    def __init__(self, **columns: Any) -> None:
        self._columns: dict[str, Any] = {}
        for name, column in columns.items():
            self[name] = column

    def __setitem__(self, name: str, column: Any) -> None:
        if not isinstance(column, (list, np.ndarray, torch.Tensor)):
            raise TypeError(f"MaskData column {name!r} must be a list, array or tensor, got {type(column)}")
        self._columns[name] = column

    def __getitem__(self, name: str) -> Any:
        return self._columns[name]

    def __delitem__(self, name: str) -> None:
        del self._columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self._columns

    def __len__(self) -> int:
        for column in self._columns.values():
            return len(column)
        return 0

    def keys(self) -> Iterable[str]:
        return self._columns.keys()

    def filter(self, keep: torch.Tensor | np.ndarray) -> None:
        """Keep rows selected by a boolean mask or an index array, in that order."""
        keep_np = keep.detach().cpu().numpy() if isinstance(keep, torch.Tensor) else np.asarray(keep)
        if keep_np.dtype == bool:
            keep_np = np.flatnonzero(keep_np)
        for name, column in self._columns.items():
            if isinstance(column, torch.Tensor):
                self._columns[name] = column[torch.as_tensor(keep_np, dtype=torch.long, device=column.device)]
            elif isinstance(column, np.ndarray):
                self._columns[name] = column[keep_np]
            else:
                self._columns[name] = [column[i] for i in keep_np.tolist()]

    def cat(self, other: "MaskData") -> None:
        """Append the rows of ``other`` (which must have the same columns, or one side is empty)."""
        if not other._columns:
            return
        if not self._columns:
            self._columns = dict(other._columns)
            return
        if set(self._columns) != set(other._columns):
            raise ValueError(
                f"cannot concatenate MaskData with columns {sorted(self._columns)} and {sorted(other._columns)}"
            )
        for name, column in other._columns.items():
            mine = self._columns[name]
            if isinstance(mine, torch.Tensor):
                self._columns[name] = torch.cat([mine, column.to(mine.device)], dim=0)
            elif isinstance(mine, np.ndarray):
                self._columns[name] = np.concatenate([mine, column], axis=0)
            else:
                self._columns[name] = mine + list(column)

    def to_numpy(self) -> None:
        for name, column in self._columns.items():
            if isinstance(column, torch.Tensor):
                self._columns[name] = column.detach().cpu().numpy()


def batch_iterator(batch_size: int, *arrays: Sequence[Any]) -> Iterator[list[Any]]:
    """Yield aligned slices of length ``batch_size`` (the last one may be shorter)."""
    if not arrays:
        raise ValueError("batch_iterator needs at least one array")
    length = len(arrays[0])
    if any(len(a) != length for a in arrays):
        raise ValueError("batch_iterator inputs must all have the same length")
    for start in range(0, length, batch_size):
        yield [a[start : start + batch_size] for a in arrays]


# --------------------------------------------------------------------------- grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n_per_side**2, 2) xy points, cell centres of a regular grid over [0, 1]^2, x fastest."""
    half_cell = 1.0 / (2 * n_per_side)
    centres = np.linspace(half_cell, 1.0 - half_cell, n_per_side)
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One normalised grid per crop layer; layer i has int(n_per_side / scale_per_layer**i) points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**layer))) for layer in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (xyxy, original-image pixels) and their layer index.

    Layer 0 is the whole image; layer i >= 1 tiles the image with (2**i)**2 crops
    that overlap by ``overlap_ratio`` of the short side (scaled down per layer).
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layer_idxs: list[int] = [0]
    for layer in range(1, n_layers + 1):
        crops_per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / crops_per_side))
        crop_w = math.ceil((overlap * (crops_per_side - 1) + im_w) / crops_per_side)
        crop_h = math.ceil((overlap * (crops_per_side - 1) + im_h) / crops_per_side)
        xs = [int((crop_w - overlap) * i) for i in range(crops_per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(crops_per_side)]
        # x-major order, the order the official generator visits crops in.
        for x0, y0 in product(xs, ys):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(layer)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """(..., 4) xyxy boxes in crop pixels -> original-image pixels."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """(..., 2) xy points in crop pixels -> original-image pixels."""
    return points + torch.tensor([crop_box[0], crop_box[1]], device=points.device)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """(N,) bool: the box (xyxy, crop pixels) lies within ``atol`` of a crop edge
    that is not also an edge of the original image (so the object was probably cut)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, image[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def box_xyxy_to_xywh(box_xyxy: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """(..., 4) xyxy -> xywh (w = x1 - x0, matching the official records)."""
    box = box_xyxy.clone() if isinstance(box_xyxy, torch.Tensor) else np.array(box_xyxy, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


# --------------------------------------------------------------------------- logits -> masks


def upscale_mask_logits(
    low_res_logits: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int = 1024,
) -> torch.Tensor:
    """Bit-identical to ``Sam.postprocess_masks`` (upscale to img_size x img_size,
    drop the padding, resize to the original size), but cheaper.

    low_res_logits: (N, C, h, w) decoder logits (h = w = 256 for SAM).
    Returns (N, C, *original_size) logits in the original-image frame.

    Bilinear output pixel (i, j) reads only source rows/cols near (i, j) / scale,
    so when img_size is an integer multiple of the low-res size we upscale only
    the source rows/cols the unpadded region needs (same indices and weights,
    hence the same floats), and skip the final resize when it is the identity.
    """
    low_h, low_w = low_res_logits.shape[-2:]
    in_h, in_w = input_size
    if img_size % low_h == 0 and img_size % low_w == 0:
        factor_h, factor_w = img_size // low_h, img_size // low_w

        def rows_needed(n_out: int, factor: int, n_src: int) -> int:
            # last source index read by output index n_out - 1, its right neighbour, and one
            # spare row in case float32 index arithmetic rounds up
            last = int(((n_out - 1) + 0.5) / factor - 0.5)
            return min(n_src, max(last, 0) + 3)

        keep_h = rows_needed(in_h, factor_h, low_h)
        keep_w = rows_needed(in_w, factor_w, low_w)
        source = low_res_logits[..., :keep_h, :keep_w]
        upscaled = F.interpolate(
            source, (keep_h * factor_h, keep_w * factor_w), mode="bilinear", align_corners=False
        )
    else:
        upscaled = F.interpolate(low_res_logits, (img_size, img_size), mode="bilinear", align_corners=False)
    upscaled = upscaled[..., :in_h, :in_w]
    if (in_h, in_w) == tuple(original_size):
        return upscaled  # bilinear resize to the same size is the identity
    return F.interpolate(upscaled, tuple(original_size), mode="bilinear", align_corners=False)


def calculate_stability_score(logits: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """(N, H, W) logits -> (N,) IoU of the masks thresholded at mask_threshold + offset and
    mask_threshold - offset. The first is inside the second, so the IoU is a ratio of pixel
    counts (0/0 gives NaN, as upstream)."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, H, W), got shape {tuple(logits.shape)}")
    inner = count_above(logits, mask_threshold + threshold_offset)
    outer = count_above(logits, mask_threshold - threshold_offset)
    return inner / outer


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., 4) int64 xyxy with inclusive x1/y1; [0, 0, 0, 0] for empty masks."""
    height, width = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.long, device=masks.device)
    rows = masks.any(dim=-1).to(torch.uint8)  # (..., H)
    cols = masks.any(dim=-2).to(torch.uint8)  # (..., W)
    top = rows.argmax(dim=-1)
    bottom = height - 1 - rows.flip(-1).argmax(dim=-1)
    left = cols.argmax(dim=-1)
    right = width - 1 - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.bool().any(dim=-1)
    return boxes.masked_fill(empty[..., None], 0)


# --------------------------------------------------------------------------- run-length encoding


def masks_to_rle(
    masks: torch.Tensor,
    crop_box: Sequence[int] | None = None,
    original_size: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """(N, h, w) bool masks in a crop -> N uncompressed RLEs of the original image.

    crop_box: xyxy of the crop in the original image (default: the whole mask).
    original_size: (H, W) of the original image (default: the mask size).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    column_major = _padded_column_major(masks.shape, device=masks.device)
    column_major[:, :, 1:-1] = masks.bool().transpose(1, 2)
    return _encode_column_major(column_major, crop_box, original_size)[0]


def threshold_to_rle(
    logits: torch.Tensor,
    threshold: float,
    crop_box: Sequence[int] | None = None,
    original_size: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """(N, h, w) logits in a crop -> RLEs of ``logits > threshold`` in the original image and
    their (N, 4) int64 xyxy boxes in crop pixels (as :func:`batched_mask_to_box`, on CPU).

    The comparison writes straight into the column-major layout the RLE needs, and boxes
    come from the runs, so each mask is read once and never reduced along both axes.
    """
    column_major = _padded_column_major(logits.shape, device=logits.device)
    torch.gt(logits.transpose(1, 2), threshold, out=column_major[:, :, 1:-1])
    return _encode_column_major(column_major, crop_box, original_size)


def _padded_column_major(shape: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    n, h, w = shape
    # A zero row above and below every column, so no run wraps into the next column.
    return torch.zeros((n, w, h + 2), dtype=torch.bool, device=device)


def _encode_column_major(
    column_major: torch.Tensor,
    crop_box: Sequence[int] | None,
    original_size: tuple[int, int] | None,
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """(N, w, h + 2) bool, columns of the crop masks between zero rows -> (RLEs, crop boxes)."""
    n, w, padded_h = column_major.shape
    h = padded_h - 2
    H, W = original_size if original_size is not None else (h, w)
    x0, y0 = (int(crop_box[0]), int(crop_box[1])) if crop_box is not None else (0, 0)
    if x0 + w > W or y0 + h > H:
        raise ValueError(f"a {h}x{w} crop at ({x0}, {y0}) does not fit in a {H}x{W} image")
    boxes = np.zeros((n, 4), dtype=np.int64)
    if n == 0:
        return [], torch.from_numpy(boxes)
    flat = column_major.view(n, -1)
    mask_idx, position = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    mask_idx = mask_idx.cpu().numpy()
    column, padded_row = np.divmod(position.cpu().numpy() + 1, padded_h)  # first pixel of each new run
    row = padded_row - 1
    per_mask = np.bincount(mask_idx, minlength=n)
    first = np.cumsum(per_mask) - per_mask
    # Boundaries alternate run start / run end within each mask; a run end is the row after
    # the run, in the same column (the zero padding guarantees that).
    nonempty = np.flatnonzero(per_mask)
    if len(nonempty):
        is_start = (np.arange(len(row)) - first[mask_idx]) % 2 == 0
        starts = np.flatnonzero(is_start)
        ends = np.flatnonzero(~is_start)
        boxes[nonempty, 0] = column[first[nonempty]]
        boxes[nonempty, 2] = column[first[nonempty] + per_mask[nonempty] - 1]
        boxes[nonempty, 1] = np.minimum.reduceat(row[starts], first[nonempty] // 2)
        boxes[nonempty, 3] = np.maximum.reduceat(row[ends], first[nonempty] // 2) - 1

    boundaries = (column + x0) * H + (row + y0)
    # A run ending at the bottom of one column and one starting at the top of the next meet
    # in the full image when the crop spans its height: drop both boundaries.
    meet = (boundaries[1:] == boundaries[:-1]) & (mask_idx[1:] == mask_idx[:-1])
    drop = np.zeros(len(boundaries), dtype=bool)
    drop[:-1] |= meet
    drop[1:] |= meet
    boundaries, mask_idx = boundaries[~drop], mask_idx[~drop]
    split_at = np.cumsum(np.bincount(mask_idx, minlength=n))[:-1]
    rles = [{"size": [H, W], "counts": _boundaries_to_counts(b, H * W)} for b in np.split(boundaries, split_at)]
    return rles, torch.from_numpy(boxes)


def count_above(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, H, W) -> (N,) int32 number of pixels with logit > threshold (compared in the
    logits' dtype). On CPU numpy's popcount-based count is several times faster than a torch
    reduction over booleans."""
    if logits.device.type != "cpu":
        return (logits > threshold).sum(dim=(-2, -1), dtype=torch.int32)
    values = logits.detach().numpy()
    scalar = values.dtype.type(threshold)
    counts = [np.count_nonzero(np.greater(plane, scalar)) for plane in values]
    return torch.tensor(counts, dtype=torch.int32)


def mask_to_rle(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """(H, W) bool mask -> uncompressed RLE."""
    return masks_to_rle(torch.as_tensor(np.asarray(mask, dtype=bool))[None])[0]


def _boundaries_to_counts(boundaries: np.ndarray, total: int) -> np.ndarray:
    """Sorted run boundaries (starts of 1-runs, starts of 0-runs, ...) -> counts."""
    if len(boundaries) and boundaries[-1] == total:
        boundaries = boundaries[:-1]  # the last 1-run ends at the last pixel
    edges = np.concatenate([[0], boundaries, [total]]).astype(np.int64)
    return np.diff(edges)


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed or COCO (compressed) RLE -> (H, W) bool mask."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as mask_utils

        coco = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(coco).astype(bool)
    counts = np.asarray(counts, dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != height * width:
        raise ValueError(f"RLE counts sum to {flat.size} but size is {height}x{width}")
    return flat.reshape(width, height).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    return int(np.asarray(rle["counts"], dtype=np.int64)[1::2].sum())


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    height, width = rle["size"]
    counts = np.asarray(rle["counts"]).tolist()
    coco = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [int(height), int(width)], "counts": coco["counts"].decode("ascii")}


def _column_runs(counts: np.ndarray, height: int, value: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of ``value`` split at column boundaries: (column, start_row, end_row) with end exclusive,
    sorted by column then row."""
    edges = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    starts, ends = edges[value:-1:2], edges[value + 1 :: 2]
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    first_col, last_col = starts // height, (ends - 1) // height
    pieces = last_col - first_col + 1
    run = np.repeat(np.arange(len(starts)), pieces)
    offset = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    column = first_col[run] + offset
    start_row = np.where(offset == 0, starts[run] - column * height, 0)
    end_row = np.where(column == last_col[run], ends[run] - column * height, height)
    return column, start_row, end_row


def _label_column_runs(column: np.ndarray, start: np.ndarray, end: np.ndarray, height: int) -> np.ndarray:
    """8-connected component id (a representative run index) of every column run."""
    n_runs = len(column)
    parent = np.arange(n_runs)
    if n_runs == 0:
        return parent
    # Runs in columns c and c+1 touch (8-connectivity) iff s2 <= e1 and s1 <= e2.
    # Keys are monotone over the sorted runs, so the partners of each run form a
    # contiguous range [lo, hi) found by binary search.
    stride = height + 2
    start_key = column * stride + start
    end_key = column * stride + end
    lo = np.searchsorted(end_key, (column + 1) * stride + start, side="left")
    hi = np.searchsorted(start_key, (column + 1) * stride + end, side="right")
    n_partners = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(n_runs), n_partners)
    dst = np.repeat(lo, n_partners) + (np.arange(len(src)) - np.repeat(np.cumsum(n_partners) - n_partners, n_partners))
    # Union-find by repeated hooking of roots onto the smaller root + pointer jumping.
    while len(src):
        root_src, root_dst = parent[src], parent[dst]
        differ = root_src != root_dst
        if not differ.any():
            break
        smaller = np.minimum(root_src[differ], root_dst[differ])
        np.minimum.at(parent, root_src[differ], smaller)
        np.minimum.at(parent, root_dst[differ], smaller)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _runs_to_counts(column: np.ndarray, start: np.ndarray, end: np.ndarray, height: int, total: int) -> np.ndarray:
    """Disjoint column runs of ones (any order) -> uncompressed RLE counts."""
    flat_start = column * height + start
    order = np.argsort(flat_start, kind="stable")
    flat_start = flat_start[order]
    flat_end = (column * height + end)[order]
    boundaries = np.stack([flat_start, flat_end], axis=1).ravel()
    meet = np.flatnonzero(flat_start[1:] == flat_end[:-1])  # contiguous runs: merge
    if len(meet):
        boundaries = np.delete(boundaries, np.concatenate([2 * meet + 1, 2 * meet + 2]))
    return _boundaries_to_counts(boundaries, total)


def remove_small_regions_rle(rle: dict[str, Any], area_thresh: float, mode: str) -> tuple[dict[str, Any], bool]:
    """Fill holes (mode="holes") or drop islands (mode="islands") smaller than
    ``area_thresh`` pixels, on an uncompressed RLE. Components are 8-connected;
    a hole is any 8-connected background region, including ones touching the
    border. If every island is small, the largest one is kept (ties: the one
    whose first pixel comes first in row-major order). Returns (rle, changed)."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    value = 0 if mode == "holes" else 1
    column, start, end = _column_runs(counts, height, value)
    component = _label_column_runs(column, start, end, height)
    sizes = np.bincount(component, weights=end - start, minlength=len(component))
    roots = np.flatnonzero(component == np.arange(len(component)))
    small_roots = roots[sizes[roots] < area_thresh]
    if len(small_roots) == 0:
        return rle, False
    small = np.isin(component, small_roots)
    if mode == "holes":
        ones = _column_runs(counts, height, 1)
        merged = [np.concatenate([ones[i], (column, start, end)[i][small]]) for i in range(3)]
        new_counts = _runs_to_counts(*merged, height, height * width)
    else:
        keep = ~small
        if not keep.any():
            # Every island is small: keep the largest, first in row-major order on ties.
            first_pixel = np.full(len(component), np.iinfo(np.int64).max)
            np.minimum.at(first_pixel, component, start * width + column)
            largest = roots[sizes[roots] == sizes[roots].max()]
            keep = component == largest[np.argmin(first_pixel[largest])]
        new_counts = _runs_to_counts(column[keep], start[keep], end[keep], height, height * width)
    return {"size": [height, width], "counts": new_counts}, True


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """(H, W) bool mask version of :func:`remove_small_regions_rle`."""
    new_rle, changed = remove_small_regions_rle(mask_to_rle(mask), area_thresh, mode)
    return (rle_to_mask(new_rle) if changed else np.asarray(mask, dtype=bool)), changed


def rle_to_box(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (4,) int64 xyxy with inclusive x1/y1; zeros for an empty mask."""
    height = rle["size"][0]
    column, start, end = _column_runs(np.asarray(rle["counts"], dtype=np.int64), height, 1)
    if len(column) == 0:
        return np.zeros(4, dtype=np.int64)
    return np.array([column[0], start.min(), column[-1], end.max() - 1], dtype=np.int64)


# --------------------------------------------------------------------------- SA-1B export


def to_sa1b_record(image_info: dict[str, Any], masks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """SA-1B style JSON object for one image.

    image_info: {"file_name": str, "height": int, "width": int} (extra keys, such as
        "image_id", are kept).
    masks: records from ``SamAutomaticMaskGenerator.generate`` in any output_mode.
    Returns {"image": {...}, "annotations": [{"id", "segmentation" (COCO RLE with str
    counts), "bbox" (XYWH), "area", "predicted_iou", "stability_score",
    "point_coords", "crop_box" (XYWH)}]}, with plain Python numbers only.
    """
    missing = [key for key in ("file_name", "height", "width") if key not in image_info]
    if missing:
        raise ValueError(f"image_info is missing {', '.join(missing)}")
    height, width = int(image_info["height"]), int(image_info["width"])
    annotations = []
    for ann_id, record in enumerate(masks, start=1):
        segmentation = _to_coco_rle(record["segmentation"])
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(
                f"mask {ann_id} is {segmentation['size'][0]}x{segmentation['size'][1]} "
                f"but the image is {height}x{width}"
            )
        annotations.append(
            {
                "id": ann_id,
                "segmentation": segmentation,
                "bbox": [float(v) for v in record["bbox"]],
                "area": int(record["area"]),
                "predicted_iou": float(record["predicted_iou"]),
                "stability_score": float(record["stability_score"]),
                "point_coords": [[float(x), float(y)] for x, y in record["point_coords"]],
                "crop_box": [float(v) for v in record["crop_box"]],
            }
        )
    image = dict(image_info)
    image.update(file_name=str(image_info["file_name"]), height=height, width=width)
    return {"image": image, "annotations": annotations}


def _to_coco_rle(segmentation: Any) -> dict[str, Any]:
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, bytes):
            return {"size": [int(s) for s in segmentation["size"]], "counts": counts.decode("ascii")}
        if isinstance(counts, str):
            return {"size": [int(s) for s in segmentation["size"]], "counts": counts}
        return coco_encode_rle(segmentation)
    mask = np.asarray(segmentation)
    if mask.ndim != 2:
        raise ValueError(f"a binary mask segmentation must be (H, W), got shape {mask.shape}")
    from pycocotools import mask as mask_utils

    coco = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in coco["size"]], "counts": coco["counts"].decode("ascii")}
