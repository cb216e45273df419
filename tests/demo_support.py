"""Shared by test_demo.py and test_browser.py: a LangSAM on tiny random models saved in the real
formats (official SAM .pth, a save_pretrained Grounding DINO folder, an open_clip state dict),
and a context manager that serves a demo app on 127.0.0.1."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from sam_factory import real_photo
from tiny_clip import save_tiny_clip
from tiny_gdino import save_tiny_grounding_dino

#: Upload limit the test apps run with, small so a test can exceed it cheaply.
TEST_MAX_FILE_SIZE = "1mb"
#: Display limit of the test apps: chelsea (451 x 300) is downscaled, a 200 x 150 crop is not.
TEST_MAX_DISPLAY_SIDE = 256


def tiny_model_settings(directory: Path, sam_checkpoint: Path) -> dict[str, str]:
    """LangSAM keyword arguments for tiny random models written under ``directory``."""
    detector_dir = save_tiny_grounding_dino(directory / "gdino", seed=0)
    clip_files = save_tiny_clip(directory / "clip", seed=0)
    return {
        "sam_type": "auto",
        "sam_checkpoint": str(sam_checkpoint),
        "detector": str(detector_dir),
        "clip_model": clip_files.model_name,
        "clip_pretrained": str(clip_files.weights_path),
        "device": "cpu",
    }


def save_photo(path: Path, name: str = "chelsea", crop: tuple[int, int] | None = None) -> np.ndarray:
    """Save a scikit-image photo (optionally its top-left ``crop`` = (H, W)) as PNG; return it."""
    image = real_photo(name)
    if crop is not None:
        image = np.ascontiguousarray(image[: crop[0], : crop[1]])
    Image.fromarray(image).save(path)
    return image


@contextlib.contextmanager
def serve(app, max_file_size: str = TEST_MAX_FILE_SIZE) -> Iterator[str]:
    """Launch ``app`` with the demo's own launch settings on a free port; yield its URL."""
    from langsam.demo import launch

    _, url, _ = launch(app, max_file_size=max_file_size, prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        app.close()
