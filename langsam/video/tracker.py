"""The text-prompted tracker on SAM 2.1: :func:`track_video`, :class:`TrackedVideo` (the lazy
result) and the association rules that keep ids stable.

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
with video length. :meth:`TrackedVideo.save` writes the outputs in the same single pass
(:mod:`langsam.video.writers`: a YouTube-VIS style JSON, an overlay MP4, per-frame id maps).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from langsam.detector import parse_queries
from langsam.result import Segmentation, clip_boxes
from langsam.video.results import TrackedFrame, TrackInfo
from langsam.video.results import mask_box as _mask_box
from langsam.video.sources import check_frame, frame_rate, open_video
from langsam.video.writers import OUTPUTS, write_outputs

logger = logging.getLogger(__name__)

DEFAULT_DETECT_EVERY = 10
#: IoU (detection box vs a visible mask's bounding box, or the detection's box-prompted mask vs
#: a visible mask) at or above which a detection is the same object as a visible one.
DEFAULT_NEW_OBJECT_IOU = 0.5
#: Consecutive frames an object may be absent (object score logit <= 0) before it ends; about
#: one second at 30 fps, so a short occlusion does not end an object.
DEFAULT_MAX_LOST_FRAMES = 30


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
    detector: Any = None,
    name: str | None = None,
    association: str = "langsam",
    concept_predictor: Any = None,
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
        detector: an object with ``detect(image, queries, box_threshold, text_threshold)`` to use
            instead of ``langsam.detector`` (SAM 3: :class:`langsam.video.sam3.Sam3FrameDetector`).
        name: how errors name the video (default: the path, or "video").
        association: "langsam" (the rules above) or "sam3": SAM 3's own video inference
            (:mod:`sam.video.concept`) by ``concept_predictor`` (a ``Sam3ConceptVideoPredictor``;
            ``LangSAM.track(..., model="sam3", association="sam3")`` builds it): the detector runs on
            every frame, and ``detect_every``, ``text_threshold``, ``new_object_iou`` and
            ``max_lost_frames`` do not apply.

    Returns:
        A :class:`TrackedVideo`: iterate it for one :class:`TrackedFrame` per frame, in order.

    Raises:
        ValueError: empty text, a parameter out of range, a model that is not SAM 2, or a video
            that cannot be read, has no frames, or is over ``max_frames`` / ``max_side``
            (``sam.video.VideoLoadError`` is a ValueError).
    """
    queries = parse_queries(text)
    from langsam.video.sam3 import ASSOCIATIONS

    if association not in ASSOCIATIONS:
        raise ValueError(f"association must be one of {', '.join(ASSOCIATIONS)}, got {association!r}")
    if association == "sam3" and concept_predictor is None:
        raise ValueError("association='sam3' needs SAM 3's video inference: use LangSAM(model='sam3', "
                         "sam3_checkpoint=...).track(..., association='sam3') or pass concept_predictor")
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
        if video_predictor is None and association == "langsam":
            video_predictor = _build_video_predictor(langsam)
        if detector is None and association == "langsam":
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
        fps=frame_rate(video, frames),
        owns_frames=owns_frames,
        association=association,
        concept_predictor=concept_predictor,
    )


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
                 offload_state_to_cpu: bool, lock: Any, name: str, fps: float, owns_frames: bool = False,
                 association: str = "langsam", concept_predictor: Any = None) -> None:
        self.frames = frames
        self.queries = queries
        self.detector = detector
        self.predictor = predictor
        self.detect_every = detect_every
        self.association = association
        self.concept_predictor = concept_predictor
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
        if self.association == "sam3":
            from dataclasses import asdict

            return {"queries": list(self.queries), "association": "sam3",
                    **asdict(self.concept_predictor.config)}
        return {"queries": list(self.queries), "detect_every": self.detect_every,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "new_object_iou": self.new_object_iou, "max_lost_frames": self.max_lost_frames}

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[TrackedFrame]:
        self.tracks = {}
        self.detection_frames = []
        run = None
        try:
            if self.association == "sam3":
                from langsam.video.sam3 import Sam3ConceptRun

                run = Sam3ConceptRun(self)
            else:
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

        See :func:`langsam.video.writers.write_outputs`: ``tracks.json`` (YouTube-VIS style,
        written last, atomically), ``overlay.mp4`` (H.264, one colour per id, the source's frame
        times) and ``masks/NNNNNN.png`` (one id map per frame). A video that breaks part-way
        gets the outputs of the frames before the break, then its ``VideoLoadError`` is raised
        (also kept in :attr:`damage`), naming the frame. Any other error leaves no output.

        Args:
            outputs: any of ``"json"``, ``"overlay"``, ``"masks"``.
            source_name: the video's name in the JSON (default: :attr:`name`).
            extra_info: more keys for the JSON's ``info``.
            on_frame: called with each frame after it is written (progress bars).

        Returns:
            ``{output: path}`` of what was written.
        """
        return write_outputs(self, directory, outputs, source_name=source_name, extra_info=extra_info,
                             on_frame=on_frame)


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
        image = check_frame(video.frames[index], index, video.image_size, video.name)
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
# Association: is a detection a visible object, or a new one?
# ============================================================================================


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

