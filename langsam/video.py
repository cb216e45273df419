"""Text-prompted video tracking: what the text names, followed through a video with stable ids.

Data flow per frame: the frame (decoded on demand by :func:`sam.video.open_frames`) -> on the
first frame and every ``detect_every``-th, Grounding DINO boxes for all queries in one pass ->
a detection that overlaps no tracked object starts a new object (a box prompt to SAM 2.1's
video predictor, a new id, its query as label) -> the predictor propagates every object to the
next frame from its memory -> per frame a :class:`TrackedFrame` (a
:class:`~langsam.result.Segmentation` plus the object ids).

The rules, with their defaults (all keyword arguments of :func:`track_video`):

* ``detect_every=10``: the detector runs on frames 0, N, 2N, ...
* ``new_object_iou=0.5``: a detection is a re-detection of a visible object (tracked, or started
  earlier on the same frame; best detector score first) when the IoU between its box and the
  bounding box of that object's mask is at least this, or else when the IoU between its
  box-prompted SAM mask and that object's mask is; the object then keeps its id. A detection
  that matches no visible object starts a new object.
* ``max_lost_frames=30``: an object whose object score says "absent" (logit <= 0) on more than
  this many consecutive frames ends: it is removed from the predictor, its id is never reused,
  and a later detection of the same thing starts a new object.

The result iterates lazily: frames are decoded, tracked and handed out one at a time, and the
predictor keeps a bounded window of memory (``keep_memory="window"``), so memory does not grow
with video length. :meth:`TrackedVideo.save` writes the outputs in the same single pass: a
YouTube-VIS style JSON, an overlay MP4 (one colour per id) and per-frame id-map PNGs.
"""

from __future__ import annotations

import colorsys
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from langsam.detector import parse_queries
from langsam.io import atomic_save_image, atomic_write_json, safe_join
from langsam.result import Segmentation, clip_boxes

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DETECT_EVERY",
    "DEFAULT_MAX_LOST_FRAMES",
    "DEFAULT_NEW_OBJECT_IOU",
    "OUTPUTS",
    "TrackInfo",
    "TrackedFrame",
    "TrackedVideo",
    "VideoJsonWriter",
    "MaskPngWriter",
    "OverlayVideoWriter",
    "render_overlay",
    "track_color",
    "track_video",
]

DEFAULT_DETECT_EVERY = 10
#: IoU (detection box vs a visible mask's bounding box, or the detection's box-prompted mask vs
#: a visible mask) at or above which a detection is the same object as a visible one.
DEFAULT_NEW_OBJECT_IOU = 0.5
#: Consecutive frames an object may be absent (object score logit <= 0) before it ends; about
#: one second at 30 fps, so a short occlusion does not end an object.
DEFAULT_MAX_LOST_FRAMES = 30
#: Frame rate written to the overlay when the source has none (a folder of images, an array).
DEFAULT_FPS = 25.0
#: What :meth:`TrackedVideo.save` can write.
OUTPUTS = ("json", "overlay", "masks")
JSON_NAME = "tracks.json"
OVERLAY_NAME = "overlay.mp4"
MASKS_DIR = "masks"
#: Version of the JSON layout (``info.format``).
JSON_FORMAT = 1


# ============================================================================================
# Results
# ============================================================================================


@dataclass(repr=False, eq=False)
class TrackedFrame:
    """The tracked objects visible on one frame.

    Attributes:
        frame_index: position of the frame in the video (0-based).
        obj_ids: ``(N,)`` int64 object ids, stable from frame to frame (row ``i`` of every
            array of ``segmentation`` belongs to ``obj_ids[i]``), in increasing order.
        segmentation: the objects as a :class:`~langsam.result.Segmentation` (masks ``(N, H, W)``
            bool in video pixels, boxes xyxy from the masks, ``labels`` the query that started
            each object, ``scores`` its best detector score so far, ``mask_scores`` SAM's
            object-presence probability on this frame) with the frame as ``image``.
    """

    frame_index: int
    obj_ids: np.ndarray
    segmentation: Segmentation

    def __post_init__(self) -> None:
        self.obj_ids = np.asarray(self.obj_ids, dtype=np.int64).reshape(-1)
        if self.obj_ids.shape[0] != len(self.segmentation):
            raise ValueError(f"obj_ids has {self.obj_ids.shape[0]} entries for {len(self.segmentation)} objects")

    def __len__(self) -> int:
        return len(self.segmentation)

    @property
    def masks(self) -> np.ndarray:
        return self.segmentation.masks

    @property
    def boxes(self) -> np.ndarray:
        return self.segmentation.boxes

    @property
    def labels(self) -> list[str]:
        return self.segmentation.labels

    @property
    def scores(self) -> np.ndarray:
        return self.segmentation.scores

    @property
    def image(self) -> np.ndarray | None:
        return self.segmentation.image

    def mask_of(self, obj_id: int) -> np.ndarray | None:
        """The ``(H, W)`` mask of object ``obj_id`` on this frame, or None if it is not visible."""
        rows = np.flatnonzero(self.obj_ids == int(obj_id))
        return self.segmentation.masks[rows[0]] if len(rows) else None

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{label}" for i, label in zip(self.obj_ids.tolist()[:6], self.labels[:6]))
        return f"TrackedFrame(frame_index={self.frame_index}, n={len(self)}, objects=[{shown}])"


@dataclass
class TrackInfo:
    """One tracked object, as known so far while the video is iterated.

    ``first_frame``/``last_frame``: first and last frame where it was visible; ``ended_at``: the
    frame on which it was removed for being lost too long (None while it lives); ``score``: its
    best detector score; ``detections``: how many detections matched it (the first included).
    """

    obj_id: int
    label: str
    score: float
    started_at: int
    first_frame: int | None = None
    last_frame: int | None = None
    ended_at: int | None = None
    detections: int = 1


# ============================================================================================
# The public entry point
# ============================================================================================


def track_video(
    langsam: Any,
    video: Any,
    text: str | Sequence[str],
    detect_every: int = DEFAULT_DETECT_EVERY,
    *,
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    new_object_iou: float = DEFAULT_NEW_OBJECT_IOU,
    max_lost_frames: int = DEFAULT_MAX_LOST_FRAMES,
    max_frames: int | None = None,
    max_side: int | None = None,
    offload_state_to_cpu: bool = False,
    video_predictor: Any = None,
    name: str | None = None,
) -> "TrackedVideo":
    """Track every object the text names through ``video``.

    Checks the inputs and opens the video now (so a bad file fails here, at once); the frames are
    decoded, detected and tracked only while the result is iterated.

    Args:
        langsam: a :class:`~langsam.pipeline.LangSAM` (or anything with its ``detector`` --
            ``detect(image, queries, box_threshold, text_threshold) -> Detections`` -- and its
            ``predictor``, a ``SamPredictor`` holding a SAM 2 / 2.1 model).
        video: a video file (decoded on demand with PyAV), a folder of JPEG/PNG frames, a
            ``(T, H, W, 3)`` uint8 RGB array or a list of such frames; anything
            :func:`sam.video.open_frames` takes, or a frame source it returned.
        text: queries, as for ``LangSAM.segment`` (``"a car. a person"`` or a list). Each new
            object is labelled with the query that found it.
        detect_every: run the detector on frames 0, N, 2N, ... (1: every frame).
        box_threshold, text_threshold: Grounding DINO thresholds.
        new_object_iou: a detection whose box (IoU with the bounding box of each visible mask)
            and whose box-prompted mask (IoU with each visible mask) both stay below this starts
            a new object (see the module docstring).
        max_lost_frames: an object absent on more than this many consecutive frames ends.
        max_frames: refuse videos with more frames (None: no limit).
        max_side: refuse videos whose longer side exceeds this many pixels (None: no limit).
        offload_state_to_cpu: keep the predictor's per-frame state in CPU memory (saves GPU memory).
        video_predictor: an object with ``SamVideoPredictor``'s methods to use instead of one built
            on ``langsam.predictor.model`` (tests, a predictor configured by hand).
        name: how errors name the video (default: the path, or "video").

    Returns:
        A :class:`TrackedVideo`: iterate it for one :class:`TrackedFrame` per frame, in order.

    Raises:
        ValueError: empty text, a parameter out of range, a model that is not SAM 2, or a video
            that cannot be read, has no frames, or is over ``max_frames`` / ``max_side``
            (``sam.video.VideoLoadError`` is a ValueError).
    """
    queries = parse_queries(text)
    _check_int("detect_every", detect_every, 1)
    _check_int("max_lost_frames", max_lost_frames, 0)
    for option, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold),
                          ("new_object_iou", new_object_iou)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{option} must be a number in [0, 1], got {value!r}")
    if max_frames is not None:
        _check_int("max_frames", max_frames, 1)
    if max_side is not None:
        _check_int("max_side", max_side, 1)
    if name is None:
        name = os.fspath(video) if isinstance(video, (str, os.PathLike)) else "video"
    frames = open_video(video, max_frames=max_frames, max_side=max_side, name=name)
    owns_frames = frames is not video
    try:
        if video_predictor is None:
            video_predictor = _build_video_predictor(langsam)
        detector = langsam.detector
    except BaseException:
        if owns_frames and hasattr(frames, "close"):
            frames.close()
        raise
    return TrackedVideo(
        frames=frames,
        queries=queries,
        detector=detector,
        predictor=video_predictor,
        detect_every=int(detect_every),
        box_threshold=float(box_threshold),
        text_threshold=float(text_threshold),
        new_object_iou=float(new_object_iou),
        max_lost_frames=int(max_lost_frames),
        offload_state_to_cpu=bool(offload_state_to_cpu),
        lock=getattr(langsam, "_lock", None),
        name=name,
        fps=_frame_rate(video, frames),
        owns_frames=owns_frames,
    )


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


def _check_int(option: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")


def _build_video_predictor(langsam: Any):
    predictor = langsam.predictor
    model = getattr(predictor, "model", predictor)
    if getattr(predictor, "family", getattr(model, "family", None)) != "sam2":
        sam_type = getattr(langsam, "sam_type", type(model).__name__)
        raise ValueError(f"video tracking needs a SAM 2 / 2.1 model (e.g. sam_type='sam2.1_hiera_small'); "
                         f"this pipeline has {sam_type!r}")
    from sam.video import SamVideoPredictor

    return SamVideoPredictor(model)


def _frame_rate(video: Any, frames: Any) -> float:
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


# ============================================================================================
# The tracker
# ============================================================================================


class TrackedVideo:
    """A lazy sequence of :class:`TrackedFrame`, one per video frame.

    Iterating runs the tracker: one frame is decoded, detected (every ``detect_every`` frames)
    and propagated at a time. Iterating again runs it again from the start (same result: the
    models are deterministic). :attr:`tracks` fills in while iterating.

    Attributes:
        num_frames, image_size ``(H, W)``, fps, queries, name: about the video and the run.
        tracks: ``{obj_id: TrackInfo}`` of every object started so far.
        detection_frames: the frames the detector ran on, so far.
    """

    def __init__(self, *, frames: Any, queries: list[str], detector: Any, predictor: Any, detect_every: int,
                 box_threshold: float, text_threshold: float, new_object_iou: float, max_lost_frames: int,
                 offload_state_to_cpu: bool, lock: Any, name: str, fps: float, owns_frames: bool = False) -> None:
        self.frames = frames
        self.queries = queries
        self.detector = detector
        self.predictor = predictor
        self.detect_every = detect_every
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.new_object_iou = new_object_iou
        self.max_lost_frames = max_lost_frames
        self.offload_state_to_cpu = offload_state_to_cpu
        self.name = name
        self.fps = fps
        self.num_frames = len(frames)
        self.image_size = (int(frames.height), int(frames.width))
        # The source's frame times (video files): the overlay keeps them, variable rates included.
        self.timestamps = getattr(frames, "timestamps", None)
        self.time_base = getattr(frames, "time_base", None)
        #: After :meth:`save` of a video that breaks part-way: the error (its ``frame_index`` is
        #: the first frame that did not decode); None otherwise.
        self.damage: ValueError | None = None
        self.tracks: dict[int, TrackInfo] = {}
        self.detection_frames: list[int] = []
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._owns_frames = owns_frames  # opened by track_video: closed after each pass (reopened on demand)

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        height, width = self.image_size
        return (f"TrackedVideo({self.name!r}, frames={self.num_frames}, size={width}x{height}, "
                f"queries={self.queries}, detect_every={self.detect_every})")

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the result (recorded in the JSON)."""
        return {"queries": list(self.queries), "detect_every": self.detect_every,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "new_object_iou": self.new_object_iou, "max_lost_frames": self.max_lost_frames}

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[TrackedFrame]:
        self.tracks = {}
        self.detection_frames = []
        run = None
        try:
            run = _TrackerRun(self)
            for index in range(self.num_frames):
                yield run.step(index)
        finally:
            if run is not None:
                run.close()
            if self._owns_frames and hasattr(self.frames, "close"):
                self.frames.close()

    # ---------------------------------------------------------------- outputs
    def save(self, directory: str | os.PathLike, outputs: Collection[str] = OUTPUTS, *,
             source_name: str | None = None, extra_info: Mapping[str, Any] | None = None,
             on_frame: Callable[[TrackedFrame], None] | None = None) -> dict[str, Path]:
        """Track the whole video once and write the outputs into ``directory`` (created).

        Files: ``tracks.json`` (YouTube-VIS style, see :class:`VideoJsonWriter`; written last,
        atomically), ``overlay.mp4`` (H.264, one colour per id, the source's frame times; moved
        into place when complete) and ``masks/NNNNNN.png`` (one id map per frame, see
        :class:`MaskPngWriter`).

        A video file or folder that breaks part-way (cut short, a damaged frame): the frames
        before the break are tracked and written (the JSON's ``length`` is their number and
        ``info.damaged`` says where and why), then its ``VideoLoadError`` is raised (also kept in
        :attr:`damage`), naming the frame. Any other error leaves no output behind.

        Args:
            outputs: any of ``"json"``, ``"overlay"``, ``"masks"``.
            source_name: the video's name in the JSON (default: :attr:`name`).
            extra_info: more keys for the JSON's ``info``.
            on_frame: called with each frame after it is written (progress bars).

        Returns:
            ``{output: path}`` of what was written.
        """
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUTS)}")
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
        writers: dict[str, Any] = {}
        self.damage = None
        try:
            if "overlay" in outputs:
                writers["overlay"] = OverlayVideoWriter(safe_join(root, OVERLAY_NAME), self.image_size, self.fps,
                                                        timestamps=self.timestamps, time_base=self.time_base)
            if "masks" in outputs:
                writers["masks"] = MaskPngWriter(safe_join(root, MASKS_DIR))
            if "json" in outputs:
                writers["json"] = VideoJsonWriter(safe_join(root, JSON_NAME), self, source_name=source_name,
                                                  extra_info=extra_info)
            try:
                for frame in self:
                    for writer in writers.values():
                        writer.add(frame)
                    if on_frame is not None:
                        on_frame(frame)
            except ValueError as error:
                if not getattr(error, "frame_index", None):  # only a source that broke after frame 0
                    raise
                self.damage = error
                logger.warning("%s: tracked and wrote the %d frames before the damage: %s", self.name,
                               error.frame_index, error)
            # The JSON goes last: a reader that finds it may trust the other files are complete.
            written = {output: writers[output].close() for output in ("overlay", "masks", "json") if output in writers}
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        if self.damage is not None:
            raise self.damage
        return written


class _TrackerRun:
    """One pass of the tracker over a video: the predictor state, the live objects and the
    propagation generator. ``step(index)`` handles frame ``index`` and must be called in order."""

    def __init__(self, video: TrackedVideo) -> None:
        self.video = video
        self.predictor = video.predictor
        self.state = self.predictor.init_state(video.frames, offload_state_to_cpu=video.offload_state_to_cpu,
                                               keep_memory="window")
        self.propagation: Iterator | None = None
        self.live: dict[int, int] = {}  # obj_id -> consecutive frames absent
        self.next_id = 1

    # ---------------------------------------------------------------- one frame
    def step(self, index: int) -> TrackedFrame:
        video = self.video
        image = _check_frame(video.frames[index], index, video.image_size, video.name)
        height, width = video.image_size
        obj_ids: list[int] = []
        masks = np.zeros((0, height, width), dtype=bool)
        presence: dict[int, float] = {}
        if self.propagation is not None:
            obj_ids, masks = self._next_propagated(index)
            presence = self._object_scores(index, obj_ids, masks)
        if index % video.detect_every == 0:
            obj_ids, masks, presence = self._detect(index, image, obj_ids, masks, presence)
        self._update_lost(index, obj_ids, presence)
        return self._frame(index, image, obj_ids, masks, presence)

    def _next_propagated(self, index: int) -> tuple[list[int], np.ndarray]:
        frame_idx, obj_ids, logits = next(self.propagation)
        if int(frame_idx) != index:
            raise RuntimeError(f"the video predictor returned frame {frame_idx} while frame {index} was expected")
        return [int(i) for i in obj_ids], _masks_from_logits(logits, self.video.image_size)

    def _object_scores(self, index: int, obj_ids: list[int], masks: np.ndarray) -> dict[int, float]:
        scores = self.predictor.object_scores(self.state, index)
        presence = {}
        for row, obj_id in enumerate(obj_ids):
            logit = scores.get(obj_id) if scores is not None else None
            # Without an object score, an empty mask is what "absent" looks like.
            presence[obj_id] = float(logit) if logit is not None else (1.0 if masks[row].any() else -1.0)
        return presence

    # ---------------------------------------------------------------- detection
    def _detect(self, index: int, image: np.ndarray, obj_ids: list[int], masks: np.ndarray,
                presence: dict[int, float]):
        """Run the detector on frame ``index``; start an object for each detection that matches no
        visible one (see :func:`track_video`). Returns the frame's ids, masks and presence."""
        video = self.video
        with video._lock:
            detections = video.detector.detect(image, video.queries, box_threshold=video.box_threshold,
                                               text_threshold=video.text_threshold)
        video.detection_frames.append(index)
        boxes = clip_boxes(detections.boxes, video.image_size) if len(detections) else np.zeros((0, 4), np.float32)
        scores = np.asarray(detections.scores, dtype=np.float32).reshape(-1)
        # What is visible now: (id, box of its mask, mask). A detection matching none is new.
        visible = [(obj_id, _mask_box(mask), mask) for obj_id, mask in zip(obj_ids, masks)
                   if presence.get(obj_id, 1.0) > 0 and mask.any()]
        added: dict[int, np.ndarray] = {}
        for order in np.argsort(-scores, kind="stable"):  # best first, so it wins against duplicates
            box = boxes[order]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # wholly outside the frame
            label, score = detections.labels[order], float(scores[order])
            # Cheap test first: the detection box against the boxes of the visible masks.
            matched = _best_match(box, [(obj_id, other) for obj_id, other, _ in visible], video.new_object_iou)
            if matched is None:
                obj_id, mask = self._prompt_box(index, box)
                # Then its box-prompted mask against the visible masks (a mask that covers only
                # part of its object has a smaller box than the detection).
                matched = _best_mask_match(mask, [(other_id, other) for other_id, _, other in visible],
                                           video.new_object_iou)
                if matched is not None:
                    self._withdraw(obj_id)
                else:
                    self._register(index, obj_id, label, score)
                    added[obj_id] = mask
                    # Later detections on this frame are compared with the new object too.
                    visible.append((obj_id, _mask_box(mask) if mask.any() else box, mask))
                    continue
            track = video.tracks[matched]
            track.score = max(track.score, score)
            track.detections += 1
        if not added:
            return obj_ids, masks, presence
        if self.propagation is None:
            # Nothing was being tracked: start propagating here; its first output is this frame.
            self.propagation = iter(self.predictor.propagate_in_video(self.state, start_frame_idx=index))
            obj_ids, masks = self._next_propagated(index)
        else:
            merged = {**dict(zip(obj_ids, masks)), **added}
            obj_ids = sorted(merged)
            masks = np.stack([merged[obj_id] for obj_id in obj_ids])
        return obj_ids, masks, self._object_scores(index, obj_ids, masks)

    def _prompt_box(self, index: int, box: np.ndarray) -> tuple[int, np.ndarray]:
        """Prompt the predictor with ``box`` on frame ``index`` as the next object id; returns the
        id and its box-prompted ``(H, W)`` mask (the object is not registered yet)."""
        obj_id = self.next_id
        _, answer_ids, logits = self.predictor.add_new_points_or_box(self.state, index, obj_id, box=box)
        answer_ids = [int(i) for i in answer_ids]
        if obj_id not in answer_ids:
            raise RuntimeError(f"the video predictor returned no mask for the new object {obj_id}")
        return obj_id, _masks_from_logits(logits, self.video.image_size)[answer_ids.index(obj_id)]

    def _withdraw(self, obj_id: int) -> None:
        """Take back a box prompt whose mask turned out to be a visible object's (the id is reused)."""
        self.predictor.remove_object(self.state, obj_id)

    def _register(self, index: int, obj_id: int, label: str, score: float) -> None:
        self.next_id = obj_id + 1
        self.live[obj_id] = 0
        self.video.tracks[obj_id] = TrackInfo(obj_id=obj_id, label=label, score=score, started_at=index)
        logger.debug("%s: frame %d: new object %d (%s, score %.3f)", self.video.name, index, obj_id, label, score)

    # ---------------------------------------------------------------- lost objects
    def _update_lost(self, index: int, obj_ids: list[int], presence: dict[int, float]) -> None:
        video = self.video
        for obj_id in obj_ids:
            if obj_id not in self.live:
                continue
            if presence.get(obj_id, -1.0) > 0:
                self.live[obj_id] = 0
            else:
                self.live[obj_id] += 1
        ended = [obj_id for obj_id, lost in self.live.items() if lost > video.max_lost_frames]
        for obj_id in ended:
            self.predictor.remove_object(self.state, obj_id)
            del self.live[obj_id]
            video.tracks[obj_id].ended_at = index
            logger.debug("%s: frame %d: object %d ended (absent for %d frames)", video.name, index, obj_id,
                         video.max_lost_frames + 1)
        if ended and not self.live:
            # Nothing left to track: stop propagating; the next detection starts afresh.
            self._stop()

    def _stop(self) -> None:
        if self.propagation is not None:
            close = getattr(self.propagation, "close", None)
            if close is not None:
                close()
            self.propagation = None
            self.predictor.reset_state(self.state)

    # ---------------------------------------------------------------- the frame's result
    def _frame(self, index: int, image: np.ndarray, obj_ids: list[int], masks: np.ndarray,
               presence: dict[int, float]) -> TrackedFrame:
        video = self.video
        keep = [row for row, obj_id in enumerate(obj_ids)
                if presence.get(obj_id, -1.0) > 0 and masks[row].any() and obj_id in video.tracks]
        kept_ids = [obj_ids[row] for row in keep]
        kept_masks = masks[keep] if keep else np.zeros((0, *video.image_size), dtype=bool)
        for obj_id in kept_ids:
            track = video.tracks[obj_id]
            if track.first_frame is None:
                track.first_frame = index
            track.last_frame = index
        segmentation = Segmentation(
            masks=kept_masks,
            boxes=np.array([_mask_box(mask) for mask in kept_masks], dtype=np.float32).reshape(-1, 4),
            scores=np.array([video.tracks[i].score for i in kept_ids], dtype=np.float32),
            mask_scores=np.array([_sigmoid(presence[i]) for i in kept_ids], dtype=np.float32),
            labels=[video.tracks[i].label for i in kept_ids],
            image_size=video.image_size,
            mode="grounded",
            image=image,
        )
        return TrackedFrame(frame_index=index, obj_ids=np.array(kept_ids, dtype=np.int64), segmentation=segmentation)

    def close(self) -> None:
        try:
            if self.propagation is not None:
                close = getattr(self.propagation, "close", None)
                if close is not None:
                    close()
                self.propagation = None
            self.predictor.reset_state(self.state)
        finally:
            self.state = None


# ============================================================================================
# Small helpers
# ============================================================================================


def _check_frame(frame: Any, index: int, image_size: tuple[int, int], name: str) -> np.ndarray:
    pixels = np.asarray(frame)
    height, width = image_size
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"{name}: frame {index} is not an RGB image ({pixels.shape} {pixels.dtype})")
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"{name}: frame {index} is {pixels.shape[1]}x{pixels.shape[0]} but the video started at "
                         f"{width}x{height}; all frames must have one size")
    return pixels


def _masks_from_logits(logits: Any, image_size: tuple[int, int]) -> np.ndarray:
    """``(O, 1, H, W)`` mask logits (torch or numpy) -> ``(O, H, W)`` bool, > 0 is the object."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    array = np.asarray(logits)
    if array.ndim == 4:
        array = array[:, 0]
    height, width = image_size
    if array.ndim != 3 or array.shape[1:] != (height, width):
        raise RuntimeError(f"the video predictor returned masks of shape {array.shape}, expected (O, 1, {height}, "
                           f"{width})")
    return array > 0


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box of a bool mask, in pixel-edge coordinates (a 1-pixel mask at (x, y) is
    ``[x, y, x + 1, y + 1]``); zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return np.zeros(4, dtype=np.float32)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with ``(K, 4)`` xyxy boxes -> ``(K,)``."""
    others = np.asarray(others, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _best_match(box: np.ndarray, visible: list[tuple[int, np.ndarray]], threshold: float) -> int | None:
    if not visible:
        return None
    ious = box_iou(box, np.stack([b for _, b in visible]))
    best = int(np.argmax(ious))
    return visible[best][0] if ious[best] >= threshold else None


def mask_iou(mask: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one ``(H, W)`` bool mask with ``(K, H, W)`` bool masks -> ``(K,)`` (0 where both are empty)."""
    others = np.asarray(others, dtype=bool).reshape(-1, *mask.shape)
    inter = (others & mask).sum(axis=(1, 2))
    union = (others | mask).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _best_mask_match(mask: np.ndarray, visible: list[tuple[int, np.ndarray]], threshold: float) -> int | None:
    if not visible or not mask.any():
        return None
    ious = mask_iou(mask, np.stack([m for _, m in visible]))
    best = int(np.argmax(ious))
    return visible[best][0] if ious[best] >= threshold else None


def _sigmoid(logit: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0))))


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
# Writers (one frame at a time)
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

    def __init__(self, path: str | os.PathLike, video: TrackedVideo, source_name: str | None = None,
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
        from fractions import Fraction

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
        self.folder.mkdir(parents=True, exist_ok=True)
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
        atomic_save_image(safe_join(self.folder, f"{frame.frame_index:06d}.png"), image)

    def close(self) -> Path:
        return self.folder

    def abort(self) -> None:
        pass
