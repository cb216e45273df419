"""Opening a video for a tracker: :func:`open_video` (``sam.video.open_frames`` with the
frame-count and size limits said in words), the frame rate of the source and the per-frame
check. Shared by every tracker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

#: Frame rate written to the overlay when the source has none (a folder of images, an array).
DEFAULT_FPS = 25.0


def open_video(video: Any, max_frames: int | None = None, max_side: int | None = None, name: str = "video"):
    """``sam.video.open_frames(video)`` with the frame-count and size limits checked, in words.

    Raises:
        ValueError: unreadable, zero frames, more than ``max_frames`` frames, or a side longer
            than ``max_side`` pixels.
    """
    if _is_frame_source(video):
        frames = video
    else:
        if isinstance(video, (str, os.PathLike)) and not Path(video).exists():
            raise ValueError(f"{name}: no such file or folder")
        from sam.video import open_frames

        frames = open_frames(video)
    count = len(frames)
    if count == 0:
        raise ValueError(f"{name}: the video has no frames")
    height, width = int(frames.height), int(frames.width)
    if max_frames is not None and count > max_frames:
        raise ValueError(f"{name}: the video has {count} frames, more than the limit of {max_frames} "
                         f"(raise the frame limit to allow it)")
    if max_side is not None and max(height, width) > max_side:
        raise ValueError(f"{name}: the video is {width}x{height} pixels; its longer side is over the limit of "
                         f"{max_side} (raise the size limit to allow it)")
    return frames


def _is_frame_source(video: Any) -> bool:
    return (not isinstance(video, (str, os.PathLike, np.ndarray, list, tuple))
            and hasattr(video, "__getitem__") and hasattr(video, "__len__") and hasattr(video, "height"))


def frame_rate(video: Any, frames: Any) -> float:
    """Frames per second of the source: the frame source's own, else the file's, else 25."""
    for attribute in ("fps", "frame_rate", "average_rate"):
        value = getattr(frames, attribute, None)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    path = video if isinstance(video, (str, os.PathLike)) else getattr(frames, "path", None)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        try:
            import av

            with av.open(os.fspath(path)) as container:
                rate = container.streams.video[0].average_rate
                if rate:
                    return float(rate)
        except Exception:  # the frame source read it already; a missing rate only changes the overlay's timing
            pass
    return DEFAULT_FPS


def check_frame(frame: Any, index: int, image_size: tuple[int, int], name: str) -> np.ndarray:
    pixels = np.asarray(frame)
    height, width = image_size
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"{name}: frame {index} is not an RGB image ({pixels.shape} {pixels.dtype})")
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"{name}: frame {index} is {pixels.shape[1]}x{pixels.shape[0]} but the video started at "
                         f"{width}x{height}; all frames must have one size")
    return pixels
