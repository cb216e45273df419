"""Automatic mask generation: prompt SAM with a grid of points and keep the good, distinct masks.

The result matches Meta's ``SamAutomaticMaskGenerator`` on the same weights, while keeping
memory bounded: masks are filtered by predicted IoU *before* they are upscaled, upscaled in
chunks of at most ``mask_chunk_bytes``, and carried as run-length encodings from then on.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

from .amg_utils import (
    MaskData,
    area_from_rle,
    batch_iterator,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions_rle,
    rle_to_box,
    rle_to_mask,
    threshold_to_rle,
    uncrop_boxes_xyxy,
    uncrop_points,
    upscale_mask_logits,
)
from .image import to_rgb_uint8
from .predictor import SamPredictor

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
DEFAULT_MASK_CHUNK_BYTES = 256 * 2**20


class SamAutomaticMaskGenerator:
    """Masks for everything in an image, from a grid of single-point prompts.

    Parameters keep the official names, defaults and meaning:

    model: a ``Sam`` (wrapped in a ``SamPredictor`` built with ``device``/``dtype``) or a
        ready ``SamPredictor`` (then ``device``/``dtype`` must be None).
    points_per_side: points along each side of the grid (points_per_side**2 prompts on the
        full image); None when ``point_grids`` is given.
    points_per_batch: points decoded together; larger is faster and uses more memory.
    pred_iou_thresh: keep masks whose predicted IoU is > this (0 disables the filter).
    stability_score_thresh: keep masks whose stability score is >= this (0 disables it).
    stability_score_offset: logit offset for the stability score, the IoU between the mask
        thresholded at mask_threshold + offset and at mask_threshold - offset.
    box_nms_thresh: box IoU above which masks of the same crop are duplicates.
    crop_n_layers: extra layers of crops; layer i tiles the image with (2**i)**2 crops.
    crop_nms_thresh: box IoU above which masks from different crops are duplicates (masks
        from smaller crops win).
    crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the short image side
        in layer 1 (scaled down in deeper layers).
    crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points per side.
    point_grids: explicit (N, 2) xy grids in [0, 1], one per crop layer.
    min_mask_region_area: if > 0, fill holes and drop islands smaller than this many pixels,
        then rerun NMS (unchanged masks win).
    output_mode: "binary_mask" ((H, W) bool arrays), "uncompressed_rle" or "coco_rle"
        (pycocotools RLE with str counts). Prefer an RLE mode for large images.
    mask_chunk_bytes: memory budget for full-resolution logits upscaled at once (not an
        official parameter; it changes speed and peak memory, never the output).
    mask_threshold, use_m2m, multimask_output: SAM 2's generator settings (keyword-only
        here; see `Sam2AutomaticMaskGenerator`): the logit threshold of a mask (None: the
        model's, 0.0), a second decode of each mask with its own logits as the mask prompt,
        and 3 candidate masks per point (False: one).
    """

    def __init__(
        self,
        model: Any,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        mask_chunk_bytes: int = DEFAULT_MASK_CHUNK_BYTES,
        mask_threshold: float | None = None,
        use_m2m: bool = False,
        multimask_output: bool = True,
    ) -> None:
        if isinstance(model, SamPredictor):
            if device is not None or dtype is not None:
                raise ValueError("pass device/dtype when building the SamPredictor, not with one")
            self.predictor = model
        elif isinstance(model, torch.nn.Module) and hasattr(model, "encode_image") and hasattr(model, "decode"):
            self.predictor = SamPredictor(model, device=device, dtype=dtype)
        else:
            raise ValueError(
                f"model must be a sam.Sam or sam.Sam2 model or a sam.SamPredictor, got {type(model).__name__}"
            )
        if mask_threshold is None:
            mask_threshold = self.predictor.model.mask_threshold
        if not isinstance(mask_threshold, (int, float)) or not math.isfinite(mask_threshold):
            raise ValueError(f"mask_threshold must be a finite number, got {mask_threshold!r}")
        for name, value in (("use_m2m", use_m2m), ("multimask_output", multimask_output)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")

        _check_int("points_per_batch", points_per_batch, minimum=1)
        _check_int("crop_n_layers", crop_n_layers, minimum=0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, minimum=1)
        _check_int("min_mask_region_area", min_mask_region_area, minimum=0)
        _check_int("mask_chunk_bytes", mask_chunk_bytes, minimum=1)
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("stability_score_offset", stability_score_offset),
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
        ):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= crop_overlap_ratio < 1.0:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio!r}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}")

        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if points_per_side is not None:
            _check_int("points_per_side", points_per_side, minimum=1)
            deepest = int(points_per_side / crop_n_points_downscale_factor**crop_n_layers)
            if deepest < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} leaves no points in crop layer {crop_n_layers} "
                    f"with crop_n_points_downscale_factor={crop_n_points_downscale_factor}"
                )
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [_check_grid(i, grid) for i, grid in enumerate(point_grids)]
            if len(self.point_grids) != crop_n_layers + 1:
                raise ValueError(
                    f"point_grids has {len(self.point_grids)} grids but crop_n_layers={crop_n_layers} "
                    f"needs {crop_n_layers + 1} (one per layer, the full image included)"
                )

        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.mask_chunk_bytes = mask_chunk_bytes
        self.mask_threshold = float(mask_threshold)
        self.use_m2m = use_m2m
        self.multimask_output = multimask_output

    # ----------------------------------------------------------------------- public
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an (H, W, 3) uint8 RGB image, as a list of records:

        segmentation: (H, W) bool array, or an RLE dict {"size": [H, W], "counts": ...}
            (list of ints for "uncompressed_rle", str for "coco_rle"), per ``output_mode``;
        area: int, pixels in the mask; bbox: [x, y, w, h] (w = x1 - x0 of the inclusive box);
        predicted_iou, stability_score: float; point_coords: [[x, y]], the prompt in
            original-image pixels; crop_box: [x, y, w, h] of the crop the mask came from.
        Records are ordered as the official generator orders them (by NMS score).
        """
        image = to_rgb_uint8(image)
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0 and len(data):
            data = self._postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return [self._record(data, i) for i in range(len(data))]

    # ----------------------------------------------------------------------- stages
    def _generate_masks(self, image: np.ndarray) -> MaskData:
        original_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(original_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx))
            logger.debug("crop %s (layer %d): %d masks so far", crop_box, layer_idx, len(data))

        if len(crop_boxes) > 1 and len(data):
            # Duplicates across crops: prefer masks from smaller crops.
            crop_scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(
                data["boxes"].float(),
                crop_scores,
                torch.zeros(len(data), dtype=torch.long),
                iou_threshold=self.crop_nms_thresh,
            )
            data.filter(keep)
        data.to_numpy()
        return data

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer_idx: int) -> MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)
        points_in_crop = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]

        data = MaskData()
        for (points,) in batch_iterator(self.points_per_batch, points_in_crop):
            data.cat(self._process_batch(points, crop_size, crop_box, image.shape[:2]))
        self.predictor.reset_image()
        if not len(data):
            return MaskData()

        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros(len(data), dtype=torch.long),
            iou_threshold=self.box_nms_thresh,
        )
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.long).repeat(len(data), 1)
        return data

    def _process_batch(
        self,
        points: np.ndarray,
        crop_size: tuple[int, int],
        crop_box: list[int],
        original_size: tuple[int, int],
    ) -> MaskData:
        """Decode (B, 2) xy points (crop pixels) and keep the masks that pass every filter."""
        if self.predictor.family == "sam2":
            points = points.astype(np.float32)  # SAM 2's generator works in float32 throughout
        low_res_logits, iou_preds = self._decode_points(points, crop_size, self.multimask_output)
        masks_per_point = low_res_logits.shape[1]
        points = np.repeat(points, masks_per_point, axis=0)
        low_res_logits, iou_preds = low_res_logits.flatten(0, 1), iou_preds.flatten(0, 1)
        if self.use_m2m:
            low_res_logits, iou_preds = self._refine_with_m2m(points, crop_size, low_res_logits)
        data = MaskData(
            low_res_logits=low_res_logits,
            iou_preds=iou_preds.cpu(),  # NMS and records work on CPU
            points=torch.as_tensor(points),
        )
        # Predicted IoU needs no upscaling, so filter before paying for it.
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)

        height, width = crop_size
        img_size = self.predictor.model.image_size
        # per mask: the model-frame upscale (float32), the crop-frame logits (float32), three
        # thresholded copies and the RLE scratch space (bool)
        bytes_per_mask = img_size * img_size * 4 + height * width * (4 + 3 + 2)
        chunk = max(1, self.mask_chunk_bytes // bytes_per_mask)
        kept = MaskData()
        for start in range(0, len(data), chunk):
            part = MaskData(**{name: data[name][start : start + chunk] for name in data.keys()})
            kept.cat(self._filter_and_encode(part, crop_size, crop_box, original_size))
        return kept

    def _decode_points(
        self, points: np.ndarray, crop_size: tuple[int, int], multimask_output: bool, mask_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) xy crop pixels -> low-res logits (B, C, 256, 256) and IoU predictions (B, C), float32.

        Low-res only: ``predict_torch`` would upscale all C*B masks to full resolution, most of
        which the IoU filter throws away. SAM 1 points stay float64 until the prompt encoder
        normalises them, as in the official generator.
        """
        device = self.predictor.device
        coords = torch.as_tensor(self.predictor.transform.apply_coords(points, crop_size), device=device)
        if points.dtype == np.float32:
            coords = coords.float()
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        return self.predictor.decode(coords[:, None, :], labels[:, None], mask_input=mask_input,
                                     multimask_output=multimask_output)

    def _refine_with_m2m(
        self, points: np.ndarray, crop_size: tuple[int, int], low_res_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's one-step refinement: decode each mask's point again with the mask's own
        (clamped) low-res logits as the mask prompt, single-mask output."""
        mask_prompts = low_res_logits.clamp(-32.0, 32.0)[:, None]
        refined, ious = [], []
        for start in range(0, len(points), self.points_per_batch):
            stop = start + self.points_per_batch
            logits, iou = self._decode_points(points[start:stop], crop_size, False, mask_prompts[start:stop])
            refined.append(logits[:, 0])
            ious.append(iou[:, 0])
        return torch.cat(refined), torch.cat(ious)

    def _filter_and_encode(
        self,
        data: MaskData,
        crop_size: tuple[int, int],
        crop_box: list[int],
        original_size: tuple[int, int],
    ) -> MaskData:
        """Upscale one chunk of low-res logits, apply the stability and crop-edge filters and
        replace the logits by boxes (crop pixels) and RLEs (original image). The RLE of a mask
        that the crop-edge filter then drops is wasted work, but boxes come from the runs."""
        model = self.predictor.model
        if self.predictor.family == "sam1":
            logits = upscale_mask_logits(
                data["low_res_logits"][:, None], self.predictor.input_size, crop_size, model.image_size
            )[:, 0]
        else:
            logits = model.postprocess_masks(data["low_res_logits"][:, None], self.predictor.input_size, crop_size)[:, 0]
        del data["low_res_logits"]
        data["stability_score"] = calculate_stability_score(
            logits, self.mask_threshold, self.stability_score_offset
        ).cpu()
        if self.stability_score_thresh > 0.0:
            keep = data["stability_score"] >= self.stability_score_thresh
            data.filter(keep)
            logits = logits[keep.to(logits.device)]
        rles, data["boxes"] = threshold_to_rle(logits, self.mask_threshold, crop_box, original_size)
        data["rles"] = rles
        del logits

        height, width = original_size
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, width, height])
        if not torch.all(keep):
            data.filter(keep)
        return data

    @staticmethod
    def _postprocess_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fill small holes and drop small islands, then rerun box NMS preferring masks that
        did not change. Works on one RLE at a time, never on all masks at full size."""
        new_rles, new_boxes, scores = [], [], []
        for rle in data["rles"]:
            rle_holes, holes_changed = remove_small_regions_rle(rle, min_area, mode="holes")
            new_rle, islands_changed = remove_small_regions_rle(rle_holes, min_area, mode="islands")
            changed = holes_changed or islands_changed
            new_rles.append(new_rle)
            new_boxes.append(rle_to_box(new_rle))
            scores.append(0.0 if changed else 1.0)
        keep = batched_nms(
            torch.as_tensor(np.stack(new_boxes)).float(),
            torch.as_tensor(scores),
            torch.zeros(len(scores), dtype=torch.long),
            iou_threshold=nms_thresh,
        )
        for index in keep.tolist():
            if scores[index] == 0.0:
                data["rles"][index] = new_rles[index]
                data["boxes"][index] = new_boxes[index]
        data.filter(keep)
        return data

    # ----------------------------------------------------------------------- output
    def _record(self, data: MaskData, index: int) -> dict[str, Any]:
        rle = data["rles"][index]
        if self.output_mode == "binary_mask":
            segmentation: Any = rle_to_mask(rle)
        elif self.output_mode == "coco_rle":
            segmentation = coco_encode_rle(rle)
        else:
            segmentation = {"size": list(rle["size"]), "counts": np.asarray(rle["counts"]).tolist()}
        return {
            "segmentation": segmentation,
            "area": area_from_rle(rle),
            "bbox": box_xyxy_to_xywh(data["boxes"][index]).tolist(),
            "predicted_iou": float(data["iou_preds"][index]),
            "point_coords": [data["points"][index].tolist()],
            "stability_score": float(data["stability_score"][index]),
            "crop_box": box_xyxy_to_xywh(data["crop_boxes"][index]).tolist(),
        }


class Sam2AutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """The automatic mask generator with the parameters, order and defaults of SAM 2's
    ``SAM2AutomaticMaskGenerator`` (``pred_iou_thresh=0.8``, ``mask_threshold``, ``use_m2m``,
    ``multimask_output``); same records. Works with either family; made for SAM 2 / 2.1."""

    def __init__(
        self,
        model: Any,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        mask_chunk_bytes: int = DEFAULT_MASK_CHUNK_BYTES,
    ) -> None:
        super().__init__(
            model, points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh, crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor, point_grids=point_grids,
            min_mask_region_area=min_mask_region_area, output_mode=output_mode, device=device, dtype=dtype,
            mask_chunk_bytes=mask_chunk_bytes, mask_threshold=mask_threshold, use_m2m=use_m2m,
            multimask_output=multimask_output,
        )


def make_mask_generator(model: Any, **params: Any) -> SamAutomaticMaskGenerator:
    """The automatic mask generator for `model`'s family (a SAM model or a `SamPredictor`),
    with that family's official defaults: `SamAutomaticMaskGenerator` for SAM 1,
    `Sam2AutomaticMaskGenerator` for SAM 2 / 2.1. Unknown parameters raise ValueError."""
    import inspect

    family = getattr(getattr(model, "model", model), "family", "sam1")
    generator_class = Sam2AutomaticMaskGenerator if family == "sam2" else SamAutomaticMaskGenerator
    accepted = set(inspect.signature(generator_class.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"unknown automatic mask generator settings {unknown}; valid: {', '.join(sorted(accepted))}")
    return generator_class(model, **params)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_grid(index: int, grid: Any) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[1] != 2 or len(grid) == 0:
        raise ValueError(f"point_grids[{index}] must be a non-empty (N, 2) array of xy points, got shape {grid.shape}")
    if not np.isfinite(grid).all() or grid.min() < 0.0 or grid.max() > 1.0:
        raise ValueError(f"point_grids[{index}] must hold xy coordinates normalised to [0, 1]")
    return grid
