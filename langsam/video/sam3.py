"""SAM 3 for :func:`langsam.video.track_video` (``LangSAM.track(..., model="sam3")``): SAM 3's
concept model finds the objects on the detection frames and SAM 3's own video tracker
(:class:`sam.sam3.tracker.Sam3Tracker`, on the same ViT) carries them between.

By default the association is the tracker's usual one (:mod:`langsam.video.tracker`: detect on
frames 0, N, 2N, ...; a detection overlapping no visible object at ``new_object_iou`` starts an
object; an object absent for more than ``max_lost_frames`` ends). With ``association="sam3"`` it is
SAM 3's own video inference (:mod:`sam.video.concept`: detection on every frame, hot-start,
keep-alive counters, re-conditioning on detections), run by :class:`Sam3ConceptRun`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from langsam.detector import Detections

#: SAM 3's own score threshold (presence x query probability), used as ``box_threshold``.
DEFAULT_SAM3_THRESHOLD = 0.5


class Sam3FrameDetector:
    """``detect(image, queries, box_threshold, text_threshold) -> Detections`` from a
    ``sam.sam3.Sam3Predictor``: every instance of each query whose score is at least
    ``box_threshold`` (``text_threshold`` has no meaning for SAM 3 and is ignored). Boxes in
    image pixels, labels the queries as written."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def detect(self, image: np.ndarray, queries: Sequence[str], box_threshold: float = DEFAULT_SAM3_THRESHOLD,
               text_threshold: float | None = None) -> Detections:
        del text_threshold
        queries = list(queries)
        if not image.flags.writeable:  # decoded frames may be read-only; torch.from_numpy warns on those
            image = image.copy()
        self.predictor.set_image(image)
        predictions = self.predictor.predict_many(queries, threshold=float(box_threshold))
        if not any(len(p) for p in predictions):
            return Detections.empty(queries)
        return Detections(
            boxes=np.concatenate([p.boxes for p in predictions]).astype(np.float32),
            scores=np.concatenate([p.scores for p in predictions]).astype(np.float32),
            labels=[label for p in predictions for label in p.labels],
            label_ids=np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(predictions)]),
            phrases=[label for p in predictions for label in p.labels],
            queries=queries,
        )


def sam3_video_predictor(concept: Any, checkpoint: Any) -> Any:
    """A ``sam.video.SamVideoPredictor`` on SAM 3's tracker: its weights from ``checkpoint`` (Meta's
    ``sam3.pt`` or the hub's combined file), run on ``concept``'s ViT (a ``sam.sam3.Sam3Predictor``:
    one copy of the weights, on its device)."""
    from sam.sam3.tracker import load_sam3_tracker
    from sam.video import SamVideoPredictor

    trunk = concept.model.backbone.vision_backbone.trunk
    return SamVideoPredictor(load_sam3_tracker(checkpoint, trunk=trunk).to(trunk.pos_embed.device))


#: How ``track_video`` associates detections with objects: langsam's rules (detect every N frames,
#: ``new_object_iou``, ``max_lost_frames``) or SAM 3's own video inference (``association="sam3"``).
ASSOCIATIONS = ("langsam", "sam3")


def sam3_concept_predictor(concept: Any, video_predictor: Any, box_threshold: float | None = None, *,
                           checkpoint: Any = None, **settings: Any) -> Any:
    """A ``sam.video.concept.Sam3ConceptVideoPredictor`` on ``concept``'s model (a
    ``sam.sam3.Sam3Predictor``) and ``video_predictor``'s SAM 3 tracker (on the same ViT). Its
    rules: those ``checkpoint``'s config.json records (a transformers ``Sam3VideoModel``
    directory; the released defaults otherwise), then ``settings`` (``ConceptTrackingConfig``
    fields), then ``box_threshold`` as the detection score threshold when given."""
    from sam.video.concept import ConceptTrackingConfig, Sam3ConceptVideoPredictor

    if box_threshold is not None:
        settings["score_threshold_detection"] = float(box_threshold)
    config = ConceptTrackingConfig.from_checkpoint(checkpoint, **settings)
    return Sam3ConceptVideoPredictor(concept.model, video_predictor.model, config)


class Sam3ConceptRun:
    """One pass of SAM 3's video inference over a ``TrackedVideo`` (``association="sam3"``):
    ``step(index)`` hands out frame ``index``'s objects as a ``TrackedFrame`` (called in order).
    SAM 3's ids (0, 1, ...) become 1, 2, ... (0 is the background of the id maps); an object's
    label is the query that found it, its score the detection score it started with, its
    ``mask_scores`` the tracker's presence probability on the frame."""

    def __init__(self, video: Any) -> None:
        self.video = video
        predictor = video.concept_predictor
        # No clicks come here, so nothing is cached: memory stays flat over a long video.
        self.state = predictor.init_state(video.frames, offload_state_to_cpu=video.offload_state_to_cpu,
                                          cache_results=False)
        for query in video.queries:
            predictor.add_text_prompt(self.state, query)
        self.frames = iter(predictor.propagate_in_video(self.state))

    def step(self, index: int) -> Any:
        from langsam.result import Segmentation
        from langsam.video.results import TrackedFrame, TrackInfo, mask_box
        from langsam.video.sources import check_frame

        video = self.video
        frame = next(self.frames)
        if frame.frame_idx != index:
            raise RuntimeError(f"SAM 3's video inference returned frame {frame.frame_idx} while frame {index} was expected")
        image = check_frame(frame.image, index, video.image_size, video.name)
        video.detection_frames.append(index)
        obj_ids = [obj_id + 1 for obj_id in frame.obj_ids]
        masks = frame.masks.numpy() if len(obj_ids) else np.zeros((0, *video.image_size), dtype=bool)
        for obj_id, label, score in zip(obj_ids, frame.labels, frame.scores.tolist()):
            track = video.tracks.get(obj_id)
            if track is None:
                track = video.tracks[obj_id] = TrackInfo(obj_id=obj_id, label=label, score=float(score), started_at=index,
                                                         first_frame=index)
            track.last_frame = index
        segmentation = Segmentation(
            masks=masks,
            boxes=np.array([mask_box(mask) for mask in masks], dtype=np.float32).reshape(-1, 4),
            scores=np.array([video.tracks[i].score for i in obj_ids], dtype=np.float32),
            mask_scores=frame.tracker_scores.numpy().astype(np.float32),
            labels=list(frame.labels),
            image_size=video.image_size,
            mode="grounded",
            image=image,
        )
        return TrackedFrame(frame_index=index, obj_ids=np.array(obj_ids, dtype=np.int64), segmentation=segmentation)

    def close(self) -> None:
        close = getattr(self.frames, "close", None)
        if close is not None:
            close()
        self.state = None
