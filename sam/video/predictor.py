"""SAM 2.1 video predictor: prompts on some frames, masks on every frame, frames streamed.

The API is the reference's, names, positional order, defaults and return values
(`init_state`, `add_new_points_or_box`, `add_new_points`, `add_new_mask`,
`propagate_in_video_preflight`, `propagate_in_video`, `clear_all_prompts_in_frame`,
`remove_object`, `reset_state`; the `non_overlap_masks` option), and so are the numbers, on
the same weights; our additions (`keep_memory`, frame limits, `object_scores`) are keywords
the reference does not have. What differs is the bookkeeping: frames are decoded one at a time from a
`FrameSource` (the reference decodes and resizes every frame up front), image features are
cached for one frame, and with keep_memory="window" the memory bank only keeps what later
frames can still read, so memory stays flat however long the video.

A tracked frame goes through these steps, one method each:
  `_frame_features`   decode, resize to S x S, image encoder (cached for one frame);
  `_select_memory`    which conditioning/recent memories and object pointers it attends to;
  `_infer_frame`      memory attention (or no_mem_embed on a first frame), prompt encoder
                      and mask decoder, and, when tracking, the memory encoder;
  `_track_frame`      the same heads for several objects on one frame in one batch (SAM 3's
                      concept video: objects whose memory banks line up share the passes);
  `_commit_pending`   prompt outputs get their memory and join the bank (the reference's
                      "preflight"), before propagation and before every propagated frame;
  `_forget`           (window mode) memories no later frame can reach are dropped.

Objects are independent (SAM 2.1): each has its own memory bank and is decoded on its own.
So while a `propagate_in_video` generator is suspended after yielding frame f, a NEW object
can be prompted on frame f (`add_new_points_or_box` / `add_new_mask`) or an object removed;
the generator continues at the next frame with the new object included, exactly as if that
object had been prompted on f and propagated from f on its own. (A prompt for an object
already tracked on f is a correction of f; frames after f then attend to the corrected
memory.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..sam2.memory import MemoryKeyCache
from ..sam2.model import NO_OBJECT_LOGIT, FrameFeatures, Sam2, TrackOutput
from .frames import FrameSource, open_frames
from .state import CachedFeatures, FrameMemory, ObjectTrack, PointPrompt, VideoState

logger = logging.getLogger(__name__)

FrameResult = tuple[int, list[int], torch.Tensor]


class SamVideoPredictor:
    """Track objects through a video with a SAM 2 / 2.1 model (`sam.Sam2`).

    Options as the reference's video predictor (build_sam2_video_predictor's defaults):
    binarize_mask_from_pts_for_mem_enc: prompted frames enter the memory as the 0/1 mask the
    user sees; add_all_frames_to_correct_as_cond: a correction on an already tracked frame
    makes it a conditioning frame (default False: it stays a tracked frame, and re-propagating
    through that frame recomputes it); fill_hole_area: fill background holes of at most this
    many low-res pixels in the output masks (the reference's CUDA extension does this on
    GPU; on CPU the reference skips it, hence 0 here by default); non_overlap_masks: where
    objects overlap in an output, only the highest-scoring one keeps a positive logit (the
    others are clamped to -10), in every returned mask; the memory is not affected;
    refine_with_previous_mask: a click on a frame that already has a result for the object
    refines that result (its low-res logits go in as the mask prompt), as Meta's SAM 2 and
    SAM 3 predictors do; transformers' Sam2VideoModel / Sam3TrackerVideoModel start afresh
    from the clicks alone (False).

    cache_memory_keys (ours): keep each memory frame's projected, rotated cross-attention keys
    while later frames read it, and only correct them for the frame's distance (exact, see
    `MemoryAttention.assemble_keys`). It skips the bank's key projections on every frame, but
    measured on one CPU thread (SAM 2.1 tiny, 8 frames, up to 7 memories) it gains nothing
    (8.81 vs 8.71 s per frame, noise: the keys must still be copied into the bank's key tensor
    with their temporal term) and holds 16 MB per memory frame and object (112 MB per object
    with 7 memories), hence off by default; it may pay where projections cost more.

    SAM 3's tracker (`sam.sam3.tracker.Sam3Tracker`, a `Sam2`) runs here unchanged; see
    `SamVideoPredictor.from_sam3`.
    """

    def __init__(
        self,
        model: Sam2,
        *,
        fill_hole_area: int = 0,
        non_overlap_masks: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
        binarize_mask_from_pts_for_mem_enc: bool = True,
        refine_with_previous_mask: bool = True,
        cache_memory_keys: bool = False,
    ) -> None:
        if not isinstance(model, Sam2):
            raise ValueError(f"SamVideoPredictor needs a SAM 2 model (sam.Sam2), got {type(model).__name__}")
        self.model = model.eval()
        self.fill_hole_area = int(fill_hole_area)
        self.non_overlap_masks = bool(non_overlap_masks)
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.binarize_mask_from_pts_for_mem_enc = binarize_mask_from_pts_for_mem_enc
        self.refine_with_previous_mask = bool(refine_with_previous_mask)
        self.cache_memory_keys = bool(cache_memory_keys)

    @classmethod
    def from_checkpoint(
        cls, model_type: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> "SamVideoPredictor":
        """Build the model with `sam.build_sam(model_type, checkpoint, **overrides)` on `device`."""
        from ..build import build_sam

        model = build_sam(model_type, checkpoint, **overrides)
        if not isinstance(model, Sam2):
            raise ValueError(f"{model_type!r} is a SAM 1 model; video tracking needs SAM 2 / 2.1")
        return cls(model.to(device))

    @classmethod
    def from_sam3(
        cls, checkpoint: str | Path, device: str | torch.device = "cpu", *, memory_mask_resize: str = "mask",
        **options: Any,
    ) -> "SamVideoPredictor":
        """SAM 3's video tracker from Meta's `sam3.pt`, a transformers `Sam3TrackerVideoModel`
        directory or the hub's combined file (`sam.sam3.tracker.load_sam3_tracker`), on
        `device`; memory_mask_resize "mask" (Meta's order, default) or "logits" (transformers');
        `options` as the constructor's."""
        from ..sam3.tracker import load_sam3_tracker

        return cls(load_sam3_tracker(checkpoint, memory_mask_resize).to(device), **options)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    # ------------------------------------------------------------------ state
    def init_state(
        self,
        video_path: str | Path | np.ndarray | Sequence[np.ndarray] | FrameSource,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        async_loading_frames: bool = False,
        *,
        keep_memory: str = "all",
        max_frames: int | None = None,
        max_pixels: int | None = None,
    ) -> VideoState:
        """Open a video (anything `open_frames` reads: a file, a folder of frames, a
        (T, H, W, 3) uint8 array, a list of frames) for tracking; nothing is decoded yet.

        offload_video_to_cpu, async_loading_frames: accepted for the reference's callers and
        nothing to do here: frames are always decoded on the CPU, one at a time, when reached.
        offload_state_to_cpu: keep memories and masks on the CPU when the model is on a GPU.
        keep_memory (keyword): "all" keeps every frame's memory (corrections and reverse
        propagation behave as the reference); "window" keeps only what later frames can still
        attend to (conditioning frames, the last num_maskmem - 1 tracked memories, pointers of
        the last max_obj_ptrs_in_encoder - 1 frames), so memory does not grow with video length.
        max_frames / max_pixels (keywords): limits passed to `open_frames`.
        """
        if keep_memory not in ("all", "window"):
            raise ValueError(f"keep_memory must be 'all' or 'window', got {keep_memory!r}")
        frames = open_frames(video_path, max_frames=max_frames, max_pixels=max_pixels)
        device = self.model.device
        return VideoState(
            frames=frames,
            video_height=frames.height,
            video_width=frames.width,
            device=device,
            storage_device=torch.device("cpu") if offload_state_to_cpu else device,
            keep_memory=keep_memory,  # type: ignore[arg-type]
        )

    def reset_state(self, inference_state: VideoState) -> None:
        """Forget every object and prompt (the frames stay open)."""
        inference_state.objects.clear()

    def remove_object(
        self, inference_state: VideoState, obj_id: int, strict: bool = False, need_output: bool = True
    ) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        """Drop an object and its memory. Returns the remaining ids and, when need_output, for
        each frame the object was prompted on, (frame_idx, masks (num_remaining, 1, H, W)
        logits at video res) of the remaining objects. An unknown id does nothing (returns
        (ids, [])) unless strict=True, which raises ValueError."""
        state = inference_state
        obj_id = self._check_obj_id(obj_id)
        if strict:
            self._known_track(state, obj_id)
        track = state.objects.pop(obj_id, None)
        if track is None:
            return state.obj_ids, []
        if not need_output:
            return state.obj_ids, []
        frames = sorted(set(track.points) | set(track.masks))
        with torch.inference_mode():
            updated = [(frame_idx, self._video_masks_at(state, frame_idx)) for frame_idx in frames if state.objects]
        return state.obj_ids, updated

    def clear_all_prompts_in_frame(
        self, inference_state: VideoState, frame_idx: int, obj_id: int, need_output: bool = True
    ) -> FrameResult | None:
        """Remove one object's clicks, box and mask on one frame. Its result there, if the
        frame was a conditioning frame, stays as a tracked (non-conditioning) result, and the
        frame counts as not yet visited, so a new prompt there starts afresh. Returns
        (frame_idx, obj_ids, masks) as add_new_points_or_box, or None when need_output=False."""
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        obj_id = self._check_obj_id(obj_id)
        track = self._known_track(state, obj_id)
        track.points.pop(frame_idx, None)
        track.masks.pop(frame_idx, None)
        track.pending.pop(frame_idx, None)
        output = track.cond.pop(frame_idx, None)
        if output is not None:
            output.is_cond = False
            track.tracked[frame_idx] = output
            track.directions.pop(frame_idx, None)
        if not need_output:
            return None
        with torch.inference_mode():
            return frame_idx, state.obj_ids, self._video_masks_at(state, frame_idx)

    # ------------------------------------------------------------------ prompts
    def add_new_points_or_box(
        self,
        inference_state: VideoState,
        frame_idx: int,
        obj_id: int,
        points: Any = None,
        labels: Any = None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box: Any = None,
    ) -> FrameResult:
        """Clicks and/or a box for one object on one frame.

        points: (N, 2) xy with labels: (N,) 1 positive / 0 negative; box: (4,) xyxy. With
        normalize_coords=True (default) coordinates are video pixels; with False they are
        already relative, in [0, 1] of the width and height (as in the reference).
        clear_old_points=False appends the clicks to this object's earlier ones on the frame.
        points may also be torch tensors, with a leading batch of one ((1, N, 2), (1, N)).
        Returns (frame_idx, obj_ids, masks): float logits (num_objects, 1, H, W) at video
        resolution for every object on this frame.
        """
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        obj_id = self._check_obj_id(obj_id)
        coords, point_labels = self._prompt_tensors(points, labels, box, clear_old_points)
        if normalize_coords:
            coords = coords / torch.tensor([state.video_width, state.video_height], dtype=torch.float32)
        coords = coords * self.image_size  # the S x S model-input frame
        coords, point_labels = coords.to(state.device), point_labels.to(state.device)

        track = self._track_for(state, obj_id)
        previous = track.points.get(frame_idx) if not clear_old_points else None
        if previous is not None:
            coords = torch.cat([previous.coords, coords], dim=1)
            point_labels = torch.cat([previous.labels, point_labels], dim=1)
        prompt = PointPrompt(coords, point_labels)
        track.points[frame_idx] = prompt
        track.masks.pop(frame_idx, None)

        is_init_cond_frame = frame_idx not in track.directions
        reverse = track.directions.get(frame_idx, False)
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        with torch.inference_mode():
            prev_logits = None
            if self.refine_with_previous_mask:
                prev_logits = self._previous_logits(track, frame_idx, is_cond, state.device)
            output = self._infer_frame(
                state, track, frame_idx, is_init_cond_frame, reverse,
                points=prompt, mask=None, prev_logits=prev_logits, encode_memory=False,
            )
            output.is_cond = is_cond
            track.pending[frame_idx] = output
            return frame_idx, state.obj_ids, self._video_masks_at(state, frame_idx)

    def add_new_points(self, *args: Any, **kwargs: Any) -> FrameResult:
        """The reference's older name of `add_new_points_or_box`."""
        return self.add_new_points_or_box(*args, **kwargs)

    def add_new_mask(self, inference_state: VideoState, frame_idx: int, obj_id: int, mask: Any) -> FrameResult:
        """A mask prompt (H', W') bool/0-1 for one object on one frame (any size; it is
        resized to S x S with antialiasing and thresholded at 0.5). The mask is taken as the
        answer on that frame. Returns (frame_idx, obj_ids, masks) as add_new_points_or_box."""
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        obj_id = self._check_obj_id(obj_id)
        mask_tensor = self._mask_tensor(mask).to(state.device)
        size = self.image_size
        if tuple(mask_tensor.shape[-2:]) != (size, size):
            mask_tensor = F.interpolate(mask_tensor, (size, size), mode="bilinear", align_corners=False, antialias=True)
            mask_tensor = (mask_tensor >= 0.5).float()
        track = self._track_for(state, obj_id)
        track.masks[frame_idx] = mask_tensor
        track.points.pop(frame_idx, None)
        is_init_cond_frame = frame_idx not in track.directions
        reverse = track.directions.get(frame_idx, False)
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        with torch.inference_mode():
            output = self._infer_frame(
                state, track, frame_idx, is_init_cond_frame, reverse,
                points=None, mask=mask_tensor, prev_logits=None, encode_memory=False,
            )
            output.is_cond = is_cond
            track.pending[frame_idx] = output
            return frame_idx, state.obj_ids, self._video_masks_at(state, frame_idx)

    # ------------------------------------------------------------------ propagation
    def propagate_in_video_preflight(self, inference_state: VideoState) -> None:
        """Fold the prompts given so far into the memory bank (propagate_in_video does this
        itself; the reference exposes it, so do we). Raises ValueError without objects."""
        with torch.inference_mode():
            self._commit_pending(inference_state)

    def propagate_in_video(
        self,
        inference_state: VideoState,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[FrameResult]:
        """Track every object from `start_frame_idx` (default: the first prompted frame)
        forwards (or backwards with reverse=True) over at most max_frame_num_to_track + 1
        frames. Yields (frame_idx, obj_ids, masks (num_objects, 1, H, W) float logits at video
        resolution), one frame at a time; frames are decoded as they are reached.

        Between two frames the caller may prompt a new object on the frame just yielded (or
        remove one); it joins from the next frame on. Arguments are checked here, before the
        first frame is computed.
        """
        state = inference_state
        with torch.inference_mode():
            self._commit_pending(state)
        if start_frame_idx is None:
            start_frame_idx = min(frame for track in state.objects.values() for frame in track.cond)
        start_frame_idx = self._check_frame(state, start_frame_idx)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = state.num_frames
        if isinstance(max_frame_num_to_track, bool) or not isinstance(max_frame_num_to_track, (int, np.integer)) \
                or max_frame_num_to_track < 0:
            raise ValueError(f"max_frame_num_to_track must be a non-negative int, got {max_frame_num_to_track!r}")
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else range(0)
        else:
            end = min(start_frame_idx + max_frame_num_to_track, state.num_frames - 1)
            order = range(start_frame_idx, end + 1)
        return self._propagate(state, order, bool(reverse))

    def _propagate(self, state: VideoState, order: range, reverse: bool) -> Iterator[FrameResult]:
        for frame_idx in order:
            with torch.inference_mode():
                self._commit_pending(state)  # objects prompted while we were suspended
                low_res = [self._track_one(state, track, frame_idx, reverse) for track in state.objects.values()]
                masks = self._to_video_res(state, torch.cat(low_res, dim=0)) if low_res else self._empty_masks(state)
                if state.keep_memory == "window":
                    self._forget(state, frame_idx, reverse)
            yield frame_idx, state.obj_ids, masks

    def _track_one(self, state: VideoState, track: ObjectTrack, frame_idx: int, reverse: bool) -> torch.Tensor:
        """One object on one propagated frame -> its low-res logits (1, 1, 4g, 4g)."""
        output = track.cond.get(frame_idx)
        if output is None:
            output = self._infer_frame(
                state, track, frame_idx, False, reverse, points=None, mask=None, prev_logits=None, encode_memory=True
            )
            track.tracked[frame_idx] = output
        track.directions[frame_idx] = reverse
        if output.low_res_masks is None:  # forgotten (window mode): recompute would be needed
            return self._absent_low_res(state)
        return output.low_res_masks.to(state.device)

    def object_scores(self, inference_state: VideoState, frame_idx: int) -> dict[int, float]:
        """Object-score logits of every object with a result on `frame_idx` (> 0: present,
        <= 0: occluded or gone). Ours; the reference keeps these inside its state dict."""
        state = inference_state
        frame_idx = self._check_frame(state, frame_idx)
        scores = {}
        for obj_id, track in state.objects.items():
            output = track.output(frame_idx)
            if output is not None:
                scores[obj_id] = float(output.object_score_logits.flatten()[0])
        return scores

    # ------------------------------------------------------------------ steps of a frame
    def _frame_features(self, state: VideoState, frame_idx: int) -> FrameFeatures:
        """Decode frame `frame_idx`, stretch it to S x S (PIL bicubic on uint8, as the
        reference's frame loader) and run the image encoder; one frame stays cached."""
        if state.cache is not None and state.cache.frame_idx == frame_idx:
            return state.cache.features
        state.cache = None  # free the previous frame's features before computing the next
        frame = state.frames[frame_idx]
        size = self.image_size
        resized = np.array(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
        pixels = torch.from_numpy(resized).to(state.device).permute(2, 0, 1)[None].float().div(255.0)
        features = self.model.encode_frame(pixels)
        state.cache = CachedFeatures(frame_idx, features)
        return features

    def _select_memory(
        self, state: VideoState, track: ObjectTrack, frame_idx: int, reverse: bool
    ) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], list[int], list[tuple[int, torch.Tensor]], int]:
        """The memory bank a non-first frame attends to: every conditioning frame (t_pos 0;
        or the closest max_cond_frames_in_attn), the num_maskmem - 1 frames before it in
        the tracking direction (t_pos num_maskmem-1 is the nearest), and the object pointers
        of past conditioning frames and of up to max_obj_ptrs_in_encoder - 1 recent frames.
        Returns (memories, the frame index of each memory, pointers, max pointer offset)."""
        options = self.model.tracking
        selected, unselected = _closest_cond_frames(frame_idx, track.cond, options.max_cond_frames_in_attn)
        position = state.maskmem_pos_enc
        memories: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        memory_frames: list[int] = []
        for t, memory in selected.items():
            memories.append((0, memory.maskmem_features, position))
            memory_frames.append(t)
        stride = options.memory_temporal_stride_for_eval
        for t_pos in range(1, options.num_maskmem):
            t_rel = options.num_maskmem - t_pos  # frames before the current one
            if t_rel == 1:
                previous = frame_idx + 1 if reverse else frame_idx - 1
            elif reverse:
                previous = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
            else:
                previous = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
            memory = track.tracked.get(previous, unselected.get(previous))
            if memory is not None and memory.maskmem_features is not None:
                memories.append((t_pos, memory.maskmem_features, position))
                memory_frames.append(previous)

        pointers: list[tuple[int, torch.Tensor]] = []
        max_pointers = min(state.num_frames, options.max_obj_ptrs_in_encoder)
        if options.use_obj_ptrs_in_encoder:
            for t, memory in selected.items():
                if options.only_obj_ptrs_in_the_past_for_eval and (t < frame_idx if reverse else t > frame_idx):
                    continue
                offset = (frame_idx - t) * (-1 if reverse else 1) if options.use_signed_tpos_enc_to_obj_ptrs \
                    else abs(frame_idx - t)
                pointers.append((offset, memory.obj_ptr))
            for t_diff in range(1, max_pointers):
                t = frame_idx + t_diff if reverse else frame_idx - t_diff
                if t < 0 or t >= state.num_frames:
                    break
                memory = track.tracked.get(t, unselected.get(t))
                if memory is not None:
                    pointers.append((t_diff, memory.obj_ptr))
        return memories, memory_frames, pointers, max_pointers - 1

    def _infer_frame(
        self,
        state: VideoState,
        track: ObjectTrack,
        frame_idx: int,
        is_init_cond_frame: bool,
        reverse: bool,
        points: PointPrompt | None,
        mask: torch.Tensor | None,
        prev_logits: torch.Tensor | None,
        encode_memory: bool,
    ) -> FrameMemory:
        """One object on one frame: heads on memory-conditioned features (or the mask prompt
        taken as output), then optionally the memory encoder."""
        model = self.model
        features = self._frame_features(state, frame_idx)
        if mask is not None and model.tracking.use_mask_input_as_output_without_sam:
            output: TrackOutput = model.mask_as_output(features.vision_feats, features.high_res_feats, mask)
        else:
            if is_init_cond_frame:
                pix_feat = model.first_frame_features(features)
            else:
                memories, memory_frames, pointers, max_offset = self._select_memory(state, track, frame_idx, reverse)
                key_caches = None
                if self.cache_memory_keys:
                    # Only the frames read now keep their keys: the cache stays as small as the bank's window.
                    track.key_caches = {t: track.key_caches.get(t) or MemoryKeyCache() for t in memory_frames}
                    key_caches = [track.key_caches[t] for t in memory_frames]
                pix_feat = model.condition_on_memory(features, memories, pointers, max_offset, key_caches)
            num_points = 0 if points is None else points.labels.shape[1]
            output = model.track_heads(
                pix_feat,
                features.high_res_feats,
                None if points is None else points.coords,
                None if points is None else points.labels,
                prev_logits if prev_logits is not None else mask,
                model.use_multimask(is_init_cond_frame, num_points),
            )
        maskmem = None
        if encode_memory:
            binarize = self.binarize_mask_from_pts_for_mem_enc and points is not None
            maskmem = self._encode_memory(state, features, output.high_res_masks, output.object_score_logits, binarize)
        low_res = output.low_res_masks
        if self.fill_hole_area > 0:
            low_res = fill_holes(low_res, self.fill_hole_area)
        storage = state.storage_device
        return FrameMemory(
            low_res_masks=low_res.to(storage),
            object_score_logits=output.object_score_logits,
            obj_ptr=output.obj_ptr,
            maskmem_features=maskmem,
        )

    def _track_frame(
        self, state: VideoState, tracks: list[ObjectTrack], frame_idx: int, reverse: bool,
    ) -> list[FrameMemory]:
        """`_infer_frame` without prompts or memory encoding for several objects on one non-first
        frame, batched: objects whose memory banks have the same layout (the same temporal
        positions and pointer offsets) share one memory-attention and one heads pass. Returns one
        result per track, in order."""
        model = self.model
        features = self._frame_features(state, frame_idx)
        groups: dict[tuple, list[int]] = {}
        banks = []
        for index, track in enumerate(tracks):
            # (cache_memory_keys is per object: the batched pass computes the keys itself)
            memories, _, pointers, max_offset = self._select_memory(state, track, frame_idx, reverse)
            banks.append((memories, pointers))
            layout = (tuple(t_pos for t_pos, _, _ in memories), tuple(offset for offset, _ in pointers), max_offset)
            groups.setdefault(layout, []).append(index)
        multimask = model.use_multimask(False, 0)
        results: list[FrameMemory | None] = [None] * len(tracks)
        storage = state.storage_device
        for (t_positions, offsets, max_offset), members in groups.items():
            batch = len(members)
            memories = []
            for slot, t_pos in enumerate(t_positions):
                stacked = torch.cat([banks[i][0][slot][1] for i in members])
                position = banks[members[0]][0][slot][2]
                memories.append((t_pos, stacked, position.expand(batch, *position.shape[1:])))
            pointers = [(offset, torch.cat([banks[i][1][slot][1] for i in members]))
                        for slot, offset in enumerate(offsets)]
            batched = _expand_features(features, batch)
            pix_feat = model.condition_on_memory(batched, memories, pointers, max_offset)
            output = model.track_heads(pix_feat, batched.high_res_feats, None, None, None, multimask,
                                       high_res=False, batch_invariant=True)
            low_res = output.low_res_masks
            if self.fill_hole_area > 0:
                low_res = fill_holes(low_res, self.fill_hole_area)
            low_res = low_res.to(storage)
            for row, index in enumerate(members):
                results[index] = FrameMemory(
                    low_res_masks=low_res[row : row + 1],
                    object_score_logits=output.object_score_logits[row : row + 1],
                    obj_ptr=output.obj_ptr[row : row + 1],
                    maskmem_features=None,
                )
        return results

    def _encode_memory(
        self, state: VideoState, features: FrameFeatures, high_res_masks: torch.Tensor,
        object_score_logits: torch.Tensor, binarize: bool,
    ) -> torch.Tensor:
        """Memory features (1, 64, g, g), stored in bfloat16 as the reference stores them."""
        memory, position = self.model.encode_memory(features, high_res_masks, object_score_logits, binarize)
        if state.maskmem_pos_enc is None:
            state.maskmem_pos_enc = position[:1].clone()  # the same for every frame and object
        return memory.to(torch.bfloat16).to(state.storage_device)

    def _commit_pending(self, state: VideoState) -> None:
        """Give prompt outputs their memory (from the 0/1 mask the user saw) and put them in
        the bank; a prompted frame replaces any tracked result there."""
        for track in state.objects.values():
            if track.pending:
                for frame_idx in sorted(track.pending, key=lambda f: track.pending[f].is_cond):
                    output = track.pending[frame_idx]
                    if output.maskmem_features is None:
                        high_res = F.interpolate(
                            output.low_res_masks.to(state.device), (self.image_size, self.image_size),
                            mode="bilinear", align_corners=False,
                        )
                        features = self._frame_features(state, frame_idx)
                        output.maskmem_features = self._encode_memory(
                            state, features, high_res, output.object_score_logits,
                            self.binarize_mask_from_pts_for_mem_enc,
                        )
                    (track.cond if output.is_cond else track.tracked)[frame_idx] = output
                track.pending.clear()
            if not track.cond:
                raise ValueError(
                    f"object {track.obj_id} has no prompt on any frame; add points, a box or a mask first"
                )
            for frame_idx in track.cond:
                track.tracked.pop(frame_idx, None)
        if not state.objects:
            raise ValueError("no objects to track; add points, a box or a mask first")

    def _forget(self, state: VideoState, frame_idx: int, reverse: bool) -> None:
        """Window mode: after `frame_idx`, drop what frames further on can no longer read:
        spatial memories (and masks) older than num_maskmem - 2 frames, and whole results
        also older than max_obj_ptrs_in_encoder - 2 frames (ages counted against the
        tracking direction). Conditioning frames always stay."""
        options = self.model.tracking
        keep_spatial = options.num_maskmem - 2
        keep_pointer = options.max_obj_ptrs_in_encoder - 2
        if options.memory_temporal_stride_for_eval != 1:
            keep_spatial = options.memory_temporal_stride_for_eval * options.num_maskmem
        for track in state.objects.values():
            for t in list(track.tracked):
                age = t - frame_idx if reverse else frame_idx - t
                if age > keep_pointer and age > keep_spatial:
                    del track.tracked[t]
                elif age > keep_spatial:
                    track.tracked[t].drop_memory()

    # ------------------------------------------------------------------ outputs
    def _previous_logits(self, track: ObjectTrack, frame_idx: int, is_cond: bool, device: torch.device):
        """A new click refines the object's current mask on that frame (low-res logits,
        clamped to +-32), as the reference's interactive mode does."""
        output = track.pending.get(frame_idx)
        if output is not None and output.is_cond != is_cond:
            output = None
        if output is None:
            output = track.cond.get(frame_idx) or track.tracked.get(frame_idx)
        if output is None or output.low_res_masks is None:
            return None
        return torch.clamp(output.low_res_masks.to(device), -32.0, 32.0)

    def _absent_low_res(self, state: VideoState) -> torch.Tensor:
        side = self.model.sam_prompt_encoder.mask_input_size
        return torch.full((1, 1, *side), NO_OBJECT_LOGIT, device=state.device)

    def _video_masks_at(self, state: VideoState, frame_idx: int) -> torch.Tensor:
        """Every object's newest logits on a frame, (num_objects, 1, H, W) at video res;
        -1024 for objects without a result there."""
        low_res = []
        for track in state.objects.values():
            output = track.output(frame_idx)
            if output is None or output.low_res_masks is None:
                low_res.append(self._absent_low_res(state))
            else:
                low_res.append(output.low_res_masks.to(state.device))
        if not low_res:
            return self._empty_masks(state)
        return self._to_video_res(state, torch.cat(low_res, dim=0))

    def _to_video_res(self, state: VideoState, low_res: torch.Tensor) -> torch.Tensor:
        """(num_objects, 1, h, w) logits -> (num_objects, 1, H, W) at video res, the form
        every public method returns (with non_overlap_masks applied)."""
        size = (state.video_height, state.video_width)
        masks = low_res if tuple(low_res.shape[-2:]) == size else \
            F.interpolate(low_res.float(), size, mode="bilinear", align_corners=False)
        if self.non_overlap_masks and masks.shape[0] > 1:
            masks = keep_top_object(masks)
        return masks

    def _empty_masks(self, state: VideoState) -> torch.Tensor:
        return torch.zeros(0, 1, state.video_height, state.video_width, device=state.device)

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _known_track(state: VideoState, obj_id: int) -> ObjectTrack:
        """The track of an object that exists; ValueError naming the tracked ids otherwise."""
        track = state.objects.get(obj_id)
        if track is None:
            raise ValueError(f"no object with id {obj_id}; the tracked ids are {state.obj_ids}")
        return track

    def _track_for(self, state: VideoState, obj_id: int) -> ObjectTrack:
        if obj_id not in state.objects:
            state.objects[obj_id] = ObjectTrack(obj_id)
        return state.objects[obj_id]

    @staticmethod
    def _check_obj_id(obj_id: Any) -> int:
        if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)):
            raise ValueError(f"obj_id must be an int, got {obj_id!r}")
        return int(obj_id)

    @staticmethod
    def _check_frame(state: VideoState, frame_idx: Any) -> int:
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)):
            raise ValueError(f"frame_idx must be an int, got {frame_idx!r}")
        if not 0 <= frame_idx < state.num_frames:
            raise ValueError(f"frame_idx {frame_idx} is outside the video's frames 0..{state.num_frames - 1}")
        return int(frame_idx)

    @staticmethod
    def _prompt_tensors(
        points: Any, labels: Any, box: Any, clear_old_points: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, N, 2) float coords and (1, N) int32 labels, box corners (labels 2, 3) first."""
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if points is None and box is None:
            raise ValueError("give points (with labels) or a box")
        if box is not None and not clear_old_points:
            raise ValueError("a box must come before any clicks: use clear_old_points=True with a box")
        coords = torch.zeros(0, 2)
        point_labels = torch.zeros(0, dtype=torch.int32)
        if points is not None:
            point_array = _as_numpy(points, np.float32)
            label_array = _as_numpy(labels, None)
            if point_array.ndim == 3 and point_array.shape[0] == 1:  # the reference's (1, N, 2) batch
                point_array = point_array[0]
                if label_array.ndim == 2 and label_array.shape[0] == 1:
                    label_array = label_array[0]
            if point_array.size == 0:
                point_array = point_array.reshape(0, 2)
            if point_array.ndim != 2 or point_array.shape[1] != 2:
                raise ValueError(f"points must be (N, 2) xy, got shape {point_array.shape}")
            coords = torch.as_tensor(point_array)
            if label_array.ndim != 1 or len(label_array) != len(coords):
                raise ValueError(
                    f"{len(coords)} points but labels has shape {label_array.shape}; give one label per point"
                )
            if not np.isin(label_array, (0, 1)).all():
                raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {label_array.tolist()}")
            point_labels = torch.as_tensor(label_array.astype(np.int32))
        if box is not None:
            box_array = _as_numpy(box, np.float32).reshape(-1)
            if box_array.size != 4:
                raise ValueError(f"box must be 4 numbers x0, y0, x1, y1, got {np.asarray(box).shape}")
            coords = torch.cat([torch.as_tensor(box_array).reshape(2, 2), coords])
            point_labels = torch.cat([torch.tensor([2, 3], dtype=torch.int32), point_labels])
        if len(coords) == 0:
            raise ValueError("points is empty; give at least one click or a box")
        if not torch.isfinite(coords).all():
            raise ValueError("points and box must be finite numbers")
        return coords[None], point_labels[None]

    @staticmethod
    def _mask_tensor(mask: Any) -> torch.Tensor:
        mask = _as_numpy(mask, None)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"mask must be a non-empty (H, W) array, got shape {mask.shape}")
        if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean or 0/1")
        return torch.as_tensor(mask.astype(np.float32))[None, None]


def _as_numpy(values: Any, dtype: Any) -> np.ndarray:
    """A list, array or (any-device) tensor as a numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def keep_top_object(masks: torch.Tensor) -> torch.Tensor:
    """(num_objects, 1, H, W) logits: at each pixel only the highest-scoring object keeps its
    logit, the others are clamped to at most -10 (the reference's non_overlap_masks)."""
    top = torch.argmax(masks, dim=0, keepdim=True)
    own = torch.arange(masks.shape[0], device=masks.device)[:, None, None, None]
    return torch.where(top == own, masks, masks.clamp(max=-10.0))


def _closest_cond_frames(
    frame_idx: int, cond: dict[int, FrameMemory], max_frames: int
) -> tuple[dict[int, FrameMemory], dict[int, FrameMemory]]:
    """(selected, unselected) conditioning frames: all if max_frames is -1 or enough, else
    the nearest before, the nearest at/after, then the closest others."""
    if max_frames == -1 or len(cond) <= max_frames:
        return cond, {}
    chosen: list[int] = []
    before = [t for t in cond if t < frame_idx]
    after = [t for t in cond if t >= frame_idx]
    if before:
        chosen.append(max(before))
    if after:
        chosen.append(min(after))
    rest = sorted((t for t in cond if t not in chosen), key=lambda t: abs(t - frame_idx))
    chosen += rest[: max_frames - len(chosen)]
    selected = {t: cond[t] for t in chosen}
    return selected, {t: m for t, m in cond.items() if t not in selected}


def _expand_features(features: FrameFeatures, batch: int) -> FrameFeatures:
    """A frame's features as views for B objects (no copies)."""
    if batch == 1:
        return features
    return FrameFeatures(features.vision_feats.expand(batch, -1, -1, -1), features.vision_pos.expand(batch, -1, -1, -1),
                         [level.expand(batch, -1, -1, -1) for level in features.high_res_feats])


def fill_holes(low_res: torch.Tensor, max_area: int) -> torch.Tensor:
    """Set background holes (8-connected regions of logits <= 0, border regions included) of at
    most `max_area` pixels to 0.1, per mask of (B, 1, h, w) logits, as the reference's CUDA
    post-processing does. Uses the generator's own region code (`sam.amg_utils`)."""
    from ..amg_utils import remove_small_regions

    foreground = (low_res > 0).cpu().numpy()
    filled = low_res.clone()
    for index in range(foreground.shape[0]):
        closed, changed = remove_small_regions(foreground[index, 0], max_area + 1, "holes")
        if changed:
            holes = torch.from_numpy(closed & ~foreground[index, 0]).to(low_res.device)
            filled[index, 0] = torch.where(holes, torch.full_like(low_res[index, 0], 0.1), low_res[index, 0])
    return filled
