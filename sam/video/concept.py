"""SAM 3 video concept inference: every instance of a text concept, on every frame, with stable ids.

On each frame SAM 3's concept model (`sam.sam3.Sam3Image`, the detector) finds every instance of
each text prompt, SAM 3's tracker (`sam.sam3.tracker.Sam3Tracker` through `SamVideoPredictor`'s
steps) carries the masklets already started, and a few rules decide which detections start new
objects, which masklets are confirmed, duplicated or lost, and what enters the tracker's memory.
Detector and tracker share one ViT pass per frame. The rules, thresholds and their order are those
of transformers' `Sam3VideoModel` (Meta's `Sam3VideoInference`), see `ConceptTrackingConfig`:

    predictor = Sam3ConceptVideoPredictor.from_checkpoint("sam3.pt")   # or a Sam3VideoModel directory
    state = predictor.init_state("clip.mp4")
    predictor.add_text_prompt(state, "a dog")
    for frame in predictor.propagate_in_video(state):
        frame.frame_idx, frame.obj_ids, frame.masks, frame.scores   # masks (N, H, W) bool at video size

A frame goes through these steps, one method each:
  `_encode`        decode, stretch to S x S, the ViT once, the detector's neck and the tracker's;
  `_detect`        every prompt's instances scoring above `score_threshold_detection`, mask NMS;
  `_track`         every masklet one frame on (memory attention + SAM heads, no memory yet);
  `associate`      detections vs masklets by mask IoU (a pure function of the two sets);
  `_hotstart`      keep-alive counters, unmatched / duplicate bookkeeping, removals;
  `_suppress_recently_occluded`, `_update_memories`: what each masklet writes to its memory;
  `_add_objects`   new objects from their detection masks;
  `_frame_output`  masks, scores; `_postprocess` (video size, hidden ids, no overlaps) at yield time.

Clicks refine an object (or start one) on a frame propagation has reached, as in Meta's
`Sam3VideoInferenceWithInstanceInteractivity` (transformers' `Sam3VideoModel` takes none):

    frame = predictor.add_prompt(state, 12, points=[[0.4, 0.5]], point_labels=[1], obj_id=3)  # relative xy
    frame = predictor.add_new_points_or_box(state, 12, 3, points=[[250, 240]], labels=[1])  # SAM 2's names, pixels
    for frame in predictor.propagate_in_video(state, start_frame_idx=12): ...                # object 3 re-tracked
    for frame in predictor.propagate_in_video(state, start_frame_idx=12, reverse=True): ...

  `_decode_clicks`      the tracker on the frame without memory, fed the object's mask there; a new
                        conditioning frame; nearby detector-made ones become tracked frames;
  `plan_propagation`    what the next propagation runs (Meta's action history): "partial" (only the
                        clicked objects, by the tracker alone) or "fetch" (the cache of shown results);
  `_propagate_clicked`, `_fetch`, `_remember` (the cache).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..sam2.model import FrameFeatures
from .frames import FrameSource, VideoLoadError
from .predictor import SamVideoPredictor
from .state import CachedFeatures, FrameMemory, ObjectTrack, PointPrompt, VideoState

logger = logging.getLogger(__name__)

# An object's last-occluded frame before it was ever occluded, and for an object removed by the
# hot-start rules on this frame (larger than any frame index: it loses every overlap).
NEVER_OCCLUDED, ALWAYS_OCCLUDED = -1, 100000
NO_OBJECT_MASK_LOGIT = -10.0  # what suppressed masks are set to before the memory encoder
REMOVED_SCORE = -1e4  # the score of an object removed by the hot-start rules
CLICKED_PROMPT_ID = -1  # the "prompt" of an object started by clicks (no text found it)
CLICKED_SCORE = 1.0  # the reference's score of an object the user added or refined
MAX_CLICKS_IN_PROMPT = 16  # the reference's max_point_num_in_prompt_enc (the tracker was trained with at most this)


@dataclass
class ConceptTrackingConfig:
    """The association rules' settings; names and defaults are transformers' `Sam3VideoConfig`'s
    (the released model's). A `Sam3VideoModel` config.json sets them when the predictor is loaded
    from one (`from_config_dict`)."""

    score_threshold_detection: float = 0.5  # a detection counts above this score (presence x query probability)
    det_nms_thresh: float = 0.1  # mask-IoU NMS among detections; 0 switches it off
    assoc_iou_thresh: float = 0.1  # a detection overlapping a masklet this much is not new
    trk_assoc_iou_thresh: float = 0.5  # a masklet overlapping no detection this much is "unmatched"
    new_det_thresh: float = 0.7  # an unassociated detection starts an object above this score
    recondition_on_trk_masks: bool = True  # recondition with the tracked mask (True) or the detection's (False)
    hotstart_delay: int = 15  # outputs are held back this many frames, so early removals never show
    hotstart_unmatch_thresh: int = 8  # an object started within the delay and unmatched this often is removed
    hotstart_dup_thresh: int = 8  # ... or matched to the same detection as an older object this often
    suppress_unmatched_only_within_hotstart: bool = True  # False: also hide objects whose keep-alive ran out
    init_trk_keep_alive: int = 30
    max_trk_keep_alive: int = 30
    min_trk_keep_alive: int = -1
    suppress_overlapping_based_on_recent_occlusion_threshold: float = 0.7  # masklets this similar: the most recently occluded is suppressed
    decrease_trk_keep_alive_for_empty_masklets: bool = False
    fill_hole_area: int = 16  # holes and sprinkles of at most this many low-res pixels are removed
    max_num_objects: int = 10000
    recondition_every_nth_frame: int = 16  # 0: never
    high_conf_thresh: float = 0.8  # reconditioning needs a detection and a tracker score above this
    high_iou_thresh: float = 0.8  # ... and this mask IoU between them
    # A click on frame f downgrades an object's detector-made conditioning frames within this many
    # frames of f to tracked frames (Meta's refinement_detector_cond_frame_removal_window).
    refinement_detector_cond_frame_removal_window: int = 16

    def __post_init__(self) -> None:
        if self.hotstart_delay > 0 and max(self.hotstart_unmatch_thresh, self.hotstart_dup_thresh) > self.hotstart_delay:
            raise ValueError(f"hotstart_unmatch_thresh ({self.hotstart_unmatch_thresh}) and hotstart_dup_thresh "
                             f"({self.hotstart_dup_thresh}) must be at most hotstart_delay ({self.hotstart_delay})")

    @classmethod
    def from_config_dict(cls, raw: Mapping[str, Any] | None, **overrides: Any) -> "ConceptTrackingConfig":
        """The settings a transformers `Sam3VideoConfig` dict records (others are ignored), then `overrides`."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown SAM 3 video setting(s) {unknown}; valid: {sorted(names)}")
        values = {k: v for k, v in (raw or {}).items() if k in names}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None, **overrides: Any) -> "ConceptTrackingConfig":
        """The rules a checkpoint records: a transformers `Sam3VideoModel` directory's (or the
        hub's combined file's) config.json, the released defaults for Meta's `sam3.pt` (which
        records none); then `overrides`."""
        from ..sam3.build import _read_config

        raw = (_read_config(Path(checkpoint)) or {}) if checkpoint is not None else {}
        return cls.from_config_dict(raw if "tracker_config" in raw else None, **overrides)


@dataclass
class Detections:
    """One frame's detections over every prompt, prompt by prompt: masks (N, h, w) low-res logits,
    scores (N,) presence x query probability, prompt_ids (N,) long."""

    masks: torch.Tensor
    scores: torch.Tensor
    prompt_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Association:
    """What `associate` decides on one frame."""

    new_det_indices: list[int]  # detections that start objects
    unmatched_obj_ids: list[int]  # non-empty masklets no detection overlaps by trk_assoc_iou_thresh
    matched_obj_ids: dict[int, list[int]]  # detection -> masklets it overlaps by assoc_iou_thresh
    recondition_det: dict[int, int]  # masklet -> its one high-confidence, high-IoU detection
    empty_obj_ids: list[int]  # masklets with an empty mask


@dataclass
class ConceptFrame:
    """One frame's objects, in id order: masks (N, H, W) bool at video size, boxes (N, 4) xyxy video
    pixels (of the masks before overlaps are resolved), scores (N,) the detection score that started
    each object, tracker_scores (N,) the tracker's presence probability on this frame (the start
    score on an object's first frame; 1 on a clicked frame and, as Meta's, the object-score logit
    itself on frames re-tracked after clicks), labels the prompt text that found each object
    ("" for one started by clicks), image the frame."""

    frame_idx: int
    obj_ids: list[int]
    masks: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    tracker_scores: torch.Tensor
    labels: list[str]
    image: np.ndarray | None = None  # the decoded frame (H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.obj_ids)


@dataclass
class _RawFrame:
    """A frame's result before post-processing (held back during the hot-start delay)."""

    frame_idx: int
    low_res: dict[int, torch.Tensor]  # obj_id -> (h, w) logits
    scores: dict[int, float]
    tracker_scores: dict[int, float]
    suppressed: set[int]
    image: np.ndarray | None = None
    video_size: dict[int, torch.Tensor] = field(default_factory=dict)  # obj_id -> (H, W) bool shown instead


@dataclass
class _Action:
    """One entry of the action history: "add" / "refine" (a click on frame_idx for obj_ids), "remove",
    or a propagation ("full", "partial": only obj_ids re-tracked, "fetch": cached results) from frame_idx."""

    kind: str
    frame_idx: int | None = None
    obj_ids: list[int] | None = None


@dataclass
class ConceptVideoState:
    """A video's state for `Sam3ConceptVideoPredictor`: the tracker's `VideoState` (frames, masklets
    and their memory), the prompts, and what the association rules remember about each object."""

    video: VideoState
    prompts: dict[int, str] = field(default_factory=dict)  # prompt id -> text
    text: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # prompt id -> encoded text
    obj_prompt: dict[int, int] = field(default_factory=dict)  # obj_id -> the prompt that found it
    scores: dict[int, float] = field(default_factory=dict)  # obj_id -> detection score at its start
    last_occluded: dict[int, int] = field(default_factory=dict)
    max_obj_id: int = -1
    first_frame: dict[int, int] = field(default_factory=dict)
    unmatched_frames: defaultdict = field(default_factory=lambda: defaultdict(list))
    overlap_frames: defaultdict = field(default_factory=lambda: defaultdict(list))  # (first id, id) -> frames
    keep_alive: dict[int, int] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)
    hidden: set[int] = field(default_factory=set)  # removed by the hot-start rules: never shown
    # What each frame showed (obj_id -> low-res logits, float16), as the reference caches it: after
    # a click, propagation re-tracks only the clicked objects and takes the others from here.
    frame_outputs: dict[int, _RawFrame] = field(default_factory=dict)
    # The user's object actions and the propagations after them (Meta's action history), which
    # decide what the next propagate_in_video runs; empty until the first click.
    actions: list[_Action] = field(default_factory=list)
    cache_results: bool = True  # False: no frame_outputs (a long run that takes no clicks stays flat)

    @property
    def obj_ids(self) -> list[int]:
        return self.video.obj_ids

    @property
    def num_frames(self) -> int:
        return self.video.num_frames

    def forget_objects(self) -> None:
        """Every object and everything remembered about them; the prompts stay."""
        self.video.objects.clear()
        self.video.cache = None
        for table in (self.obj_prompt, self.scores, self.last_occluded, self.first_frame, self.unmatched_frames,
                      self.overlap_frames, self.keep_alive, self.removed, self.hidden, self.frame_outputs, self.actions):
            table.clear()
        self.max_obj_id = -1


class Sam3ConceptVideoPredictor:
    """SAM 3 video concept inference (detect on every frame, associate, track) on our `Sam3Image`
    detector and `Sam3Tracker`, which share the ViT (the tracker must have been loaded on the
    detector's trunk, `load_sam3_tracker(..., trunk=...)`).

    The pipeline is transformers' `Sam3VideoModel`'s, step for step. exemplar_token=True: a text
    prompt also runs the exemplar encoder, whose cls token joins the prompt, as Meta's models do
    (its image model, and its video model with an empty geometric prompt); False (default):
    the text goes alone, as transformers'. Masks reach the memory encoder as logits resized to its
    input (both references' order here), whatever the tracker's `memory_mask_resize`.
    Clicks (`add_prompt` / `add_new_points_or_box`) refine or add objects on frames already shown,
    as Meta's interactive video model does (transformers' takes none); see `add_new_points_or_box`.
    non_overlap_masks: in the returned masks each pixel belongs to at most one object of a prompt
    (the one with the highest tracker score there), as the reference's post-processing; False returns
    each object's own mask (the memory is the same either way).
    """

    def __init__(self, detector, tracker, config: ConceptTrackingConfig | None = None, *,
                 exemplar_token: bool = False, non_overlap_masks: bool = True) -> None:
        from ..sam3.model import Sam3Image
        from ..sam3.tracker import Sam3Tracker

        if not isinstance(detector, Sam3Image):
            raise ValueError(f"detector must be a sam.sam3.Sam3Image, got {type(detector).__name__}")
        if not isinstance(tracker, Sam3Tracker):
            raise ValueError(f"tracker must be a sam.sam3.tracker.Sam3Tracker, got {type(tracker).__name__}")
        if tracker.image_encoder.trunk is not detector.backbone.vision_backbone.trunk:
            raise ValueError("the tracker must run on the detector's ViT: load it with "
                             "load_sam3_tracker(checkpoint, trunk=detector.backbone.vision_backbone.trunk)")
        if tracker.image_size != detector.config.image_size:
            raise ValueError(f"detector ({detector.config.image_size} px) and tracker ({tracker.image_size} px) "
                             "take different input sizes")
        self.detector = detector.eval()
        self.tracker = SamVideoPredictor(tracker, refine_with_previous_mask=False)
        self.config = config or ConceptTrackingConfig()
        self.exemplar_token = bool(exemplar_token)
        self.non_overlap_masks = bool(non_overlap_masks)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device = "cpu", *,
                        exemplar_token: bool = False, non_overlap_masks: bool = True,
                        **settings: Any) -> "Sam3ConceptVideoPredictor":
        """Both models from one checkpoint: Meta's `sam3.pt` (detector and tracker), or a
        transformers `Sam3VideoModel` `save_pretrained` directory / the hub's combined file (whose
        config.json also sets the association rules). `settings`: `ConceptTrackingConfig` fields."""
        from ..sam3.build import load_sam3
        from ..sam3.tracker import load_sam3_tracker

        detector = load_sam3(checkpoint).to(device)
        tracker = load_sam3_tracker(checkpoint, trunk=detector.backbone.vision_backbone.trunk)
        config = ConceptTrackingConfig.from_checkpoint(checkpoint, **settings)
        return cls(detector, tracker.to(device), config, exemplar_token=exemplar_token,
                   non_overlap_masks=non_overlap_masks)

    @property
    def image_size(self) -> int:
        return self.detector.config.image_size

    @property
    def device(self) -> torch.device:
        return self.tracker.model.device

    # ------------------------------------------------------------------ session
    def init_state(self, video: str | Path | np.ndarray | Sequence[np.ndarray] | FrameSource, *,
                   max_frames: int | None = None, max_pixels: int | None = None,
                   offload_state_to_cpu: bool = False, cache_results: bool = True) -> ConceptVideoState:
        """Open a video (a file, a folder of frames, a (T, H, W, 3) uint8 array, a list of frames);
        nothing is decoded yet. Limits as `SamVideoPredictor.init_state`. cache_results: keep what
        each frame showed (low-res float16 logits per object, as the reference does), which clicks
        need; False for a long run that takes none, so memory does not grow with the video."""
        video_state = self.tracker.init_state(video, offload_state_to_cpu=offload_state_to_cpu,
                                              max_frames=max_frames, max_pixels=max_pixels)
        return ConceptVideoState(video=video_state, cache_results=bool(cache_results))

    def add_text_prompt(self, state: ConceptVideoState, text: str) -> int:
        """Look for every instance of `text` (a noun phrase) on every frame from now on; returns the
        prompt's id (the same text again returns the same id). Several prompts are detected
        independently: masklets only associate with, and only suppress, those of their own prompt."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty phrase; got {text!r}")
        text = text.strip()
        for prompt_id, known in state.prompts.items():
            if known == text:
                return prompt_id
        if state.actions:
            raise ValueError("objects were clicked in this session; a new text prompt starts over (as in the "
                             "reference): call reset_state(state) first")
        from ..sam3.text import tokenize

        prompt_id = len(state.prompts)
        with torch.inference_mode():
            ids = tokenize([text], self.detector.config.context_length).to(self.device)
            state.text[prompt_id] = self.detector.encode_text(ids)
        state.prompts[prompt_id] = text
        return prompt_id

    def remove_object(self, state: ConceptVideoState, obj_id: int) -> list[int]:
        """Stop tracking an object (its memory is dropped; a new detection there starts a new id).
        After clicks it also leaves the cached results, and the next propagation reads the cache
        (as the reference's). Returns the remaining ids; an unknown id raises ValueError naming the
        tracked ones."""
        obj_id = SamVideoPredictor._check_obj_id(obj_id)
        SamVideoPredictor._known_track(state.video, obj_id)
        del state.video.objects[obj_id]  # its prompt stays known: frames still held back name it
        if state.actions:  # after a click the results come from the cache: drop it there too
            state.actions.append(_Action("remove", obj_ids=[obj_id]))
            for frame in state.frame_outputs.values():
                frame.low_res.pop(obj_id, None)
                frame.video_size.pop(obj_id, None)
        return state.obj_ids

    # ------------------------------------------------------------------ clicks
    def add_prompt(self, state: ConceptVideoState, frame_idx: int, text_str: str | None = None, *,
                   points: Any = None, point_labels: Any = None, obj_id: int | None = None,
                   rel_coordinates: bool = True) -> ConceptFrame:
        """Meta's `Sam3VideoPredictor.add_prompt` for clicks: points (N, 2) xy with point_labels (N,)
        1 positive / 0 negative, in [0, 1] of the frame's width and height (rel_coordinates=True, the
        reference's default) or in video pixels (False), for object `obj_id` on `frame_idx`: an
        existing object is refined, a new id starts an object (see `add_new_points_or_box`). Returns
        the frame's `ConceptFrame`. Text goes through `add_text_prompt` (it applies to every frame)."""
        if text_str is not None:
            raise ValueError("a text prompt applies to every frame: use add_text_prompt(state, text), then "
                             "propagate_in_video; add_prompt takes clicks (points, point_labels, obj_id)")
        if points is None or point_labels is None:
            raise ValueError("give points with point_labels (and obj_id)")
        if obj_id is None:
            raise ValueError("points need the obj_id of the object they refine or start")
        return self.add_new_points_or_box(state, frame_idx, obj_id, points=points, labels=point_labels,
                                          normalize_coords=not rel_coordinates)

    def add_new_points_or_box(self, state: ConceptVideoState, frame_idx: int, obj_id: int, points: Any = None,
                              labels: Any = None, clear_old_points: bool = True, normalize_coords: bool = True,
                              box: Any = None) -> ConceptFrame:
        """Clicks and/or a box for one object on one frame, after propagation has reached that frame
        (SAM 2's names: points (N, 2) xy with labels (N,) 1 / 0, box (4,) xyxy; video pixels, or
        relative [0, 1] coordinates with normalize_coords=False; clear_old_points=False adds the clicks
        to this object's earlier ones on the frame). Returns the frame's `ConceptFrame`, every object.

        As Meta's `Sam3VideoInferenceWithInstanceInteractivity` (its defaults): the tracker decodes the
        clicks on the frame's features without memory, fed the object's current mask there; that
        result becomes a conditioning frame of the object (its memory encoded from the 0/1 mask), and
        the object's detector-made conditioning frames within
        `refinement_detector_cond_frame_removal_window` frames become tracked frames. The object's
        score becomes 1 and it is no longer hidden. A new obj_id starts an object from the clicks
        alone (it has no text prompt: label ""). The next propagate_in_video re-tracks only the
        clicked objects, frame by frame, with the tracker alone (no detection, no association rules:
        detections no longer override or remove them); every other object keeps the results it had.
        A second propagation (e.g. the other direction) does the same, unless the first started at
        the first or last frame; later ones return the cached results (reset_state starts over).
        A box is ours (Meta's video predictor takes clicks only; the tracker reads a box as two
        corner clicks, as SAM 2's)."""
        video = state.video
        frame_idx = SamVideoPredictor._check_frame(video, frame_idx)
        obj_id = SamVideoPredictor._check_obj_id(obj_id)
        if not state.cache_results:
            raise ValueError("this session keeps no results (init_state(..., cache_results=False)); clicks "
                             "refine the results of frames already shown: open it with cache_results=True")
        if frame_idx not in state.frame_outputs:
            raise ValueError(f"frame {frame_idx} has no results yet: propagate_in_video over it before adding "
                             "clicks (they refine the results there)")
        coords, point_labels = SamVideoPredictor._prompt_tensors(points, labels, box, clear_old_points)
        width, height = video.video_width, video.video_height
        scale = torch.tensor([width, height], dtype=torch.float32)
        relative = coords / scale if normalize_coords else coords
        if ((relative < 0) | (relative > 1)).any():
            outside = (relative * scale).reshape(-1, 2)[((relative < 0) | (relative > 1)).reshape(-1, 2).any(dim=1)]
            raise ValueError(f"points {outside.tolist()} lie outside the {width}x{height} frame "
                             + ("(video pixels)" if normalize_coords else "(relative coordinates must be in [0, 1])"))
        track = video.objects.get(obj_id)
        is_new = track is None
        if is_new and len(video.objects) >= self.config.max_num_objects:
            raise ValueError(f"already tracking max_num_objects={self.config.max_num_objects} objects")
        prompt = PointPrompt((relative * self.image_size).to(video.device), point_labels.to(video.device))
        if not clear_old_points and not is_new and frame_idx in track.points:
            previous = track.points[frame_idx]
            prompt = PointPrompt(torch.cat([previous.coords, prompt.coords], dim=1),
                                 torch.cat([previous.labels, prompt.labels], dim=1))
        with torch.inference_mode():
            image = self._encode_tracker(state, frame_idx)
            if is_new:
                track = ObjectTrack(obj_id)
                video.objects[obj_id] = track
                state.obj_prompt[obj_id] = CLICKED_PROMPT_ID
                state.max_obj_id = max(state.max_obj_id, obj_id)
            self._decode_clicks(state, track, frame_idx, prompt)
            state.actions.append(_Action("add" if is_new else "refine", frame_idx, [obj_id]))
            state.scores[obj_id] = CLICKED_SCORE
            state.removed.discard(obj_id)
            state.hidden.discard(obj_id)
            cached = state.frame_outputs[frame_idx]
            low_res = track.cond[frame_idx].low_res_masks.to(video.device).float()
            cached.low_res[obj_id] = low_res[0, 0].to(video.storage_device, torch.float16)
            cached.video_size.pop(obj_id, None)
            if self.config.fill_hole_area > 0:  # the reference fills the clicked mask's holes at the video size
                logits = F.interpolate(low_res, (video.video_height, video.video_width), mode="bilinear",
                                       align_corners=False)[:, 0]
                filled = fill_holes_and_sprinkles(logits, self.config.fill_hole_area)[0] > 0
                cached.video_size[obj_id] = filled.to(video.storage_device)
            cached.scores = dict(state.scores)
            cached.tracker_scores[obj_id] = CLICKED_SCORE
            return self._postprocess(state, replace(cached, image=image))

    def _decode_clicks(self, state: ConceptVideoState, track: ObjectTrack, frame_idx: int, prompt: PointPrompt) -> None:
        """The tracker's answer to clicks on a frame (Meta's use_prev_mem_frame=False: no memory; the
        object's logits there, clamped to +-32, as the mask prompt), stored as a conditioning frame
        with its memory; tracked results around it dropped; then detector-made conditioning frames
        nearby become tracked frames (Meta's order: these survive until propagation passes the click)."""
        video, model = state.video, self.tracker.model
        features = video.cache.features
        previous = track.cond.get(frame_idx) or track.tracked.get(frame_idx)
        prev_logits = None
        if previous is not None and previous.low_res_masks is not None:
            prev_logits = torch.clamp(previous.low_res_masks.to(video.device), -32.0, 32.0)
        is_init_cond_frame = frame_idx not in track.directions
        coords, labels = prompt.coords, prompt.labels
        if labels.shape[1] > MAX_CLICKS_IN_PROMPT:  # as the reference: the first half and the last half
            logger.warning("%d clicks on frame %d: only the first %d and the last %d are used", labels.shape[1],
                           frame_idx, MAX_CLICKS_IN_PROMPT // 2, MAX_CLICKS_IN_PROMPT - MAX_CLICKS_IN_PROMPT // 2)
            keep = torch.cat([torch.arange(MAX_CLICKS_IN_PROMPT // 2),
                              torch.arange(labels.shape[1] - (MAX_CLICKS_IN_PROMPT - MAX_CLICKS_IN_PROMPT // 2),
                                           labels.shape[1])]).to(labels.device)
            coords, labels = coords[:, keep], labels[:, keep]
            prompt = PointPrompt(coords, labels)  # kept so (as the reference), later clicks add to these
        output = model.track_heads(model.first_frame_features(features), features.high_res_feats, coords, labels,
                                   prev_logits, model.use_multimask(is_init_cond_frame, labels.shape[1]))
        memory = self.tracker._encode_memory(video, features, output.high_res_masks, output.object_score_logits,
                                             binarize=True)
        track.tracked.pop(frame_idx, None)
        track.points[frame_idx] = prompt
        track.cond[frame_idx] = FrameMemory(low_res_masks=output.low_res_masks.to(video.storage_device),
                                            object_score_logits=output.object_score_logits, obj_ptr=output.obj_ptr,
                                            maskmem_features=memory, is_cond=True)
        self._clear_memory_around(track, frame_idx)
        window = self.config.refinement_detector_cond_frame_removal_window
        for other in [t for t in track.cond if t not in track.points and abs(t - frame_idx) <= window]:
            downgraded = track.cond.pop(other)
            downgraded.is_cond = False
            track.tracked[other] = downgraded
            track.directions.pop(other, None)

    def _clear_memory_around(self, track: ObjectTrack, frame_idx: int) -> None:
        """Drop the object's tracked results (memory and pointer) within stride x num_maskmem frames of
        a conditioning frame, so tracking does not mix the object's old appearance with the click
        (Meta's clear_non_cond_mem_around_input, on in its SAM 3 video tracker; Meta skips it for an
        object tracked in a batch with others, ours are never batched)."""
        options = self.tracker.model.tracking
        reach = options.memory_temporal_stride_for_eval * options.num_maskmem
        for t in [t for t in track.tracked if abs(t - frame_idx) <= reach]:
            del track.tracked[t]

    def reset_state(self, state: ConceptVideoState) -> None:
        """Forget every object and every prompt (the frames stay open)."""
        state.forget_objects()
        state.prompts.clear()
        state.text.clear()

    # ------------------------------------------------------------------ propagation
    def propagate_in_video(self, state: ConceptVideoState, start_frame_idx: int = 0,
                           max_frame_num_to_track: int | None = None, reverse: bool = False) -> Iterator[ConceptFrame]:
        """Detect, associate and track frame by frame from `start_frame_idx` (forward: that frame and
        at most max_frame_num_to_track after it; reverse=True: the frames before it, down to
        start_frame_idx - max_frame_num_to_track, as transformers' iterator orders them). Yields a
        `ConceptFrame` per frame; with `hotstart_delay` > 0 a frame is yielded once that many later
        frames are processed (all at the end), so objects the hot-start rules remove never show.
        Arguments are checked here, before the first frame is decoded."""
        if not state.prompts:
            raise ValueError("no text prompt; call add_text_prompt(state, text) first")
        num_frames = state.num_frames
        start = SamVideoPredictor._check_frame(state.video, start_frame_idx)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if isinstance(max_frame_num_to_track, bool) or not isinstance(max_frame_num_to_track, (int, np.integer)) \
                or max_frame_num_to_track < 0:
            raise ValueError(f"max_frame_num_to_track must be a non-negative int, got {max_frame_num_to_track!r}")
        if reverse:
            end = max(start - max_frame_num_to_track, 0)
            order = range(start - 1, end - 1, -1)
        else:
            end = min(start + max_frame_num_to_track, num_frames - 1)
            order = range(start, end + 1)
        if not state.actions:  # nothing clicked yet: detect and track
            return self._propagate(state, order, end, bool(reverse))
        kind, obj_ids = plan_propagation(state.actions, num_frames)
        state.actions.append(_Action(kind, start, obj_ids))
        if kind == "partial":
            return self._propagate_clicked(state, order, obj_ids, bool(reverse))
        return self._fetch(state, order)

    def _propagate_clicked(self, state: ConceptVideoState, order: range, obj_ids: list[int],
                           reverse: bool) -> Iterator[ConceptFrame]:
        """After clicks: the clicked objects tracked frame by frame by the tracker alone (memory
        encoded from each one's own mask), every other object's result taken from the cache."""
        video = state.video
        for frame_idx in order:
            with torch.inference_mode():
                image = self._encode_tracker(state, frame_idx)
                cached = state.frame_outputs.get(frame_idx)
                frame = _RawFrame(frame_idx, dict(cached.low_res) if cached else {}, dict(state.scores),
                                  dict(cached.tracker_scores) if cached else {}, set(), image,
                                  dict(cached.video_size) if cached else {})
                for obj_id in obj_ids:
                    track = video.objects.get(obj_id)
                    if track is None:  # removed since
                        continue
                    output = track.cond.get(frame_idx)
                    if output is not None:  # passing a conditioning frame clears around it, as in the reference
                        self._clear_memory_around(track, frame_idx)
                    else:
                        output = self.tracker._infer_frame(video, track, frame_idx, False, reverse, points=None,
                                                           mask=None, prev_logits=None, encode_memory=True)
                        track.tracked[frame_idx] = output
                        track.directions[frame_idx] = reverse
                    low_res = output.low_res_masks.to(video.device)[:, 0].float()
                    if self.config.fill_hole_area > 0:  # at low resolution here, as on tracked frames
                        low_res = fill_holes_and_sprinkles(low_res, self.config.fill_hole_area)
                    frame.low_res[obj_id] = low_res[0]
                    frame.video_size.pop(obj_id, None)
                    # The object-score logit itself, not its sigmoid: what Meta's partial propagation
                    # records (and ranks overlapping pixels by), so a confident clicked object wins them.
                    frame.tracker_scores[obj_id] = float(output.object_score_logits.flatten()[0])
                self._remember(state, frame)
                yield self._postprocess(state, frame)

    def _fetch(self, state: ConceptVideoState, order: range) -> Iterator[ConceptFrame]:
        """The cached results (frames never reached show no objects)."""
        for frame_idx in order:
            image = state.video.frames[frame_idx]
            frame = state.frame_outputs.get(frame_idx)
            frame = _RawFrame(frame_idx, {}, {}, {}, set(), image) if frame is None else replace(frame, image=image)
            with torch.inference_mode():
                yield self._postprocess(state, frame)

    def _remember(self, state: ConceptVideoState, frame: _RawFrame) -> None:
        """Cache what a frame shows (hidden and suppressed objects left out) as float16 low-res logits
        (the decoded frame is not kept: a cached frame is decoded again when it is shown)."""
        if not state.cache_results:
            return
        hidden = frame.suppressed | state.hidden
        low_res = {obj_id: mask.to(state.video.storage_device, torch.float16)
                   for obj_id, mask in frame.low_res.items() if obj_id not in hidden}
        video_size = {obj_id: mask for obj_id, mask in frame.video_size.items() if obj_id not in hidden}
        state.frame_outputs[frame.frame_idx] = _RawFrame(frame.frame_idx, low_res, dict(frame.scores),
                                                         dict(frame.tracker_scores), set(), None, video_size)

    def _propagate(self, state: ConceptVideoState, order: range, end: int, reverse: bool) -> Iterator[ConceptFrame]:
        delay = self.config.hotstart_delay
        held: list[_RawFrame] = []
        for frame_idx in order:
            if state.actions:  # the detect-and-track rules know nothing of clicked objects
                raise ValueError(f"objects were clicked while this propagation ran (stopped before frame "
                                 f"{frame_idx}); call propagate_in_video again: it re-tracks the clicked objects")
            try:
                with torch.inference_mode():
                    raw, removed = self._step(state, frame_idx, reverse)
            except VideoLoadError:  # a damaged video: hand out the frames before the bad one first
                for frame in held:
                    self._remember(state, frame)
                    with torch.inference_mode():
                        yield self._postprocess(state, frame)
                raise
            held.append(raw)
            if delay > 0:  # as the reference: without the delay, an object shows on the frame it is removed
                state.hidden.update(removed)
            if delay <= 0:
                ready, held = held, []
            elif frame_idx == end:
                ready, held = held, []
            elif len(held) >= delay:
                ready, held = held[:1], held[1:]
            else:
                ready = []
            for frame in ready:
                self._remember(state, frame)
                with torch.inference_mode():
                    yield self._postprocess(state, frame)

    # ------------------------------------------------------------------ one frame
    def _step(self, state: ConceptVideoState, frame_idx: int, reverse: bool) -> tuple[_RawFrame, set[int]]:
        """Detect, track, associate, update the tracker; returns the frame's raw result and the ids
        the hot-start rules removed on it."""
        config = self.config
        frame, image = self._encode(state, frame_idx)
        detections = self._detect(state, image)
        obj_ids = state.obj_ids
        track_masks, track_logits = self._track(state, frame_idx, reverse)
        device = track_masks.device
        track_prompts = torch.tensor([state.obj_prompt[i] for i in obj_ids], dtype=torch.long, device=device)
        plan = associate(detections, track_masks, obj_ids, track_prompts, config)

        new_indices = plan.new_det_indices
        if len(obj_ids) + len(new_indices) > config.max_num_objects:
            keep = max(config.max_num_objects - len(obj_ids), 0)
            logger.warning("reached max_num_objects=%d: %d of %d new detections start objects",
                           config.max_num_objects, keep, len(new_indices))
            top = torch.topk(detections.scores[torch.tensor(new_indices, dtype=torch.long)], k=keep).indices
            new_indices = [new_indices[i] for i in top.tolist()]
        new_ids = list(range(state.max_obj_id + 1, state.max_obj_id + 1 + len(new_indices)))
        for obj_id, index in zip(new_ids, new_indices):
            state.obj_prompt[obj_id] = int(detections.prompt_ids[index])
        removed, suppressed = self._hotstart(state, frame_idx, reverse, plan, new_ids)

        recondition: dict[int, torch.Tensor] = {}
        period = config.recondition_every_nth_frame
        if period > 0 and frame_idx % period == 0 and plan.recondition_det:
            recondition = self._recondition_masks(obj_ids, detections, track_masks, track_logits, plan.recondition_det)

        if len(obj_ids) > 0 and config.suppress_overlapping_based_on_recent_occlusion_threshold > 0:
            self._suppress_recently_occluded(state, frame_idx, track_masks, removed, reverse)
        else:
            state.last_occluded = {}
        if len(obj_ids) > 0:
            self._update_memories(state, frame_idx, track_masks, recondition)

        scores = state.scores
        tracker_scores = {obj_id: float(p) for obj_id, p in zip(obj_ids, track_logits.sigmoid().tolist())}
        for obj_id, index in zip(new_ids, new_indices):
            scores[obj_id] = tracker_scores[obj_id] = float(detections.scores[index])
        state.max_obj_id = max([state.max_obj_id, *new_ids])
        for obj_id in removed:
            scores[obj_id] = tracker_scores[obj_id] = REMOVED_SCORE
            state.last_occluded.pop(obj_id, None)

        if new_ids:
            self._add_objects(state, frame_idx, new_ids, detections.masks[torch.tensor(new_indices, dtype=torch.long)])
        for obj_id in removed:
            state.video.objects.pop(obj_id, None)

        low_res = {obj_id: mask for obj_id, mask in zip(obj_ids, track_masks)}
        if new_ids:
            new_masks = detections.masks[torch.tensor(new_indices, dtype=torch.long)]
            if config.fill_hole_area > 0:
                new_masks = fill_holes_and_sprinkles(new_masks, config.fill_hole_area)
            low_res.update(zip(new_ids, new_masks))
        for index in recondition:  # a reconditioned masklet shows its detection's mask
            low_res[obj_ids[index]] = detections.masks[plan.recondition_det[obj_ids[index]]]
        return _RawFrame(frame_idx, low_res, dict(scores), tracker_scores, suppressed, frame), removed

    def _encode(self, state: ConceptVideoState, frame_idx: int):
        """Decode the frame, stretch it to S x S (PIL bicubic, as the tracker's frame loader), one ViT
        pass; the tracker's features go to its one-frame cache. Returns the frame and the detector's features."""
        from ..sam3.model import ImageFeatures

        frame, trunk_map = self._trunk(state, frame_idx)
        return frame, ImageFeatures(*self.detector.backbone.vision_backbone.neck(trunk_map))

    def _encode_tracker(self, state: ConceptVideoState, frame_idx: int) -> np.ndarray:
        """As `_encode`, the tracker's features only (clicks and re-tracking need no detector); returns the frame."""
        return self._trunk(state, frame_idx)[0]

    def _trunk(self, state: ConceptVideoState, frame_idx: int) -> tuple[np.ndarray, torch.Tensor]:
        video = state.video
        frame = video.frames[frame_idx]  # a frame of another size raises VideoLoadError (FrameSource)
        size = self.image_size
        resized = np.array(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
        pixels = torch.from_numpy(resized).to(video.device).permute(2, 0, 1)[None].float().div(255.0)
        tracker = self.tracker.model
        trunk_map = tracker.image_encoder.trunk(tracker.preprocess(pixels))
        levels = tracker.image_encoder.decoder_levels(trunk_map, tracker.sam_mask_decoder)
        video.cache = CachedFeatures(frame_idx, tracker_frame_features(levels))
        return frame, trunk_map

    def _detect(self, state: ConceptVideoState, image) -> Detections:
        """Every prompt's detections scoring above score_threshold_detection (after mask NMS), in
        prompt order."""
        config = self.config
        masks, scores, prompt_ids = [], [], []
        for prompt_id, (text, valid) in state.text.items():
            out = self.detector.decode(image, text, valid, exemplar_token=self.exemplar_token)
            probs = out["logits"][0].sigmoid() * out["presence"][0].sigmoid()
            prompt_masks = out["masks"][0]
            if config.det_nms_thresh > 0:
                probs = torch.where(mask_nms(probs, prompt_masks, config.score_threshold_detection, config.det_nms_thresh),
                                    probs, torch.zeros_like(probs))
            keep = probs > config.score_threshold_detection
            masks.append(prompt_masks[keep])
            scores.append(probs[keep])
            prompt_ids.append(torch.full((int(keep.sum()),), prompt_id, dtype=torch.long, device=probs.device))
        return Detections(torch.cat(masks), torch.cat(scores).float(), torch.cat(prompt_ids))

    def _track(self, state: ConceptVideoState, frame_idx: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Every masklet one frame on, without memory yet: (M, h, w) low-res logits (holes filled,
        sprinkles removed) and (M,) object-score logits, in object order."""
        video, tracker = state.video, self.tracker
        masks, logits = [], []
        tracks = list(video.objects.values())
        pending = [track for track in tracks if frame_idx not in track.cond]
        if pending:  # one batched pass for all objects whose memory banks line up
            for track, output in zip(pending, tracker._track_frame(video, pending, frame_idx, reverse)):
                track.tracked[frame_idx] = output
                track.directions[frame_idx] = reverse
        for track in tracks:
            output = track.cond.get(frame_idx) or track.tracked[frame_idx]
            masks.append(output.low_res_masks.to(video.device)[:, 0])
            logits.append(output.object_score_logits.reshape(1))
        if not masks:
            side = tracker.model.sam_prompt_encoder.mask_input_size
            return torch.zeros(0, *side, device=video.device), torch.zeros(0, device=video.device)
        masks = torch.cat(masks)
        if self.config.fill_hole_area > 0:
            masks = fill_holes_and_sprinkles(masks, self.config.fill_hole_area)
        return masks, torch.cat(logits)

    def _hotstart(self, state: ConceptVideoState, frame_idx: int, reverse: bool, plan: Association,
                  new_ids: list[int]) -> tuple[set[int], set[int]]:
        """Keep-alive counters and the hot-start rules. An object that started less than
        hotstart_delay frames ago (counted in the tracking direction) is removed once it has been
        unmatched on hotstart_unmatch_thresh frames, or once it has been matched to the same detection
        as an older object on hotstart_dup_thresh frames. Returns (ids removed now, ids hidden on this
        frame because their keep-alive ran out; only with suppress_unmatched_only_within_hotstart=False)."""
        config = self.config
        removed_now: set[int] = set()
        suppressed: set[int] = set()
        horizon = frame_idx + config.hotstart_delay if reverse else frame_idx - config.hotstart_delay

        def recent(obj_id: int) -> bool:
            first = state.first_frame[obj_id]
            return first < horizon if reverse else first > horizon

        for obj_id in new_ids:
            state.first_frame.setdefault(obj_id, frame_idx)
            state.keep_alive[obj_id] = config.init_trk_keep_alive
        matched = {obj_id for ids in plan.matched_obj_ids.values() for obj_id in ids}
        for obj_id in matched:
            state.keep_alive[obj_id] = min(config.max_trk_keep_alive, state.keep_alive[obj_id] + 1)
        for obj_id in plan.unmatched_obj_ids:
            state.unmatched_frames[obj_id].append(frame_idx)
            state.keep_alive[obj_id] = max(config.min_trk_keep_alive, state.keep_alive[obj_id] - 1)
        if config.decrease_trk_keep_alive_for_empty_masklets:
            for obj_id in plan.empty_obj_ids:
                state.keep_alive[obj_id] = max(config.min_trk_keep_alive, state.keep_alive[obj_id] - 1)

        for obj_id, frames in state.unmatched_frames.items():
            if obj_id in state.removed or obj_id in removed_now:
                continue
            if len(frames) >= config.hotstart_unmatch_thresh and recent(obj_id):
                logger.info("removing object %d on frame %d: unmatched on frames %s", obj_id, frame_idx, frames)
                removed_now.add(obj_id)
            if state.keep_alive[obj_id] <= 0 and not config.suppress_unmatched_only_within_hotstart \
                    and obj_id not in removed_now:
                suppressed.add(obj_id)

        for ids in plan.matched_obj_ids.values():
            if len(ids) < 2:
                continue
            pick = max if reverse else min
            first = pick(ids, key=lambda obj_id: state.first_frame[obj_id])
            for obj_id in ids:
                if obj_id != first:
                    state.overlap_frames[(first, obj_id)].append(frame_idx)
        for (first, obj_id), frames in state.overlap_frames.items():
            if obj_id in state.removed or obj_id in removed_now:
                continue
            if recent(obj_id) and len(frames) >= config.hotstart_dup_thresh:
                logger.info("removing object %d on frame %d: a duplicate of %d on frames %s", obj_id, frame_idx,
                            first, frames)
                removed_now.add(obj_id)
        state.removed.update(removed_now)
        return removed_now, suppressed

    def _recondition_masks(self, obj_ids: list[int], detections: Detections, track_masks: torch.Tensor,
                           track_logits: torch.Tensor, pairs: dict[int, int]) -> dict[int, torch.Tensor]:
        """obj index -> (1, 1, h, w) mask to write into the memory as a conditioning frame, for masklets
        whose tracker score logit and matched detection are both confident. The tracked mask is a view
        of `track_masks`, so a later suppression on this frame reaches it (as in the reference)."""
        out = {}
        index_of = {obj_id: index for index, obj_id in enumerate(obj_ids)}
        for obj_id, det_index in pairs.items():
            index = index_of[obj_id]
            if track_logits[index] <= self.config.high_conf_thresh:
                continue
            if self.config.recondition_on_trk_masks:
                out[index] = track_masks[index : index + 1].unsqueeze(1)
            else:
                out[index] = (detections.masks[det_index : det_index + 1].unsqueeze(1) >= 0.5)
        return out

    def _suppress_recently_occluded(self, state: ConceptVideoState, frame_idx: int, track_masks: torch.Tensor,
                                    removed_now: set[int], reverse: bool) -> None:
        """Among masklets of one prompt whose masks overlap by the threshold, the one occluded most
        recently (an object the hot-start rules remove now counts as always occluded) is suppressed:
        its mask is set to -10 in place (memory and output). Updates each object's last-occluded frame
        (an empty or suppressed mask is an occlusion)."""
        obj_ids = state.obj_ids
        device = track_masks.device
        binary = track_masks > 0
        last = torch.tensor([state.last_occluded.get(obj_id, ALWAYS_OCCLUDED if obj_id in removed_now else NEVER_OCCLUDED)
                             for obj_id in obj_ids], dtype=torch.long, device=device)
        prompts = torch.tensor([state.obj_prompt[obj_id] for obj_id in obj_ids], dtype=torch.long, device=device)
        suppress = torch.zeros(len(obj_ids), dtype=torch.bool, device=device)
        threshold = self.config.suppress_overlapping_based_on_recent_occlusion_threshold
        later = torch.lt if reverse else torch.gt
        for prompt_id in prompts.unique(sorted=True):
            members = torch.nonzero(prompts == prompt_id, as_tuple=True)[0]
            if len(members) <= 1:
                continue
            group_last = last[members]
            pairs = torch.triu(mask_iou(binary[members], binary[members]) >= threshold, diagonal=1)
            row, col = group_last[:, None], group_last[None, :]
            first = pairs & later(row, col) & (col > NEVER_OCCLUDED)
            second = pairs & later(col, row) & (row > NEVER_OCCLUDED)
            suppress[members] = first.any(dim=1) | second.any(dim=0)
        occluded = ~binary.any(dim=(-1, -2)) | suppress
        last = torch.where(occluded, torch.full_like(last, frame_idx), last)
        state.last_occluded = {obj_id: int(value) for obj_id, value in zip(obj_ids, last.tolist())}
        track_masks[suppress] = NO_OBJECT_MASK_LOGIT

    def _update_memories(self, state: ConceptVideoState, frame_idx: int, track_masks: torch.Tensor,
                         recondition: dict[int, torch.Tensor]) -> None:
        """Every masklet's memory on this frame, in one batch: its low-res mask (a reconditioned one's
        replaced, the frame made a conditioning frame), masks that shrink below 30% when overlaps are
        resolved pixel by pixel (per prompt) suppressed, the object score +-10 by whether the mask is
        empty, through the memory encoder (sigmoid of the logits)."""
        video = state.video
        masks = track_masks.unsqueeze(1)
        tracks = list(video.objects.values())
        for index, mask in recondition.items():
            masks[index] = mask.float()
            track = tracks[index]
            output = track.tracked.pop(frame_idx, None)
            if output is not None:
                output.is_cond = True
                track.cond[frame_idx] = output
        masks = suppress_shrunk_masks(masks, [state.obj_prompt[track.obj_id] for track in tracks])
        present = torch.where((masks > 0).any(dim=(-1, -2)), 10.0, -10.0)
        features = video.cache.features
        memory = self.tracker._encode_memory(video, features, self._memory_size(masks), present, binarize=False)
        for index, track in enumerate(tracks):
            output = track.cond.get(frame_idx) or track.tracked.get(frame_idx)
            output.maskmem_features = memory[index : index + 1]

    def _memory_size(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, s, s) logits resized (bilinear, antialiased) to the memory encoder's input size,
        before any sigmoid or binarisation, as both references do in this pipeline."""
        size = self.tracker.model.memory_encoder.mask_downsampler.mask_size
        if tuple(masks.shape[-2:]) == (size, size):
            return masks
        return F.interpolate(masks.float(), (size, size), mode="bilinear", align_corners=False, antialias=True)

    def _add_objects(self, state: ConceptVideoState, frame_idx: int, new_ids: list[int], det_masks: torch.Tensor) -> None:
        """New objects from their detection masks (logits >= 0.5), each taken as the answer on its
        first (conditioning) frame. As in the reference, this frame's memory of the objects already
        tracked is then encoded again, with theirs, from each one's own binarised tracker mask."""
        video, model = state.video, self.tracker.model
        features = video.cache.features
        size = self.image_size
        prompts = (det_masks >= 0.5).float()[:, None]
        prompts = F.interpolate(prompts, (size, size), mode="bilinear", align_corners=False, antialias=True)
        again = [track for track in video.objects.values() if frame_idx not in track.cond]
        high_res = [F.interpolate(track.tracked[frame_idx].low_res_masks.to(video.device), (size, size),
                                  mode="bilinear", align_corners=False) for track in again]
        logits = [track.tracked[frame_idx].object_score_logits for track in again]
        added = []
        for obj_id, prompt in zip(new_ids, prompts):
            output = model.mask_as_output(features.vision_feats, features.high_res_feats, prompt[None])
            track = ObjectTrack(obj_id)
            track.cond[frame_idx] = FrameMemory(low_res_masks=output.low_res_masks.to(video.storage_device),
                                                object_score_logits=output.object_score_logits,
                                                obj_ptr=output.obj_ptr, is_cond=True)
            video.objects[obj_id] = track
            added.append(track)
            high_res.append(output.high_res_masks)
            logits.append(output.object_score_logits)
        memory = self.tracker._encode_memory(video, features, self._memory_size(torch.cat(high_res)),
                                             torch.cat(logits), binarize=True)
        for index, track in enumerate(again):
            track.tracked[frame_idx].maskmem_features = memory[index : index + 1]
        for index, track in enumerate(added, start=len(again)):
            track.cond[frame_idx].maskmem_features = memory[index : index + 1]

    def _postprocess(self, state: ConceptVideoState, frame: _RawFrame) -> ConceptFrame:
        """As transformers' `Sam3VideoProcessor.postprocess_outputs`: low-res logits to the video size
        (bilinear) and cut at 0; empty masks and hidden ids (removed by the hot-start rules, or out of
        keep-alive) dropped; boxes from the masks; then (non_overlap_masks) per prompt each pixel kept
        only by the object with the highest tracker score there."""
        from torchvision.ops import masks_to_boxes

        height, width = state.video.video_height, state.video.video_width
        obj_ids = sorted(frame.low_res)
        if not obj_ids:
            return ConceptFrame(frame.frame_idx, [], torch.zeros(0, height, width, dtype=torch.bool),
                                torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), [], frame.image)
        low_res = torch.stack([frame.low_res[obj_id] for obj_id in obj_ids]).float()
        masks = F.interpolate(low_res[:, None], (height, width), mode="bilinear", align_corners=False)[:, 0] > 0
        for index, obj_id in enumerate(obj_ids):
            if obj_id in frame.video_size:  # a clicked mask, its holes filled at the video size
                masks[index] = frame.video_size[obj_id].to(masks.device)
        hidden = frame.suppressed | state.hidden
        keep = [i for i, obj_id in enumerate(obj_ids) if masks[i].any() and obj_id not in hidden]
        obj_ids = [obj_ids[i] for i in keep]
        masks = masks[keep].cpu()
        scores = torch.tensor([frame.scores[obj_id] for obj_id in obj_ids], dtype=torch.float32)
        tracker_scores = torch.tensor([frame.tracker_scores.get(obj_id, 0.0) for obj_id in obj_ids], dtype=torch.float32)
        boxes = masks_to_boxes(masks) if len(obj_ids) else torch.zeros(0, 4)
        prompt_of = [state.obj_prompt[obj_id] for obj_id in obj_ids]
        if len(obj_ids) > 1 and self.non_overlap_masks:
            masks = keep_top_scoring(masks, tracker_scores, prompt_of)
        labels = [state.prompts.get(prompt_id, "") for prompt_id in prompt_of]
        return ConceptFrame(frame.frame_idx, obj_ids, masks, boxes, scores, tracker_scores, labels, frame.image)


# --------------------------------------------------------------------------- the rules, as functions
def plan_propagation(actions: list[_Action], num_frames: int) -> tuple[str, list[int] | None]:
    """What the next propagation runs after clicks (Meta's parse_action_history_for_propagation):
    "partial" for the objects added or refined since the last propagation; right after a partial
    (or full) propagation, the same again (the other direction), unless it started on the first or
    last frame or was the second in a row; otherwise "fetch" (cached results)."""
    if not actions:
        return "full", None
    last = actions[-1]
    if last.kind in ("full", "partial", "fetch"):
        if last.kind == "fetch":
            return "fetch", None
        if (len(actions) > 1 and actions[-2].kind in ("full", "partial")) or last.frame_idx in (0, num_frames - 1):
            return "fetch", None
        return last.kind, last.obj_ids
    obj_ids: list[int] = []
    for action in reversed(actions):
        if action.kind in ("full", "partial", "fetch"):
            break
        if action.kind in ("add", "refine"):
            obj_ids.extend(i for i in action.obj_ids if i not in obj_ids)
    return ("partial", sorted(obj_ids)) if obj_ids else ("fetch", None)


def associate(detections: Detections, track_masks: torch.Tensor, obj_ids: list[int], track_prompts: torch.Tensor,
              config: ConceptTrackingConfig) -> Association:
    """Match one frame's detections with the masklets by the IoU of their low-res masks (> 0), only
    within a prompt. A detection overlapping any masklet by assoc_iou_thresh is not new (many
    masklets may match one detection); one that overlaps none and scores at least new_det_thresh
    starts an object. A non-empty masklet that no detection overlaps by trk_assoc_iou_thresh is
    unmatched. A detection scoring at least high_conf_thresh whose best IoU is at least
    high_iou_thresh may recondition that masklet (the last such detection wins)."""
    device = track_masks.device
    ids = torch.tensor(obj_ids, dtype=torch.long, device=device)
    if track_masks.shape[0] == 0:
        return Association(list(range(len(detections))), [], {}, {}, [])
    nonempty = (track_masks > 0).any(dim=(1, 2))
    if len(detections) == 0:
        return Association([], ids[nonempty].tolist(), {}, {}, ids[~nonempty].tolist())
    ious = mask_iou(detections.masks > 0, track_masks > 0)
    ious = torch.where(detections.prompt_ids[:, None] == track_prompts[None, :], ious, torch.zeros_like(ious))
    matched = (ious >= config.trk_assoc_iou_thresh).any(dim=0)
    unmatched = ids[nonempty & ~matched].tolist()
    overlaps = ious >= config.assoc_iou_thresh
    is_new = (detections.scores >= config.new_det_thresh) & ~overlaps.any(dim=1)
    best, best_iou = ious.argmax(dim=1), ious.max(dim=1).values
    confident = (detections.scores >= config.high_conf_thresh) & ~is_new & (best_iou >= config.high_iou_thresh)
    matches, recondition = {}, {}
    for det_index in range(len(detections)):
        matches[det_index] = ids[overlaps[det_index]].tolist()
        if confident[det_index]:
            recondition[int(ids[best[det_index]])] = det_index
    return Association(torch.nonzero(is_new, as_tuple=True)[0].tolist(), unmatched, matches, recondition,
                       ids[~nonempty].tolist())


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, h, w) and (M, h, w) bool masks -> (N, M) IoU (0 where both are empty)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def mask_nms(probs: torch.Tensor, masks: torch.Tensor, prob_threshold: float, iou_threshold: float) -> torch.Tensor:
    """(Q,) scores and (Q, h, w) mask logits -> (Q,) bool: above prob_threshold and not overlapping a
    higher-scoring kept detection by more than iou_threshold (greedy NMS on mask IoU)."""
    valid = probs > prob_threshold
    candidates = torch.nonzero(valid, as_tuple=True)[0]
    if len(candidates) == 0:
        return valid
    ious = mask_iou(masks[candidates] > 0, masks[candidates] > 0)
    order = torch.argsort(probs[candidates], descending=True, stable=True).tolist()
    kept: list[int] = []
    for i in order:
        if all(ious[i, j] <= iou_threshold for j in kept):
            kept.append(i)
    keep = torch.zeros_like(valid)
    keep[candidates[kept]] = True
    return keep


def fill_holes_and_sprinkles(masks: torch.Tensor, max_area: int) -> torch.Tensor:
    """(N, h, w) logits: background regions (8-connected) of at most max_area pixels become 0.1, then
    foreground regions of at most min(max_area, half the mask's area) become -0.1 (Meta's and
    transformers' post-processing; transformers skips it where its CUDA kernel is unavailable)."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=bool)
    out = masks.clone()
    for index in range(out.shape[0]):
        background = (out[index] <= 0).cpu().numpy()
        labels, count = ndimage.label(background, structure)
        if count:
            areas = np.bincount(labels.ravel())
            small = (areas <= max_area) & (np.arange(len(areas)) > 0)
            holes = torch.from_numpy(small[labels]).to(out.device)
            out[index] = torch.where(holes, torch.full_like(out[index], 0.1), out[index])
        foreground = (out[index] > 0).cpu().numpy()
        labels, count = ndimage.label(foreground, structure)
        if count:
            areas = np.bincount(labels.ravel())
            limit = min(max_area, int(foreground.sum()) // 2)
            small = (areas <= limit) & (np.arange(len(areas)) > 0)
            sprinkles = torch.from_numpy(small[labels]).to(out.device)
            out[index] = torch.where(sprinkles, torch.full_like(out[index], -0.1), out[index])
    return out


def suppress_shrunk_masks(masks: torch.Tensor, prompt_ids: list[int], shrink_threshold: float = 0.3) -> torch.Tensor:
    """(M, 1, h, w) logits: per prompt, where objects overlap only the highest logit keeps the pixel;
    a mask left with less than shrink_threshold of its area is clamped to at most -10 (whole)."""
    out = masks.clone()
    groups = torch.tensor(prompt_ids, dtype=torch.long)
    for prompt_id in groups.unique(sorted=True):
        members = torch.nonzero(groups == prompt_id, as_tuple=True)[0].to(masks.device)
        if len(members) <= 1:
            continue
        group = out[members]
        top = torch.argmax(group, dim=0, keepdim=True)
        own = torch.arange(len(members), device=masks.device)[:, None, None, None]
        alone = torch.where(top == own, group, group.clamp(max=-10.0))
        before = (group > 0).sum(dim=(-1, -2)).clamp(min=1)
        after = (alone > 0).sum(dim=(-1, -2))
        keep = (after / before) >= shrink_threshold
        out[members] = torch.where(keep[..., None, None], group, group.clamp(max=-10.0))
    return out


def keep_top_scoring(masks: torch.Tensor, scores: torch.Tensor, prompt_ids: list[int]) -> torch.Tensor:
    """(N, H, W) bool: per prompt, a pixel stays only in the mask of the object with the highest
    score there (the first in id order on ties)."""
    out = masks.clone()
    groups = torch.tensor(prompt_ids, dtype=torch.long)
    for prompt_id in groups.unique(sorted=True):
        members = torch.nonzero(groups == prompt_id, as_tuple=True)[0]
        if len(members) <= 1:
            continue
        group = masks[members]
        weighted = torch.where(group, scores[members][:, None, None], torch.zeros(()))
        top = torch.argmax(weighted, dim=0, keepdim=True)
        own = torch.arange(len(members))[:, None, None]
        out[members] = group & (top == own) & (weighted > 0)
    return out


def tracker_frame_features(levels: list[torch.Tensor]) -> FrameFeatures:
    """The tracker's FrameFeatures from `Sam3TrackerImageEncoder.decoder_levels`, as Sam3Tracker.encode_frame."""
    from ..sam3.layers import sine_grid

    embed = levels[2]
    position = sine_grid(embed.shape[-2], embed.shape[-1], embed.shape[1], embed.device, embed.dtype)
    return FrameFeatures(embed, position[None].expand(embed.shape[0], -1, -1, -1), levels[:2])
