"""Turn user-supplied image arrays into the (H, W, 3) uint8 RGB array the predictor expects."""

from __future__ import annotations

import warnings

import numpy as np


def to_rgb_uint8(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Validate and convert an image array to (H, W, 3) uint8 RGB.

    Accepted: (H, W) or (H, W, 1) grayscale (replicated to 3 channels), (H, W, 3) RGB/BGR,
    (H, W, 4) RGBA/BGRA (alpha dropped), uint8, uint16 (scaled by 1/257), bool, and floats in
    [0, 1] (scaled by 255) or [0, 255]. Every conversion is announced with a UserWarning.
    Anything else raises ValueError.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array of shape (H, W, 3), got {type(image).__name__}")
    notes = []
    if image.dtype.byteorder not in ("=", "|"):  # e.g. big-endian '>u2' from FITS or raw buffers
        image = image.astype(image.dtype.newbyteorder("="))
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    height, width, channels = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
        notes.append("replicated the single grayscale channel to RGB")
    elif channels == 4:
        image = image[:, :, :3]
        notes.append("dropped the alpha channel of a 4-channel image")
    elif channels != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {channels} (shape {image.shape})")

    if image.dtype == np.uint8:
        pass
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
        notes.append("mapped a boolean image to 0/255")
    elif image.dtype == np.uint16:
        image = np.round(image.astype(np.float64) / 257.0).astype(np.uint8)
        notes.append("scaled a 16-bit image to 8 bits")
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 255.0:
            raise ValueError(
                f"float image values must lie in [0, 1] or [0, 255], got range [{low:g}, {high:g}]"
            )
        scale = 255.0 if high <= 1.0 else 1.0
        image = np.clip(np.round(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        notes.append(f"converted a float image in [0, {1 if scale == 255.0 else 255}] to uint8")
    elif np.issubdtype(image.dtype, np.integer):
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"integer image values must lie in [0, 255] (or use uint16), got range [{low}, {high}]"
            )
        notes.append(f"cast a {image.dtype} image to uint8")
        image = image.astype(np.uint8)
    else:
        raise ValueError(f"unsupported image dtype {image.dtype}")

    if image_format == "BGR":
        image = image[:, :, ::-1]
    if notes:
        warnings.warn("; ".join(notes), UserWarning, stacklevel=3)
    return np.ascontiguousarray(image)
