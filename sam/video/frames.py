"""Streaming frame sources for the video predictor.

`open_frames(video)` turns a video file, a folder of images, a (T, H, W, 3) uint8 array or a
list of (H, W, 3) arrays into a `FrameSource`: `len()`, `height`, `width` and `source[i]` ->
(H, W, 3) uint8 RGB. Nothing decodes more than it is asked for: a folder opens one image per
request, a video file is decoded on demand with PyAV (sequential decoding when frames are
read in order, a keyframe seek otherwise, and a few recent frames cached). PyAV is chosen over
OpenCV because it is a thin, exact binding of FFmpeg with frame-accurate timestamps, ships
wheels with its own FFmpeg, and decodes straight to RGB24 without a BGR round trip.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


class VideoLoadError(ValueError):
    """A video (file, folder or array) that cannot be read as frames, said in plain words.

    frame_index: for a file or folder that breaks part-way (cut short, damaged), the first
    frame that cannot be decoded; the frames before it can still be read. None otherwise.
    """

    def __init__(self, message: str, frame_index: int | None = None) -> None:
        super().__init__(message)
        self.frame_index = frame_index


class FrameSource:
    """Random access to a video's frames, (H, W, 3) uint8 RGB, decoded on request."""

    height: int
    width: int
    #: Presentation times of the frames, in `time_base` units from the first frame (None when
    #: the source has no timing: a folder, an array). Variable frame rates show here.
    timestamps: Sequence[int] | None = None
    time_base: Fraction | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"frame index must be an int, got {type(index).__name__}")
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"frame index {index} is outside 0..{len(self) - 1}")
        frame = self._read(index)
        if frame.shape != (self.height, self.width, 3):
            raise VideoLoadError(
                f"frame {index} is {frame.shape[1]}x{frame.shape[0]} but the video's frames are "
                f"{self.width}x{self.height}; all frames must have the same size"
            )
        return frame

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def close(self) -> None:
        """Release open files (a no-op for in-memory sources)."""


def _as_rgb_uint8(frame: np.ndarray, what: str) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise VideoLoadError(f"{what} must be (H, W, 3) RGB, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise VideoLoadError(f"{what} must be uint8 RGB, got dtype {frame.dtype}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise VideoLoadError(f"{what} is empty ({frame.shape[1]}x{frame.shape[0]})")
    return frame


class ArrayFrames(FrameSource):
    """Frames already in memory: a (T, H, W, 3) uint8 array or a list of (H, W, 3) arrays."""

    def __init__(self, frames: np.ndarray | Sequence[np.ndarray]) -> None:
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise VideoLoadError(f"a video array must be (T, H, W, 3) uint8 RGB, got shape {frames.shape}")
            if frames.dtype != np.uint8:
                raise VideoLoadError(f"a video array must be uint8 RGB, got dtype {frames.dtype}")
        if len(frames) == 0:
            raise VideoLoadError("the video has zero frames")
        first = _as_rgb_uint8(frames[0], "frame 0")
        self._frames = frames
        self.height, self.width = first.shape[:2]
        if not isinstance(frames, np.ndarray):
            for index, frame in enumerate(frames):
                shape = np.shape(frame)
                if tuple(shape[:2]) != (self.height, self.width):
                    raise VideoLoadError(
                        f"frame {index} is {shape[1] if len(shape) > 1 else '?'}x{shape[0]} but frame 0 is "
                        f"{self.width}x{self.height}; all frames must have the same size"
                    )

    def __len__(self) -> int:
        return len(self._frames)

    def _read(self, index: int) -> np.ndarray:
        return _as_rgb_uint8(self._frames[index], f"frame {index}")


def _frame_number(path: Path) -> tuple[int, str]:
    """Sort key: the last run of digits in the file name (frame_10 after frame_9), then the name."""
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


class ImageFolderFrames(FrameSource):
    """A folder of JPEG/PNG frames, in the order of the number in each file name."""

    def __init__(self, folder: Path) -> None:
        paths = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise VideoLoadError(f"the folder {folder} has zero frames (no {'/'.join(IMAGE_SUFFIXES)} files)")
        self.paths = sorted(paths, key=_frame_number)
        self.folder = folder
        first = self._read(0)
        self.height, self.width = first.shape[:2]

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except UnidentifiedImageError as error:
            raise VideoLoadError(f"{self.folder}: cannot read frame {index} ({path.name}): not an image file",
                                 frame_index=index) from error
        except OSError as error:
            raise VideoLoadError(f"{self.folder}: cannot read frame {index} ({path.name}): "
                                 f"{error.strerror or error}", frame_index=index) from error


class VideoFileFrames(FrameSource):
    """A video file decoded on demand with PyAV, upright and with its frame times.

    Reading frames in order decodes each packet once; a jump backwards (or far ahead) seeks
    to the nearest keyframe before it and decodes forward. The last `cache_size` frames stay
    cached, so alternating between neighbouring frames costs nothing. Frames are turned to
    the orientation the file's display matrix asks for (a phone's rotation tag), as players
    show them, so masks and boxes are in the pixels a viewer sees.

    A file that is cut short or damaged part-way reads up to the last frame that decodes;
    from the first that does not, reads raise VideoLoadError naming that frame.
    """

    SEEK_AHEAD = 32  # decode forward rather than seek when the target is this close

    def __init__(self, path: Path, cache_size: int = 4) -> None:
        try:
            import av
        except ImportError as error:  # pragma: no cover - av is a dependency of video support
            raise VideoLoadError("reading video files needs PyAV: pip install av") from error
        self.path = path
        self._av = av
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = max(int(cache_size), 1)
        self._container = None
        self._packets: Iterator[Any] | None = None
        self._decoded: deque = deque()  # frames decoded from sent packets, not yet read
        self._next_index: int | None = 0
        self._damage: VideoLoadError | None = None  # the first frame that does not decode
        pts, self.time_base = self._scan()
        if not pts:
            raise VideoLoadError(f"{path}: the video has zero frames")
        self._pts = pts
        self.timestamps = [value - pts[0] for value in pts]
        first = self._read(0)
        self.height, self.width = first.shape[:2]

    def _open(self):
        try:
            container = self._av.open(str(self.path))
        except (self._av.error.FFmpegError, OSError) as error:
            raise VideoLoadError(f"{self.path}: cannot read the video: {_reason(error)}") from error
        if not container.streams.video:
            container.close()
            raise VideoLoadError(f"{self.path}: the file has no video stream")
        return container

    def _scan(self) -> tuple[list[int], Fraction | None]:
        """Each frame's presentation timestamp, in display order, from the packets (no decoding)."""
        container = self._open()
        try:
            stream = container.streams.video[0]
            timestamps = [packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size]
            time_base = stream.time_base
        except self._av.error.FFmpegError as error:
            raise VideoLoadError(f"{self.path}: cannot read the video: {_reason(error)}") from error
        finally:
            container.close()
        return sorted(timestamps), time_base

    def __len__(self) -> int:
        return len(self._pts)

    def _restart(self, index: int) -> None:
        """Position the decoder so that the next decoded frame is at or before `index`."""
        if self._container is None:
            self._container = self._open()
        stream = self._container.streams.video[0]
        self._container.seek(self._pts[index], stream=stream, backward=True, any_frame=False)
        self._packets = self._container.demux(stream)
        self._decoded.clear()
        self._next_index = None  # known again after the first decoded frame

    def _position(self, pts: int | None) -> int:
        if pts is not None:
            return int(np.searchsorted(self._pts, pts))
        return self._next_index if self._next_index is not None else 0

    def _damaged(self, index: int, reason: str) -> VideoLoadError:
        return VideoLoadError(
            f"{self.path}: cannot decode frame {index} of {len(self)}: the file is damaged or cut short there "
            f"({reason}); frames 0-{index - 1} decode" if index else
            f"{self.path}: cannot decode frame 0 of {len(self)}: the file is damaged ({reason})",
            frame_index=index,
        )

    def _decode_next(self) -> tuple[int, np.ndarray]:
        """The next frame in decoding order, as (its index, upright RGB pixels). Packets are
        sent one at a time, so a packet that does not decode names its own frame; the frames
        the decoder still holds from before it are drained first."""
        codec = self._container.streams.video[0].codec_context
        while not self._decoded:
            if self._packets is None:
                raise self._damage or self._damaged(self._next_index or 0, "the video ends early")
            try:
                packet = next(self._packets, None)
                self._decoded.extend(codec.decode(packet if packet is not None and packet.size else None))
                if packet is None or not packet.size:
                    self._packets = None  # drained: the end of the file
            except self._av.error.FFmpegError as error:
                bad = self._position(packet.pts if packet is not None else None)
                self._damage = self._damaged(bad, _reason(error))
                self._packets = None
                try:
                    self._decoded.extend(codec.decode(None))
                except self._av.error.FFmpegError:
                    pass
                if not self._decoded:
                    raise self._damage from error
        frame = self._decoded.popleft()
        position = self._position(frame.pts)
        self._next_index = position + 1
        pixels = frame.to_ndarray(format="rgb24")
        turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise quarter turns to display it
        return position, np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels

    def _read(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        if self._damage is not None and index >= self._damage.frame_index:
            raise self._damage
        ahead = self._next_index is not None and self._next_index <= index < self._next_index + self.SEEK_AHEAD
        if (self._packets is None and not self._decoded) or not ahead:
            self._restart(index)
        while True:
            try:
                position, frame = self._decode_next()
            except VideoLoadError as error:
                if error.frame_index is not None and error.frame_index <= index:
                    self._damage = error
                raise
            if position >= index:
                break
        self._cache[position] = frame
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if position != index:
            self._damage = self._damaged(index, "the frame is missing")
            raise self._damage
        return frame

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
            self._packets = None
            self._decoded.clear()
        self._cache.clear()


def _reason(error: Exception) -> str:
    """FFmpeg's words for an error, without the errno and file name PyAV adds."""
    return getattr(error, "strerror", None) or str(error)


def open_frames(
    video: str | Path | np.ndarray | Sequence[np.ndarray] | FrameSource,
    max_frames: int | None = None,
    max_pixels: int | None = None,
) -> FrameSource:
    """Open a video for streamed reading, checking it once here.

    video: a video file path (decoded on demand with PyAV), a folder of JPEG/PNG frames
    (sorted by the number in each name), a (T, H, W, 3) uint8 RGB array, a list of (H, W, 3)
    uint8 arrays, or an existing FrameSource. max_frames / max_pixels: limits on the number
    of frames and on H*W per frame (None: no limit).

    Raises VideoLoadError (a ValueError) for a missing or unreadable file, zero frames,
    frames of different sizes (checked up front for arrays and lists, on read for files and
    folders) and videos beyond the limits.
    """
    if isinstance(video, FrameSource):
        frames = video
    elif isinstance(video, (str, Path)):
        path = Path(video)
        if not path.exists():
            raise VideoLoadError(f"no such video file or folder: {path}")
        if path.is_dir():
            frames = ImageFolderFrames(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise VideoLoadError(f"{path} is a single image; pass a video file or a folder of frames")
        else:
            frames = VideoFileFrames(path)
    elif isinstance(video, (np.ndarray, list, tuple)):
        frames = ArrayFrames(video)
    else:
        raise VideoLoadError(
            f"cannot read a video from a {type(video).__name__}; pass a file path, a folder of frames, "
            "a (T, H, W, 3) uint8 array or a list of (H, W, 3) uint8 arrays"
        )
    if max_frames is not None and len(frames) > max_frames:
        frames.close()
        raise VideoLoadError(f"the video has {len(frames)} frames, more than the limit of {max_frames}")
    if max_pixels is not None and frames.height * frames.width > max_pixels:
        frames.close()
        raise VideoLoadError(
            f"the video's frames are {frames.width}x{frames.height} = {frames.width * frames.height} pixels, "
            f"more than the limit of {max_pixels}"
        )
    logger.debug("opened a video of %d frames, %dx%d", len(frames), frames.width, frames.height)
    return frames
