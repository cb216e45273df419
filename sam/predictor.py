"""SamPredictor: embed an image once, then decode masks for any number of prompts."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .image import to_rgb_uint8
from .modeling import Sam
from .transforms import ResizeLongestSide

logger = logging.getLogger(__name__)


class ImageNotSetError(RuntimeError, ValueError):
    """`predict` was called before `set_image`."""


class SamPredictor:
    """Prompted segmentation on one image at a time.

    Frames: `predict` takes prompts in original-image pixels; `predict_torch` takes them in the
    model-input frame (already passed through `transform`). Device and dtype are decided here,
    once: the model is moved to them, and every output comes back as float32 / bool.
    """

    def __init__(
        self,
        sam_model: Sam,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if device is not None or dtype is not None:
            sam_model = sam_model.to(device=device, dtype=dtype)
        self.model = sam_model.eval()
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.prompt_encoder.no_mask_embed.weight.dtype

    # ----------------------------------------------------------------------- image
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and cache the embedding of an (H, W, 3) uint8 image (other layouts are
        converted with a warning; see `sam.image.to_rgb_uint8`). A refused image leaves no
        image set, so a later `predict` cannot silently use the previous one."""
        self.reset_image()
        image = to_rgb_uint8(image, image_format)
        height, width = image.shape[:2]
        target = self.transform.target_length
        if min(self.transform.get_preprocess_shape(height, width, target)) < 1:
            # The short side would round to 0 pixels at the model's input size (Meta's code
            # crashes deep inside PIL there); masks of such an image would be meaningless.
            raise ValueError(
                f"image of {width}x{height} pixels is too elongated for SAM: its short side would be "
                f"resized to 0 pixels when the long side becomes {target} (the aspect ratio may be "
                f"at most {2 * target}:1); crop or pad it first"
            )
        input_image = self.transform.apply_image(image)
        input_tensor = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1)[None]
        self.set_torch_image(input_tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """transformed_image: (1, 3, h, w) with longest side 1024 (model-input frame), values in
        [0, 255]; original_image_size: (H, W) of the original image."""
        target = self.model.image_encoder.img_size
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
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        pixels = transformed_image.to(device=self.device, dtype=self.dtype)
        self.features = self.model.image_encoder(self.model.preprocess(pixels))
        self.is_image_set = True

    def set_embedding(
        self, features: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]
    ) -> None:
        """Restore a cached embedding (from `get_image_embedding`) without re-running the encoder.

        features: (1, 256, 64, 64); original_size: (H, W) of the image; input_size: (h, w) of
        the resized image in the model-input frame.
        """
        expected = (1, self.model.prompt_encoder.embed_dim, *self.model.prompt_encoder.image_embedding_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"features must have shape {expected}, got {tuple(features.shape)}")
        self.reset_image()
        self.features = features.to(device=self.device, dtype=self.dtype)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The cached (1, 256, 64, 64) image embedding."""
        self._require_image()
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

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
        coords, labels = self._check_points(point_coords, point_labels)
        box_array = self._check_box(box)
        mask_array = self._check_mask_input(mask_input)

        coords_torch = labels_torch = box_torch = mask_torch = None
        if coords is not None:
            coords_torch = torch.as_tensor(
                self.transform.apply_coords(coords, self.original_size), dtype=torch.float, device=self.device
            )[None]
            labels_torch = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box_array is not None:
            box_torch = torch.as_tensor(
                self.transform.apply_boxes(box_array, self.original_size), dtype=torch.float, device=self.device
            )
        if mask_array is not None:
            mask_torch = torch.as_tensor(mask_array, dtype=torch.float, device=self.device)[None]

        masks, iou_predictions, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output, return_logits
        )
        return (
            masks[0].cpu().numpy(),
            iou_predictions[0].float().cpu().numpy(),
            low_res[0].float().cpu().numpy(),
        )

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
        """A batch of B prompt sets in one decoder call, in the model-input frame.

        point_coords: (B, N, 2); point_labels: (B, N); boxes: (B, 4) xyxy;
        mask_input: (B, 1, 256, 256). Returns masks (B, C, H, W) (bool unless return_logits),
        iou_predictions (B, C) and low_res_logits (B, C, 256, 256), as float32.
        """
        self._require_image()
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

        dtype, device = self.dtype, self.device
        points = None
        if point_coords is not None:
            points = (point_coords.to(device=device, dtype=dtype), point_labels.to(device))
        if boxes is not None:
            boxes = boxes.to(device=device, dtype=dtype)
        if mask_input is not None:
            mask_input = mask_input.to(device=device, dtype=dtype)

        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res_logits, iou_predictions = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        low_res_logits = low_res_logits.float()
        masks = self.model.postprocess_masks(low_res_logits, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions.float(), low_res_logits

    # ----------------------------------------------------------------------- checks
    def _low_res_shape(self) -> tuple[int, int, int]:
        return (1, *self.model.prompt_encoder.mask_input_size)

    def _check_points(self, point_coords, point_labels):
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
        height, width = self.original_size
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
