"""The tracking state of one video: small dataclasses with named fields.

A `VideoState` holds the frame source (frames are decoded on demand, never all at once), the
one-frame feature cache and, per object, an `ObjectTrack`: its prompts, its memory bank
(conditioning frames, the ones the user prompted, and tracked frames) and the outputs of
prompts not yet folded into the bank (`pending`). Objects never share tensors, which is what
makes them independent (SAM 2.1): adding, correcting or removing one leaves the others alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..sam2.memory import MemoryKeyCache
from ..sam2.model import FrameFeatures
from .frames import FrameSource

KeepMemory = Literal["all", "window"]


@dataclass
class FrameMemory:
    """One object's result on one frame, and what later frames read from it."""

    low_res_masks: torch.Tensor | None  # (1, 1, 4g, 4g) float logits, -1024 where absent (storage device)
    object_score_logits: torch.Tensor  # (1, 1); > 0: the object is present
    obj_ptr: torch.Tensor  # (1, C) object pointer
    maskmem_features: torch.Tensor | None = None  # (1, 64, g, g) bfloat16, None until encoded
    is_cond: bool = False  # a conditioning (prompted) frame

    def drop_memory(self) -> None:
        """Free the spatial memory and mask, keeping the pointer and score (window mode)."""
        self.maskmem_features = None
        self.low_res_masks = None


@dataclass
class PointPrompt:
    """Clicks (and box corners) on one frame, in the S x S model-input frame."""

    coords: torch.Tensor  # (1, N, 2) xy
    labels: torch.Tensor  # (1, N) int32: 1 positive, 0 negative, 2/3 box corners


@dataclass
class ObjectTrack:
    """Everything about one tracked object."""

    obj_id: int
    points: dict[int, PointPrompt] = field(default_factory=dict)  # frame -> clicks
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> (1, 1, S, S) 0/1 mask prompt
    cond: dict[int, FrameMemory] = field(default_factory=dict)  # conditioning frames
    tracked: dict[int, FrameMemory] = field(default_factory=dict)  # propagated (non-conditioning) frames
    pending: dict[int, FrameMemory] = field(default_factory=dict)  # prompt outputs not yet in the bank
    directions: dict[int, bool] = field(default_factory=dict)  # frame -> reverse? for frames visited
    # frame -> its memory's cross-attention keys (SamVideoPredictor(cache_memory_keys=True)),
    # only for the frames the last conditioned frame read; each checks its memory's identity
    key_caches: dict[int, MemoryKeyCache] = field(default_factory=dict)

    def output(self, frame_idx: int) -> FrameMemory | None:
        """The newest result on a frame: a pending prompt, else the bank."""
        for outputs in (self.pending, self.cond, self.tracked):
            if frame_idx in outputs:
                return outputs[frame_idx]
        return None

    def clear(self) -> None:
        for table in (self.points, self.masks, self.cond, self.tracked, self.pending, self.directions, self.key_caches):
            table.clear()


@dataclass
class CachedFeatures:
    frame_idx: int
    features: FrameFeatures


@dataclass
class VideoState:
    """The state of one video for `SamVideoPredictor`; make it with `init_state`."""

    frames: FrameSource
    video_height: int
    video_width: int
    device: torch.device
    storage_device: torch.device
    keep_memory: KeepMemory = "all"
    objects: dict[int, ObjectTrack] = field(default_factory=dict)  # insertion order = output order
    cache: CachedFeatures | None = None  # the last frame's image features (one entry)
    maskmem_pos_enc: torch.Tensor | None = None  # (1, 64, g, g): the same for every memory

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def obj_ids(self) -> list[int]:
        return list(self.objects)
