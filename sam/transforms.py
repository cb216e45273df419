"""Input transforms per family, for images, coordinates and boxes: SAM 1 resizes the longest side
to `target_length` (1024) and pads (`ResizeLongestSide`); SAM 2 stretches to a 1024 square
(`ResizeSquare`); `transform_for(model)` picks one.

Three coordinate frames meet here: the original image (H, W), the model input (SAM 1: longest
side `target_length`, before padding; SAM 2: the whole square), and the low-res mask grid
(256x256, handled by the model).
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

    def to_input_tensor(self, image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, h, w) float32 in [0, 255], model-input frame (not yet
        normalised or padded: that is `Sam.encode_image`'s job)."""
        resized = torch.as_tensor(self.apply_image(image), device=device)
        return resized.permute(2, 0, 1)[None].float()

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


class ResizeSquare:
    """SAM 2's transform: the image is stretched to a `target_length` square (1024x1024).

    Same method names as `ResizeLongestSide`. The model-input frame is the full square, so
    x scales by target/W and y by target/H. `to_input_tensor` matches the reference's
    SAM2Transforms up to its normalisation (which `Sam2.encode_image` applies): uint8 -> float
    in [0, 1], then torchvision's antialiased bilinear resize of the float image.
    """

    def __init__(self, target_length: int = 1024) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """Always (long_side_length, long_side_length): the image fills the whole square."""
        return long_side_length, long_side_length

    def to_input_tensor(self, image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, S, S) float32 in [0, 1], model-input frame (not yet
        normalised: that is `Sam2.encode_image`'s job)."""
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # torch warns about (and never writes to) read-only arrays
            image = image.copy()
        pixels = torch.as_tensor(image, device=device).permute(2, 0, 1)
        pixels = pixels.to(torch.float32).div(255)[None]
        size = (self.target_length, self.target_length)
        if tuple(pixels.shape[-2:]) == size:
            return pixels  # torchvision's Resize leaves an image of the target size untouched
        return F.interpolate(pixels, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) xy in the original frame -> model-input frame (float)."""
        oldh, oldw = original_size
        coords = np.array(coords, dtype=float, copy=True)
        # Normalise, then scale: the reference's order of operations.
        coords[..., 0] = coords[..., 0] / oldw * self.target_length
        coords[..., 1] = coords[..., 1] / oldh * self.target_length
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(B, 4) xyxy in the original frame -> model-input frame."""
        boxes = np.asarray(boxes)
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """(..., 2) xy in the original frame -> model-input frame (float32, same device)."""
        oldh, oldw = original_size
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] / oldw
        coords[..., 1] = coords[..., 1] / oldh
        return coords * self.target_length

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """(B, 4) xyxy in the original frame -> model-input frame."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


def transform_for(model) -> ResizeLongestSide | ResizeSquare:
    """The input transform of a model's family: `ResizeSquare` for a `Sam2`,
    `ResizeLongestSide` for a SAM 1 `Sam`."""
    if getattr(model, "family", None) == "sam2":
        return ResizeSquare(model.image_size)
    return ResizeLongestSide(model.image_size)
