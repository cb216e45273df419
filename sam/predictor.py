"""SamPredictor: embed an image once, then decode masks for any number of prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .image import to_rgb_uint8
from .transforms import transform_for

logger = logging.getLogger(__name__)


class ImageNotSetError(RuntimeError, ValueError):
    """`predict` was called before `set_image`."""


@dataclass
class PromptSet:
    """One prompt set on its own image, checked and in the model-input frame: what
    `SamPredictor.predict_fused` decodes. Make it with `SamPredictor.prompt_set`.

    features: the image's features as `predictor.features` holds them after `set_image`
    (SAM 1: (1, 256, 64, 64); SAM 2: the dict of levels); original_size: (H, W);
    input_size: (h, w) in the model-input frame; point_coords (1, N, 2) xy and point_labels
    (1, N), box (1, 4) xyxy, all in the model-input frame; mask_input (1, 1, 256, 256) logits.
    """

    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    box: torch.Tensor | None = None
    mask_input: torch.Tensor | None = None
    multimask_output: bool = True


class SamPredictor:
    """Prompted segmentation for both model families (SAM 1 `Sam`, SAM 2 / 2.1 `Sam2`).

    Frames: `predict` takes prompts in original-image pixels; `predict_torch` and `decode` take
    them in the model-input frame (already passed through `transform`: SAM 1 resizes the longest
    side to 1024, SAM 2 resizes to a 1024 square). Device and dtype are decided here, once: the
    model is moved to them, and every output comes back as float32 / bool.

    Every decode (the predictor's own, the automatic mask generator's, the pipeline's) goes
    through `decode`, which returns low-resolution logits; `predict_torch` adds the upscaling.
    """

    def __init__(
        self,
        sam_model: Any,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if device is not None or dtype is not None:
            sam_model = sam_model.to(device=device, dtype=dtype)
        self.model = sam_model.eval()
        self.family: str = getattr(sam_model, "family", "sam1")
        self.prompt_encoder = sam_model.sam_prompt_encoder if self.family == "sam2" else sam_model.prompt_encoder
        self.transform = transform_for(sam_model)
        self._batch: list[tuple[Any, tuple[int, int], tuple[int, int]]] | None = None
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_encoder.no_mask_embed.weight.dtype

    @property
    def mask_threshold(self) -> float:
        """Mask logits above this are the object."""
        return self.model.mask_threshold

    # ----------------------------------------------------------------------- image
    def _prepare(self, image: np.ndarray, image_format: str) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Checked (H, W, 3) image -> model-input tensor (1, 3, h, w), (H, W), (h, w)."""
        image = to_rgb_uint8(image, image_format)
        height, width = image.shape[:2]
        target = self.transform.target_length
        input_size = tuple(self.transform.get_preprocess_shape(height, width, target))
        if min(input_size) < 1:
            # The short side would round to 0 pixels at the model's input size (Meta's code
            # crashes deep inside PIL there); masks of such an image would be meaningless.
            raise ValueError(
                f"image of {width}x{height} pixels is too elongated for SAM: its short side would be "
                f"resized to 0 pixels when the long side becomes {target} (the aspect ratio may be "
                f"at most {2 * target}:1); crop or pad it first"
            )
        pixels = self.transform.to_input_tensor(image, self.device)
        return pixels, (height, width), (int(input_size[0]), int(input_size[1]))

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and cache the features of an (H, W, 3) uint8 image (other layouts are
        converted with a warning; see `sam.image.to_rgb_uint8`). A refused image leaves no
        image set, so a later `predict` cannot silently use the previous one."""
        self.reset_image()
        pixels, original_size, input_size = self._prepare(image, image_format)
        with torch.no_grad():
            features = self.model.encode_image(pixels.to(dtype=self.dtype))
        self._set(features, original_size, input_size)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """transformed_image: (1, 3, h, w) already in the model-input frame, as
        `transform.to_input_tensor` makes it (SAM 1: longest side 1024, values in [0, 255];
        SAM 2: 1024 square, values in [0, 1]); original_image_size: (H, W) of the original image."""
        target = self.model.image_size
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[0] != 1
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != target
        ):
            raise ValueError(
                f"set_torch_image expects a (1, 3, h, w) tensor with longest side {target}, "
                f"got shape {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        pixels = transformed_image.to(device=self.device, dtype=self.dtype)
        original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self._set(self.model.encode_image(pixels), original_size, tuple(transformed_image.shape[-2:]))

    @torch.no_grad()
    def set_image_batch(self, images: list[np.ndarray], image_format: str = "RGB") -> None:
        """Encode several (H, W, 3) images in one encoder call; then `predict_batch` decodes
        prompts for each. Sizes may differ (each is resized to the model-input frame)."""
        if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)) or not images:
            raise ValueError("set_image_batch expects a non-empty list of (H, W, 3) images")
        self.reset_image()
        prepared = [self._prepare(image, image_format) for image in images]
        pixels = [tensor.to(dtype=self.dtype) for tensor, _, _ in prepared]
        if len({tensor.shape for tensor in pixels}) == 1:
            pixels = torch.cat(pixels)
        # else: SAM 1 inputs of different aspect ratios; `Sam.encode_image` pads each to 1024.
        features = self.model.encode_image(pixels)
        self._batch = [
            (_select(features, index), original_size, input_size)
            for index, (_, original_size, input_size) in enumerate(prepared)
        ]

    def _set(self, features: Any, original_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        self.features = features
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def set_embedding(
        self, features: Any, original_size: tuple[int, int], input_size: tuple[int, int]
    ) -> None:
        """Restore cached features (`predictor.features` after `set_image`) without re-running
        the encoder. SAM 1: a (1, 256, 64, 64) tensor; SAM 2: the dict of multi-level features.
        original_size: (H, W) of the image; input_size: (h, w) in the model-input frame."""
        _check_features(self.family, features, self.prompt_encoder)
        self.reset_image()
        self._set(_to(features, self.device, self.dtype), original_size, input_size)

    def get_image_embedding(self) -> torch.Tensor:
        """The cached (1, 256, 64, 64) image embedding (SAM 2: the lowest-resolution level, with
        `no_mem_embed` added)."""
        self._require_image()
        return self.features["image_embed"] if self.family == "sam2" else self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: Any = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._batch = None

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ImageNotSetError("no image is set: call set_image(image) before predicting")

    # ----------------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set, in original-image pixels.

        point_coords: (N, 2) xy; point_labels: (N,) 1 = foreground, 0 = background;
        box: (4,) xyxy; mask_input: (1, 256, 256) low-res logits from an earlier call.
        Returns masks (C, H, W) bool (float logits if return_logits), iou_predictions (C,)
        and low_res_logits (C, 256, 256), where C = 3 if multimask_output else 1.
        """
        self._require_image()
        prompts = self._prompt_tensors(point_coords, point_labels, box, mask_input, self.original_size)
        masks, iou_predictions, low_res = self.predict_torch(*prompts, multimask_output, return_logits)
        return masks[0].cpu().numpy(), iou_predictions[0].cpu().numpy(), low_res[0].cpu().numpy()

    def _prompt_tensors(self, point_coords, point_labels, box, mask_input, original_size):
        """`predict`'s prompts, checked, -> tensors in the model-input frame: coords (1, N, 2),
        labels (1, N), box (1, 4), mask_input (1, 1, 256, 256), each None when not given."""
        coords, labels = self._check_points(point_coords, point_labels, original_size)
        box_array = self._check_box(box)
        mask_array = self._check_mask_input(mask_input)

        coords_torch = labels_torch = box_torch = mask_torch = None
        if coords is not None:
            coords_torch = torch.as_tensor(
                self.transform.apply_coords(coords, original_size), dtype=torch.float, device=self.device
            )[None]
            labels_torch = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box_array is not None:
            box_torch = torch.as_tensor(
                self.transform.apply_boxes(box_array, original_size), dtype=torch.float, device=self.device
            )
        if mask_array is not None:
            mask_torch = torch.as_tensor(mask_array, dtype=torch.float, device=self.device)[None]
        return coords_torch, labels_torch, box_torch, mask_torch

    # ----------------------------------------------------------------------- fused prompts
    def prompt_set(
        self,
        features: Any,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> PromptSet:
        """One prompt set on an image given by its cached features (`predictor.features`,
        `original_size` and `input_size` after `set_image`), checked as `predict` checks it and
        moved to the model-input frame, for `predict_fused`. Prompts as `predict` takes them,
        in original-image pixels. Raises ValueError for bad prompts or features; the image
        set on the predictor, if any, is untouched."""
        _check_features(self.family, features, self.prompt_encoder)
        original_size = (int(original_size[0]), int(original_size[1]))
        prompts = self._prompt_tensors(point_coords, point_labels, box, mask_input, original_size)
        return PromptSet(_to(features, self.device, self.dtype), original_size,
                         (int(input_size[0]), int(input_size[1])), *prompts, bool(multimask_output))

    @torch.no_grad()
    def predict_fused(
        self, prompt_sets: Sequence[PromptSet], return_logits: bool = False, max_batch: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Prompt sets on different images (as concurrent requests send them) in as few
        decoder calls as possible: each set keeps its own image embedding, and the sets whose
        prompts make the same number of tokens (clicks, box corners and SAM's padding point)
        share one call, at most `max_batch` sets each (None: no limit). Sets with different
        token counts are never padded to one length: a padding token changes the masks.

        Returns, per set and in order, (masks (C, H, W), iou_predictions (C,),
        low_res_logits (C, 256, 256)): what `set_embedding` then `predict` give for that set
        alone, bit for bit on CPU (each set's numbers do not depend on the others).
        """
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        embedded = [self._embed_prompts(prompt_set) for prompt_set in prompt_sets]
        groups: dict[int, list[int]] = {}
        for index, (sparse, _) in enumerate(embedded):
            groups.setdefault(sparse.shape[1], []).append(index)
        results: list[Any] = [None] * len(prompt_sets)
        for indices in groups.values():
            step = max_batch or len(indices)
            for start in range(0, len(indices), step):
                part = indices[start : start + step]
                features = _cat_features([prompt_sets[index].features for index in part])
                sparse = torch.cat([embedded[index][0] for index in part])
                if any(prompt_sets[index].mask_input is not None for index in part):
                    dense = torch.cat([embedded[index][1] for index in part])
                else:  # every set's dense embedding is no_mask_embed: broadcast it, not copy it
                    dense = embedded[part[0]][1].expand(len(part), -1, -1, -1)
                decoded = self.model.decode_each(
                    features, sparse, dense, [prompt_sets[index].multimask_output for index in part]
                )
                for index, (low_res_logits, iou_predictions, _) in zip(part, decoded):
                    results[index] = self._finish_one(
                        prompt_sets[index], low_res_logits.float(), iou_predictions.float(), return_logits
                    )
        return results

    def _embed_prompts(self, prompt_set: PromptSet) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt set's sparse and dense embeddings, with the conversions of `decode`."""
        return self.model.embed_prompts(*self._model_prompts(
            prompt_set.point_coords, prompt_set.point_labels, prompt_set.box, prompt_set.mask_input))

    def _finish_one(self, prompt_set: PromptSet, low_res_logits, iou_predictions, return_logits: bool):
        """One set's (1, C, 256, 256) logits and (1, C) IoU -> `predict`'s numpy outputs."""
        masks = self.model.postprocess_masks(low_res_logits, prompt_set.input_size, prompt_set.original_size)
        masks, low_res_logits = self._finish(masks, low_res_logits, return_logits)
        # Copies: views would keep the whole call's (B, 4, 256, 256) logits alive with each answer.
        return masks[0].cpu().numpy(), iou_predictions[0].cpu().numpy().copy(), low_res_logits[0].cpu().numpy().copy()

    def predict_batch(
        self,
        point_coords_batch: list[np.ndarray | None] | None = None,
        point_labels_batch: list[np.ndarray | None] | None = None,
        box_batch: list[np.ndarray | None] | None = None,
        mask_input_batch: list[np.ndarray | None] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`predict` for each image of the last `set_image_batch`, one prompt set per image
        (each list has one entry per image, or is None). A box entry may hold several boxes
        (B, 4): they are decoded together, giving (B, C, H, W) masks for that image.
        Returns lists of masks, iou_predictions and low_res_logits, one entry per image."""
        if self._batch is None:
            raise ImageNotSetError("no image batch is set: call set_image_batch(images) before predict_batch")
        batch = self._batch
        count = len(batch)
        prompts = {}
        for name, values in (("point_coords_batch", point_coords_batch), ("point_labels_batch", point_labels_batch),
                             ("box_batch", box_batch), ("mask_input_batch", mask_input_batch)):
            if values is not None and len(values) != count:
                raise ValueError(f"{name} has {len(values)} entries but {count} images are set")
            prompts[name] = values if values is not None else [None] * count
        outputs: tuple[list, list, list] = ([], [], [])
        try:
            for index, (features, original_size, input_size) in enumerate(batch):
                self._set(features, original_size, input_size)
                boxes = prompts["box_batch"][index]
                if boxes is not None and np.asarray(boxes).ndim == 2 and len(boxes) > 1:
                    result = self._predict_many_boxes(
                        prompts["point_coords_batch"][index], prompts["point_labels_batch"][index], boxes,
                        prompts["mask_input_batch"][index], multimask_output, return_logits,
                    )
                else:
                    result = self.predict(
                        prompts["point_coords_batch"][index], prompts["point_labels_batch"][index], boxes,
                        prompts["mask_input_batch"][index], multimask_output, return_logits,
                    )
                for column, value in zip(outputs, result):
                    column.append(value)
        finally:
            self.is_image_set = False
            self.features = None
            self._batch = batch
        return outputs

    def _predict_many_boxes(self, point_coords, point_labels, boxes, mask_input, multimask_output, return_logits):
        if point_coords is not None or mask_input is not None:
            raise ValueError("several boxes for one image cannot be combined with points or mask_input; "
                             "give one box per prompt set")
        box_arrays = np.stack([self._check_box(box)[0] for box in np.asarray(boxes, dtype=float)])
        box_torch = torch.as_tensor(
            self.transform.apply_boxes(box_arrays, self.original_size), dtype=torch.float, device=self.device
        )
        masks, iou_predictions, low_res = self.predict_torch(
            None, None, box_torch, None, multimask_output, return_logits
        )
        return masks.cpu().numpy(), iou_predictions.cpu().numpy(), low_res.cpu().numpy()

    @torch.no_grad()
    def decode(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompt sets in one decoder call, without upscaling: the one decode path.

        point_coords: (B, N, 2) xy and point_labels (B, N), boxes (B, 4) xyxy, all in the
        model-input frame; mask_input: (B, 1, 256, 256) low-res logits.
        Returns low_res_logits (B, C, 256, 256) and iou_predictions (B, C) as float32,
        C = 3 if multimask_output else 1.
        """
        self._require_image()
        self._check_prompt_batch(point_coords, point_labels, boxes, mask_input)
        return self._decode_low_res(point_coords, point_labels, boxes, mask_input, multimask_output)

    def _decode_low_res(self, point_coords, point_labels, boxes, mask_input, multimask_output: bool):
        """`decode` once its inputs are checked: the model's decoder on B prompt sets."""
        points, boxes, mask_input = self._model_prompts(point_coords, point_labels, boxes, mask_input)
        low_res_logits, iou_predictions, _ = self.model.decode(
            self.features, points, boxes, mask_input, multimask_output
        )
        return low_res_logits.float(), iou_predictions.float()

    def _model_prompts(self, point_coords, point_labels, boxes, mask_input):
        """Checked prompt tensors -> what the model's `decode` / `embed_prompts` take: points as
        (coords, labels) or None, on the model's device, the mask input in its dtype."""
        points = None
        if point_coords is not None:
            # Coordinates keep their float precision until the prompt encoder has normalised
            # them (the official generator passes float64 points).
            coords = point_coords.to(self.device)
            if not coords.is_floating_point():
                coords = coords.float()
            points = (coords, point_labels.to(self.device))
        if boxes is not None:
            boxes = boxes.to(self.device)
            if not boxes.is_floating_point():
                boxes = boxes.float()
        if mask_input is not None:
            mask_input = mask_input.to(device=self.device, dtype=self.dtype)
        return points, boxes, mask_input

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`decode`, then upscale to the original image.

        Returns masks (B, C, H, W) (bool unless return_logits), iou_predictions (B, C) and
        low_res_logits (B, C, 256, 256), as float32.
        """
        masks, iou_predictions, low_res_logits = self._decode_full_size(
            point_coords, point_labels, boxes, mask_input, multimask_output
        )
        masks, low_res_logits = self._finish(masks, low_res_logits, return_logits)
        return masks, iou_predictions, low_res_logits

    def _finish(self, masks: torch.Tensor, low_res_logits: torch.Tensor, return_logits: bool):
        """Full-size mask logits and low-res logits -> what `predict` returns: masks cut at the
        threshold unless `return_logits`, and (SAM 2) the low-res logits clamped."""
        if not return_logits:
            masks = masks > self.mask_threshold
        if self.family == "sam2":
            # As SAM2ImagePredictor: masks come from the raw logits, the returned ones are clamped.
            low_res_logits = low_res_logits.clamp(-32.0, 32.0)
        return masks, low_res_logits

    def _decode_full_size(self, point_coords, point_labels, boxes, mask_input, multimask_output: bool):
        """`decode` plus the upscaling: mask logits (B, C, H, W) in the original frame, IoU
        predictions (B, C) and low-res logits (B, C, 256, 256)."""
        low_res_logits, iou_predictions = self.decode(point_coords, point_labels, boxes, mask_input, multimask_output)
        masks = self.model.postprocess_masks(low_res_logits, self.input_size, self.original_size)
        return masks, iou_predictions, low_res_logits

    # ----------------------------------------------------------------------- checks
    def _low_res_shape(self) -> tuple[int, int, int]:
        return (1, *self.prompt_encoder.mask_input_size)

    def _check_prompt_batch(self, point_coords, point_labels, boxes, mask_input) -> None:
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        batch_sizes = {}
        if point_coords is not None:
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
                raise ValueError(f"point_coords must have shape (B, N, 2), got {tuple(point_coords.shape)}")
            if point_labels.shape != point_coords.shape[:2]:
                raise ValueError(
                    f"point_labels must have shape {tuple(point_coords.shape[:2])} to match point_coords, "
                    f"got {tuple(point_labels.shape)}"
                )
            batch_sizes["point_coords"] = point_coords.shape[0]
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
            batch_sizes["boxes"] = boxes.shape[0]
        if mask_input is not None:
            if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != self._low_res_shape():
                raise ValueError(
                    f"mask_input must have shape (B, 1, 256, 256), got {tuple(mask_input.shape)}"
                )
            batch_sizes["mask_input"] = mask_input.shape[0]
        if len(set(batch_sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes disagree: {batch_sizes}")

    def _check_points(self, point_coords, point_labels, original_size=None):
        if point_coords is None and point_labels is None:
            return None, None
        if point_coords is None or point_labels is None:
            raise ValueError("point_coords and point_labels must be given together")
        coords = np.asarray(point_coords, dtype=float)
        labels = np.asarray(point_labels)
        if coords.ndim == 1 and coords.shape[0] == 2:
            coords = coords[None]
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(f"point_coords must have shape (N, 2) as (x, y) pairs, got {coords.shape}")
        labels = labels.reshape(-1) if labels.ndim <= 1 else labels
        if labels.ndim != 1:
            raise ValueError(f"point_labels must have shape (N,), got {labels.shape}")
        if coords.shape[0] != labels.shape[0]:
            raise ValueError(
                f"point_coords has {coords.shape[0]} points but point_labels has {labels.shape[0]}"
            )
        if coords.shape[0] == 0:
            raise ValueError("point_coords is empty; pass None for no points")
        if not np.isfinite(coords).all():
            raise ValueError("point_coords contains NaN or infinite values")
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(
                f"point_labels must be 1 (foreground), 0 (background) or -1 (ignore), got {np.unique(labels)}"
            )
        height, width = original_size or self.original_size
        outside = (coords[:, 0] < 0) | (coords[:, 0] > width) | (coords[:, 1] < 0) | (coords[:, 1] > height)
        if outside.any():
            first = coords[np.argmax(outside)]
            raise ValueError(
                f"{int(outside.sum())} point(s) lie outside the {width}x{height} image, e.g. "
                f"({first[0]:g}, {first[1]:g}); coordinates are (x, y) in original-image pixels"
            )
        return coords, labels.astype(np.int64)

    def _check_box(self, box):
        if box is None:
            return None
        box_array = np.asarray(box, dtype=float)
        if box_array.size != 4 or box_array.ndim > 2 or (box_array.ndim == 2 and box_array.shape[0] != 1):
            raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got shape {box_array.shape}")
        box_array = box_array.reshape(1, 4)
        if not np.isfinite(box_array).all():
            raise ValueError("box contains NaN or infinite values")
        x0, y0, x1, y1 = box_array[0]
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0, got {box_array[0].tolist()}")
        return box_array

    def _check_mask_input(self, mask_input):
        if mask_input is None:
            return None
        mask_array = np.asarray(mask_input, dtype=np.float32)
        expected = self._low_res_shape()
        if mask_array.shape == expected[1:]:
            mask_array = mask_array[None]
        if mask_array.shape != expected:
            raise ValueError(
                f"mask_input must be low-res logits of shape {expected} (from an earlier predict), "
                f"got {mask_array.shape}"
            )
        if not np.isfinite(mask_array).all():
            raise ValueError("mask_input contains NaN or infinite values")
        return mask_array


def _select(features: Any, index: int) -> Any:
    """Image `index` of batched features, keeping a batch dimension of 1."""
    if isinstance(features, dict):
        return {name: _select(value, index) for name, value in features.items()}
    if isinstance(features, (list, tuple)):
        return type(features)(_select(value, index) for value in features)
    return features[index : index + 1]


def _cat_features(features: list[Any]) -> Any:
    """Several images' features (each with batch 1) -> one batch, in order."""
    first = features[0]
    if isinstance(first, dict):
        return {name: _cat_features([item[name] for item in features]) for name in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_features([item[level] for item in features]) for level in range(len(first)))
    return torch.cat(features) if len(features) > 1 else first


def _to(features: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(features, dict):
        return {name: _to(value, device, dtype) for name, value in features.items()}
    if isinstance(features, (list, tuple)):
        return type(features)(_to(value, device, dtype) for value in features)
    return features.to(device=device, dtype=dtype)


def _check_features(family: str, features: Any, prompt_encoder: Any) -> None:
    embed_shape = (1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)
    if family == "sam1":
        if not isinstance(features, torch.Tensor) or tuple(features.shape) != embed_shape:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must have shape {embed_shape}, got {shape}")
        return
    if not isinstance(features, dict) or set(features) != {"image_embed", "high_res_feats"}:
        raise ValueError("SAM 2 features must be the dict that set_image stores in predictor.features "
                         "(keys image_embed and high_res_feats)")
    if tuple(features["image_embed"].shape) != embed_shape:
        raise ValueError(f"features['image_embed'] must have shape {embed_shape}, "
                         f"got {tuple(features['image_embed'].shape)}")
