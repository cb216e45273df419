"""Uploaded image files decoded from memory, and the store of image embeddings for /v1/predict."""

from __future__ import annotations

import io
import secrets
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from langsam.io import IMAGE_FORMATS, ImageLoadError, load_image

def decode_image_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded image file -> (H, W, 3) uint8 RGB, displayed orientation (as `load_image`).

    Only the formats of `langsam.io.IMAGE_FORMATS` are opened; the size is checked from the
    header before any pixel is decoded. Raises `ImageLoadError` with the reason."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageLoadError("image: the upload is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                if image.width * image.height > max_pixels:
                    raise ImageLoadError(f"image: {image.width}x{image.height} pixels is more than this server's "
                                         f"limit of {max_pixels:,} pixels")
                image.load()
                return load_image(image, max_pixels=max_pixels)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"image: too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"image: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"image: corrupt or truncated ({error})") from None

@dataclass
class _StoredImage:
    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    low_res: np.ndarray | None = None  # the last /v1/predict answer's (C, 256, 256) logits


class ImageStore:
    """Image id -> embedding for `/v1/predict`, least recently used dropped beyond `capacity`.
    Ids are random, so one client cannot probe for another's images."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, _StoredImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: _StoredImage) -> str:
        image_id = secrets.token_urlsafe(16)
        self._entries[image_id] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> _StoredImage | None:
        entry = self._entries.get(image_id)
        if entry is not None:
            self._entries.move_to_end(image_id)
        return entry
