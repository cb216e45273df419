"""SAM 3 for :func:`langsam.video.track_video` (``LangSAM.track(..., model="sam3")``): SAM 3's
concept model finds the objects on the detection frames and SAM 3's own video tracker
(:class:`sam.sam3.tracker.Sam3Tracker`, on the same ViT) carries them between.

The association is the tracker's usual one (:mod:`langsam.video.tracker`: detect on frames 0, N,
2N, ...; a detection overlapping no visible object at ``new_object_iou`` starts an object; an
object absent for more than ``max_lost_frames`` ends), not Meta's per-frame SAM 3 video
association (hot-start, keep-alive counters, re-conditioning on detections), which is not
implemented here.
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
