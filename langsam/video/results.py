"""What a video tracker hands out: one :class:`TrackedFrame` per frame and one
:class:`TrackInfo` per object. Any tracker (SAM 2.1's today, SAM 3's later) yields these, so
the writers (:mod:`langsam.video.writers`) work for all of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from langsam.result import Segmentation


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


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box of a bool mask, in pixel-edge coordinates (a 1-pixel mask at (x, y) is
    ``[x, y, x + 1, y + 1]``); zeros for an empty mask. Every tracker's boxes come from this."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return np.zeros(4, dtype=np.float32)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)
