"""Writers of a tracked video's outputs, one frame at a time, and :func:`write_outputs`, which
runs a tracker once and feeds every writer: the per-video JSON in the YouTube-VIS layout
(:class:`VideoJsonWriter`), the overlay MP4 (:class:`OverlayVideoWriter`, drawn by
:func:`render_overlay` in :func:`track_color`) and per-frame id-map PNGs
(:class:`MaskPngWriter`). Nothing here knows how the frames were tracked: a tracked video is
anything that iterates :class:`~langsam.video.results.TrackedFrame` and has ``num_frames``,
``image_size``, ``fps``, ``timestamps``/``time_base`` (or None), ``queries``, ``tracks``
(``{obj_id: TrackInfo}``), ``detection_frames``, ``settings``, ``name`` and a ``damage``
attribute (set here). Every file is written atomically.
"""

from __future__ import annotations

import colorsys
import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from langsam.io import atomic_save_image, atomic_write_json, safe_join
from langsam.video.results import TrackedFrame
from langsam.video.sources import DEFAULT_FPS

logger = logging.getLogger(__name__)

#: What :func:`write_outputs` can write.
OUTPUTS = ("json", "overlay", "masks")
JSON_NAME = "tracks.json"
OVERLAY_NAME = "overlay.mp4"
MASKS_DIR = "masks"
#: Version of the JSON layout (``info.format``).
JSON_FORMAT = 1


def write_outputs(video: Any, directory: str | os.PathLike, outputs: Collection[str] = OUTPUTS, *,
                  source_name: str | None = None, extra_info: Mapping[str, Any] | None = None,
                  on_frame: Callable[[TrackedFrame], None] | None = None) -> dict[str, Path]:
    """Run ``video`` (a tracked video, see the module docstring) once and write ``outputs``
    (any of ``"json"``, ``"overlay"``, ``"masks"``) into ``directory`` (created): ``tracks.json``
    (written last, atomically: a reader that finds it may trust the rest is complete),
    ``overlay.mp4`` (moved into place when complete) and ``masks/NNNNNN.png``.

    A video that breaks part-way (a ``ValueError`` with a ``frame_index`` > 0 from its frame
    source: cut short, a damaged frame) gets the outputs of the frames before the break (the
    JSON's ``length`` is their number, ``info.damaged`` says where and why); then that error is
    raised, and kept in ``video.damage``. Any other error, or an interruption (Ctrl-C, SIGTERM),
    removes what was begun: the partial overlay, the frames' id maps, and ``directory`` if this
    call made it.

    source_name: the video's name in the JSON (default ``video.name``); extra_info: more keys
    for the JSON's ``info``; on_frame: called with each frame after it is written (progress).
    Returns ``{output: path}`` of what was written.
    """
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUTS)}")
    root = Path(directory)
    made_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    writers: dict[str, Any] = {}
    video.damage = None
    try:
        if "overlay" in outputs:
            writers["overlay"] = OverlayVideoWriter(safe_join(root, OVERLAY_NAME), video.image_size, video.fps,
                                                    timestamps=video.timestamps, time_base=video.time_base)
        if "masks" in outputs:
            writers["masks"] = MaskPngWriter(safe_join(root, MASKS_DIR))
        if "json" in outputs:
            writers["json"] = VideoJsonWriter(safe_join(root, JSON_NAME), video, source_name=source_name,
                                              extra_info=extra_info)
        try:
            for frame in video:
                for writer in writers.values():
                    writer.add(frame)
                if on_frame is not None:
                    on_frame(frame)
        except ValueError as error:
            if not getattr(error, "frame_index", None):  # only a source that broke after frame 0
                raise
            video.damage = error
            logger.warning("%s: tracked and wrote the %d frames before the damage: %s", video.name,
                           error.frame_index, error)
        # The JSON goes last: a reader that finds it may trust the other files are complete.
        written = {output: writers[output].close() for output in ("overlay", "masks", "json") if output in writers}
    except BaseException:  # an error, or Ctrl-C / SIGTERM: nothing half written stays
        for writer in writers.values():
            writer.abort()
        if made_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty
        raise
    if video.damage is not None:
        raise video.damage
    return written


def track_color(obj_id: int) -> tuple[int, int, int]:
    """The RGB colour of object ``obj_id``: the same id always gets the same colour, and
    golden-ratio hue steps keep consecutive ids far apart on the colour wheel."""
    hue = (int(obj_id) * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (round(red * 255), round(green * 255), round(blue * 255))


def render_overlay(frame: TrackedFrame, alpha: float = 0.5, draw_labels: bool = True) -> np.ndarray:
    """The frame with each object's mask tinted in :func:`track_color` of its id, its box
    outlined in the same colour and ``id label`` written above the box.

    Inside a mask (away from the box outline and the text) a pixel is exactly
    ``round((1 - alpha) * pixel + alpha * colour)``; where masks overlap, the higher id is on top.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    if frame.image is None:
        raise ValueError("the frame holds no image to draw on")
    pixels = frame.image.astype(np.float32)
    for obj_id, mask in zip(frame.obj_ids.tolist(), frame.masks):
        color = np.array(track_color(obj_id), dtype=np.float32)
        pixels[mask] = frame.image[mask].astype(np.float32) * (1.0 - alpha) + color * alpha
    canvas = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if draw_labels and len(frame):
        draw = ImageDraw.Draw(canvas)
        line = max(1, round(max(frame.segmentation.image_size) / 400))
        for obj_id, box, label in zip(frame.obj_ids.tolist(), frame.boxes, frame.labels):
            color = track_color(obj_id)
            x0, y0, x1, y1 = (float(v) for v in box)
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=line)
            draw.text((x0 + 2, max(0.0, y0 - 11)), f"{obj_id} {label}", fill=color)
    return np.asarray(canvas)


# ============================================================================================
# Writers (one frame at a time; ``add`` each frame, then ``close``, or ``abort`` on failure)
# ============================================================================================


class VideoJsonWriter:
    """The per-video JSON, in the YouTube-VIS layout (one video; ``annotations`` one per object).

    ``videos[0]``: ``id``, ``file_name``, ``height``, ``width``, ``length`` (frames), ``fps``.
    ``categories``: one per query (``id`` from 1 in query order, ``name`` the query).
    ``annotations``: one per object: ``id`` (the object id), ``video_id``, ``category_id``,
    ``label``, ``score`` (best detector score), ``iscrowd`` 0, ``first_frame``, ``last_frame``,
    ``ended_at``, and per frame (lists of ``length``) ``segmentations`` (COCO compressed RLE,
    ``{"size": [H, W], "counts": str}``, or null where the object is not visible), ``bboxes``
    (``[x, y, w, h]`` or null), ``areas`` (pixels or null) and ``presence`` (SAM's object-presence
    probability or null). ``info`` holds the settings and the frames the detector ran on, and
    for a video that broke part-way ``damaged`` (``first_bad_frame``, ``listed_frames``,
    ``error``); ``length`` is then the number of frames before the break.
    Only RLE strings are kept in memory; the file is written once, atomically, on :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, video: Any, source_name: str | None = None,
                 extra_info: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.video = video
        self.source_name = source_name if source_name is not None else video.name
        self.extra_info = dict(extra_info or {})
        self.objects: dict[int, dict[str, list]] = {}

    def add(self, frame: TrackedFrame) -> None:
        from pycocotools import mask as mask_utils

        if len(frame) == 0:
            return
        length = self.video.num_frames
        rles = mask_utils.encode(np.asfortranarray(frame.masks.transpose(1, 2, 0).astype(np.uint8)))
        for row, obj_id in enumerate(frame.obj_ids.tolist()):
            record = self.objects.get(obj_id)
            if record is None:
                record = self.objects[obj_id] = {key: [None] * length
                                                 for key in ("segmentations", "bboxes", "areas", "presence")}
            x0, y0, x1, y1 = (float(v) for v in frame.boxes[row])
            index = frame.frame_index
            record["segmentations"][index] = {"size": [int(s) for s in rles[row]["size"]],
                                              "counts": rles[row]["counts"].decode("ascii")}
            record["bboxes"][index] = [x0, y0, x1 - x0, y1 - y0]
            record["areas"][index] = int(frame.masks[row].sum())
            record["presence"][index] = round(float(frame.segmentation.mask_scores[row]), 6)

    def document(self) -> dict[str, Any]:
        video = self.video
        category_ids = {query: number for number, query in enumerate(video.queries, start=1)}
        height, width = video.image_size
        damage = video.damage
        length = damage.frame_index if damage is not None else video.num_frames
        info_damage = {} if damage is None else {
            "damaged": {"first_bad_frame": damage.frame_index, "listed_frames": video.num_frames, "error": str(damage)}
        }
        annotations = []
        for obj_id in sorted(self.objects):
            track = video.tracks[obj_id]
            annotations.append({
                "id": obj_id,
                "video_id": 1,
                "category_id": category_ids.get(track.label, 0),
                "label": track.label,
                "score": float(track.score),
                "iscrowd": 0,
                "first_frame": track.first_frame,
                "last_frame": track.last_frame,
                "ended_at": track.ended_at,
                "height": height,
                "width": width,
                "length": length,
                **{key: values[:length] for key, values in self.objects[obj_id].items()},
            })
        return {
            "info": {"description": "langsam track (YouTube-VIS layout)", "format": JSON_FORMAT,
                     "settings": video.settings, "detection_frames": list(video.detection_frames),
                     **info_damage, **self.extra_info},
            "videos": [{"id": 1, "file_name": self.source_name, "height": height, "width": width,
                        "length": length, "fps": video.fps}],
            "categories": [{"id": number, "name": query, "supercategory": "query"}
                           for query, number in category_ids.items()],
            "annotations": annotations,
        }

    def close(self) -> Path:
        atomic_write_json(self.path, self.document(), indent=None)
        return self.path

    def abort(self) -> None:
        pass


class OverlayVideoWriter:
    """An H.264 MP4 (yuv420p, PyAV) of :func:`render_overlay` frames, written to a temporary
    file next to ``path`` and moved into place by :meth:`close`. Odd frame sizes are padded by
    one black row / column (yuv420p needs even sizes).

    With ``timestamps`` (the source's frame times in ``time_base`` units, as a video file's
    frame source gives them) each frame keeps its source time, so a variable frame rate stays
    as it was; without, frames are ``1 / fps`` apart. Frames are written upright (the frame
    source already applied any rotation tag), so the file needs no display matrix."""

    def __init__(self, path: str | os.PathLike, image_size: tuple[int, int], fps: float = DEFAULT_FPS,
                 crf: int = 18, *, timestamps: Sequence[int] | None = None, time_base: Any = None) -> None:
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        height, width = image_size
        self.size = (height + height % 2, width + width % 2)
        self.container = av.open(os.fspath(self.temp), mode="w", format="mp4")
        try:
            rate = Fraction(fps).limit_denominator(1001)
            self.stream = self.container.add_stream("libx264", rate=rate)
            self.stream.height, self.stream.width = self.size
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"preset": "veryfast", "crf": str(crf)}
            self.timestamps = None
            if timestamps is not None and time_base and all(b > a for a, b in zip(timestamps, timestamps[1:])):
                self.timestamps, self.time_base = list(timestamps), Fraction(time_base)
                self.stream.codec_context.time_base = self.time_base
                self.stream.time_base = self.time_base
        except BaseException:
            self.abort()
            raise
        self.frames = 0

    def add(self, frame: TrackedFrame) -> None:
        import av

        pixels = render_overlay(frame)
        if pixels.shape[:2] != self.size:
            padded = np.zeros((*self.size, 3), dtype=np.uint8)
            padded[: pixels.shape[0], : pixels.shape[1]] = pixels
            pixels = padded
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        if self.timestamps is not None:
            video_frame.pts, video_frame.time_base = self.timestamps[frame.frame_index], self.time_base
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            os.replace(self.temp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
        self.temp.unlink(missing_ok=True)


class MaskPngWriter:
    """Per-frame id maps, ``<folder>/NNNNNN.png`` (frame number, 6 digits): pixel value = object
    id, 0 = background (the DAVIS layout, as a palette PNG whose palette is :func:`track_color`).
    Where masks overlap, the higher id wins. Frames of videos with ids above 255 are 16-bit
    grayscale PNGs. Each file is written atomically."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._written: list[Path] = []
        self._palette = [0, 0, 0] + [channel for obj_id in range(1, 256) for channel in track_color(obj_id)]

    def add(self, frame: TrackedFrame) -> None:
        height, width = frame.segmentation.image_size
        top = int(frame.obj_ids.max()) if len(frame) else 0
        ids = np.zeros((height, width), dtype=np.uint16 if top > 255 else np.uint8)
        for obj_id, mask in sorted(zip(frame.obj_ids.tolist(), frame.masks), key=lambda pair: pair[0]):
            ids[mask] = obj_id
        if ids.dtype == np.uint8:
            image = Image.frombytes("P", (width, height), ids.tobytes())
            image.putpalette(self._palette)
        else:
            image = Image.fromarray(ids)
        path = safe_join(self.folder, f"{frame.frame_index:06d}.png")
        atomic_save_image(path, image)
        self._written.append(path)

    def close(self) -> Path:
        return self.folder

    def abort(self) -> None:
        """Remove the frames written so far (and the folder, if this writer made it and it is
        now empty): an interrupted video leaves no partial set of id maps."""
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written.clear()
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()
