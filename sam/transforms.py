"""Resize so the longest side is `target_length` (1024 for SAM), for images, coordinates and boxes.

Three coordinate frames meet here: the original image (H, W), the model input (longest side
`target_length`, before padding), and the low-res mask grid (256x256, handled by the model).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ResizeLongestSide:
    def __init__(self, target_length: int = 1024) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(h, w) after scaling so that max(h, w) == long_side_length, rounded to nearest."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        return int(newh + 0.5), int(neww + 0.5)

    # numpy ---------------------------------------------------------------------------------
    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8 in the model-input frame (PIL bilinear)."""
        newh, neww = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        resized = Image.fromarray(image).resize((neww, newh), Image.Resampling.BILINEAR)
        return np.array(resized)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) xy in the original frame -> model-input frame (float)."""
        oldh, oldw = original_size
        newh, neww = self.get_preprocess_shape(oldh, oldw, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] = coords[..., 0] * (neww / oldw)
        coords[..., 1] = coords[..., 1] * (newh / oldh)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(B, 4) xyxy in the original frame -> model-input frame."""
        boxes = np.asarray(boxes)
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    # torch ---------------------------------------------------------------------------------
    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> (B, 3, h, w), antialiased bilinear."""
        target = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, target, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        oldh, oldw = original_size
        newh, neww = self.get_preprocess_shape(oldh, oldw, self.target_length)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * (neww / oldw)
        coords[..., 1] = coords[..., 1] * (newh / oldh)
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
