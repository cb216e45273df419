"""SAM 3 video concept inference (sam.video.concept) against transformers' `Sam3VideoModel` on the same
tiny random weights, loaded by ours from the reference's own `save_pretrained` directory.

The clip is real photos moving over a real background (vis_clip). Both sides get the same pixels
(each frame stretched to the square with PIL bicubic, normalised with mean = std = 0.5) and the same
text tokens; ours runs with its defaults (transformers' pipeline: no exemplar cls token in a text
prompt). Where transformers cannot load its CUDA
kernels (on CPU, offline) it skips mask NMS and hole filling, so the saved config switches both off
(`det_nms_thresh=0`, `fill_hole_area=0`); ours does both when asked (tested on their own here).

Random queries make nearly identical detections; `spread_queries` (sam3_concept_support) fixes that
so the rules have something to decide: the released thresholds turn frame 0's 14 detections into
14 objects and the hot-start rule removes the 13 duplicates on frame 1, before any is shown;
stricter thresholds keep several objects and start more on frame 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sam3_concept_support import Reference, reference_pixels, save_tiny_video_model, text_reference
from sam3_concept_support import mask_iou as iou
from vis_clip import moving_objects_clip

from sam.video import VideoLoadError
from sam.video.concept import (
    ConceptTrackingConfig, Detections, Sam3ConceptVideoPredictor, associate, fill_holes_and_sprinkles, keep_top_scoring,
    mask_nms,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_FRAMES, HEIGHT, WIDTH = 6, 72, 96
TEXT = "a cat"
# Several objects live through the clip and six more start on frame 1 (the tracker's masks drift on
# random weights, so detections rarely confirm them: they count unmatched frames).
STRICT = dict(score_threshold_detection=0.8, assoc_iou_thresh=0.7, trk_assoc_iou_thresh=0.8, new_det_thresh=0.9,
              recondition_every_nth_frame=2, high_iou_thresh=0.5)


@pytest.fixture(scope="module")
def frames():
    return moving_objects_clip(NUM_FRAMES, HEIGHT, WIDTH)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, frames):
    from sam.sam3.text import tokenize

    return save_tiny_video_model(tmp_path_factory.mktemp("sam3cv"), calibration=(reference_pixels(frames), tokenize([TEXT])),
                                 fill_hole_area=0, det_nms_thresh=0.0)


def predictor_for(saved, **settings) -> Sam3ConceptVideoPredictor:
    return Sam3ConceptVideoPredictor.from_checkpoint(saved["transformers"], **settings)


def reference_for(saved, frames, **settings) -> Reference:
    return text_reference(saved, frames, TEXT, **settings)


def assert_same_run(theirs: list[dict], ours: list, what: str, min_fill: float = 0.0) -> None:
    """Same frames, same ids per frame, scores within 1e-4, every object's mask at IoU >= 0.99."""
    assert [f["frame_idx"] for f in theirs] == [f.frame_idx for f in ours], what
    for their, our in zip(theirs, ours):
        where = f"{what}, frame {our.frame_idx}"
        assert their["obj_ids"] == our.obj_ids, where
        assert our.masks.shape == (len(our.obj_ids), HEIGHT, WIDTH) and our.masks.dtype == torch.bool, where
        torch.testing.assert_close(our.scores, their["scores"].float(), atol=1e-4, rtol=0, msg=where)
        torch.testing.assert_close(our.boxes, their["boxes"].float(), atol=1.0, rtol=0, msg=where)
        assert our.labels == [TEXT] * len(our.obj_ids), where
        for index, obj_id in enumerate(our.obj_ids):
            fill = our.masks[index].float().mean().item()
            assert min_fill <= fill < 0.98, f"{where}: object {obj_id} fill {fill:.3f}"
            overlap = iou(their["masks"][index], our.masks[index])
            assert overlap >= 0.99, f"{where}: object {obj_id} IoU {overlap:.4f}"


def test_released_thresholds_match_transformers(saved, frames):
    """The released association settings (hot-start delay 15, duplicates removed after 8 frames at
    most, here after 1: every duplicate pair counts once per detection) on a forward pass: frame 0
    starts 14 objects, frame 1 removes the 13 that duplicate object 0, and none of them is ever shown."""
    predictor = predictor_for(saved)
    assert predictor.config.fill_hole_area == 0 and predictor.config.det_nms_thresh == 0  # read from config.json
    assert predictor.config.assoc_iou_thresh == 0.1 and predictor.config.hotstart_delay == 15
    reference = reference_for(saved, frames)
    theirs = reference.propagate()
    state = predictor.init_state(frames)
    assert predictor.add_text_prompt(state, TEXT) == 0 and predictor.add_text_prompt(state, f" {TEXT} ") == 0
    ours = list(predictor.propagate_in_video(state))
    assert_same_run(theirs, ours, "released", min_fill=0.05)
    assert state.removed == reference.session.removed_obj_ids == set(range(1, 14))
    assert all(frame.obj_ids == [0] for frame in ours)
    assert state.keep_alive == reference.session.trk_keep_alive
    assert dict(state.unmatched_frames) == dict(reference.session.unmatched_frame_inds)


def test_strict_thresholds_match_transformers(saved, frames):
    """Stricter IoU and score thresholds: 7 objects on frame 0, 6 more start on frame 1 (new only
    where no masklet overlaps by 0.7), none removed. Compared before the final one-object-per-pixel
    step, whose winner is decided by tracker scores that differ by ~1e-5 between the random tracker's
    look-alike masklets (below float noise); that step is compared on its own, on our masks."""
    predictor = predictor_for(saved, non_overlap_masks=False, **STRICT)
    reference = reference_for(saved, frames, **STRICT)
    theirs = reference.propagate(non_overlap=False)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    ours = list(predictor.propagate_in_video(state))
    assert_same_run(theirs, ours, "strict", min_fill=0.05)
    assert ours[0].obj_ids == list(range(7)) and ours[-1].obj_ids == list(range(13))
    assert {i: sorted(track.cond) for i, track in state.video.objects.items()} == \
        {i: [0] if i < 7 else [1] for i in range(13)}
    assert state.keep_alive == reference.session.trk_keep_alive

    from transformers import Sam3VideoProcessor

    processor = object.__new__(Sam3VideoProcessor)
    for frame in ours[1:3]:
        prompts = [0] * len(frame)
        theirs_resolved = processor._apply_object_wise_non_overlapping_constraints(
            frame.masks.unsqueeze(1), frame.tracker_scores.unsqueeze(1), background_value=0, prompt_ids=prompts)
        resolved = keep_top_scoring(frame.masks, frame.tracker_scores, prompts)
        assert torch.equal(resolved, theirs_resolved.squeeze(1) > 0)
        assert resolved.sum(dim=0).max() <= 1 < frame.masks.sum(dim=0).max()


def test_reverse_propagation_matches_transformers(saved, frames):
    """Backwards from the last frame (transformers' order: frames T-2 .. 0), hot-start rules counted
    the other way round."""
    predictor = predictor_for(saved)
    reference = reference_for(saved, frames)
    theirs = reference.propagate(start_frame_idx=NUM_FRAMES - 1, reverse=True)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    ours = list(predictor.propagate_in_video(state, start_frame_idx=NUM_FRAMES - 1, reverse=True))
    assert [frame.frame_idx for frame in ours] == list(range(NUM_FRAMES - 2, -1, -1))
    assert_same_run(theirs, ours, "reverse", min_fill=0.05)
    assert any(len(frame) for frame in ours)
    assert state.removed == reference.session.removed_obj_ids


def test_rules_on_given_masks():
    """associate() on hand-made masks: a duplicate detection, a lost masklet, a new object, the
    new-object score threshold, prompts kept apart; NMS and hole filling."""
    config = ConceptTrackingConfig()
    canvas = torch.full((4, 8, 8), -5.0)
    canvas[0, :4, :4] = 5.0  # det 0 == track 10
    canvas[1, :4, :5] = 5.0  # det 1 overlaps track 10 too (IoU 0.8)
    canvas[2, 5:, 5:] = 5.0  # det 2: nowhere tracked, confident -> new
    canvas[3, 5:, :2] = 5.0  # det 3: nowhere tracked, not confident enough
    detections = Detections(canvas, torch.tensor([0.9, 0.85, 0.75, 0.6]), torch.zeros(4, dtype=torch.long))
    tracks = torch.full((3, 8, 8), -5.0)
    tracks[0, :4, :4] = 5.0
    tracks[1, 4:, :4] = 5.0  # lost: overlaps det 3 by IoU 0.375 < 0.5
    plan = associate(detections, tracks, [10, 11, 12], torch.zeros(3, dtype=torch.long), config)
    assert plan.new_det_indices == [2]
    assert plan.unmatched_obj_ids == [11] and plan.empty_obj_ids == [12]
    assert plan.matched_obj_ids == {0: [10], 1: [10], 2: [], 3: [11]}
    assert plan.recondition_det == {10: 1}  # the last confident detection with IoU >= 0.8 wins
    other_prompt = associate(detections, tracks, [10, 11, 12], torch.ones(3, dtype=torch.long), config)
    assert other_prompt.new_det_indices == [0, 1, 2] and other_prompt.unmatched_obj_ids == [10, 11]

    keep = mask_nms(detections.scores, canvas, prob_threshold=0.5, iou_threshold=0.1)
    assert keep.tolist() == [True, False, True, True]
    mask = torch.full((1, 12, 12), 5.0)
    mask[0, 5, 5] = -5.0  # a one-pixel hole
    mask[0, :, 10:] = -5.0
    mask[0, 0, 11] = 5.0  # a one-pixel sprinkle
    filled = fill_holes_and_sprinkles(mask, max_area=4)
    assert filled[0, 5, 5] == 0.1 and filled[0, 0, 11] == -0.1 and (filled[0, :, :10] > 0).all()


def test_bad_input_says_what_is_wrong(saved, frames, tmp_path):
    predictor = predictor_for(saved)
    state = predictor.init_state(frames)
    with pytest.raises(ValueError, match="no text prompt"):
        predictor.propagate_in_video(state)
    for text in ("", "   ", None):
        with pytest.raises(ValueError, match="non-empty phrase"):
            predictor.add_text_prompt(state, text)
    predictor.add_text_prompt(state, TEXT)
    with pytest.raises(ValueError, match="outside the video's frames 0..5"):
        predictor.propagate_in_video(state, start_frame_idx=NUM_FRAMES)
    with pytest.raises(ValueError, match="non-negative int"):
        predictor.propagate_in_video(state, max_frame_num_to_track=-1)
    with pytest.raises(ValueError, match="no object with id 3"):
        predictor.remove_object(state, 3)
    with pytest.raises(ValueError, match="unknown SAM 3 video setting"):
        predictor_for(saved, assoc_iou=0.5)
    with pytest.raises(ValueError, match="must be at most hotstart_delay"):
        ConceptTrackingConfig(hotstart_delay=4)
    for index, frame in enumerate(frames[:3]):
        if index == 2:
            frame = frame[:, :80]  # the third frame is narrower
        Image.fromarray(np.ascontiguousarray(frame)).save(tmp_path / f"{index:05d}.png")
    state = predictor.init_state(tmp_path)
    predictor.add_text_prompt(state, TEXT)
    frames_seen = []
    with pytest.raises(VideoLoadError, match="frame 2 is 80x72 but the video's frames are 96x72"):
        for frame in predictor_for(saved, hotstart_delay=0).propagate_in_video(state):
            frames_seen.append(frame.frame_idx)
    assert frames_seen == [0, 1]  # the frames before the bad one came out (no hot-start delay)


def test_remove_object_and_reset(saved, frames):
    """Between two frames the caller may remove an object; a reset forgets objects and prompts."""
    predictor = predictor_for(saved, hotstart_delay=0)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    run = predictor.propagate_in_video(state, max_frame_num_to_track=2)
    first = next(run)
    assert first.frame_idx == 0 and 0 in first.obj_ids
    assert 0 not in predictor.remove_object(state, 0)
    later = list(run)
    assert [frame.frame_idx for frame in later] == [1, 2]
    assert all(0 not in frame.obj_ids for frame in later)
    predictor.reset_state(state)
    assert state.obj_ids == [] and state.prompts == {} and state.max_obj_id == -1


def test_meta_layout_loads_and_runs_with_nms_and_hole_filling(tmp_path, frames):
    """Meta's `sam3.pt` layout (detector and tracker on one ViT, no association settings in it): the
    released defaults, NMS and hole filling on, the exemplar token in; objects come out on every frame."""
    from sam3_video_support import save_tiny_sam3_with_tracker

    predictor = Sam3ConceptVideoPredictor.from_checkpoint(save_tiny_sam3_with_tracker(tmp_path), exemplar_token=True)
    assert predictor.config == ConceptTrackingConfig()
    assert predictor.exemplar_token and predictor.tracker.model.memory_mask_resize == "mask"  # not used here
    assert predictor.tracker.model.image_encoder.trunk is predictor.detector.backbone.vision_backbone.trunk
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    ours = list(predictor.propagate_in_video(state, max_frame_num_to_track=2))
    assert [frame.frame_idx for frame in ours] == [0, 1, 2]
    assert all(len(frame) > 0 and frame.masks.any(dim=(1, 2)).all() for frame in ours)


def test_a_removal_frame_keeps_each_mask_with_its_id(saved, frames):
    """Where ours differs from transformers on purpose. Unmatched twice within the hot-start delay,
    objects 0-6 (started on frame 0) are removed on frame 2 while 7-12 (started on frame 1) stay.
    transformers then pairs frame 2's masks, still listed 0..12, with the shortened id list 7..12, so
    object 7 gets object 0's mask; ours keeps each object's own mask (and agrees everywhere else)."""
    settings = dict(STRICT, hotstart_delay=4, hotstart_unmatch_thresh=2, hotstart_dup_thresh=4)
    predictor = predictor_for(saved, **settings)
    reference = reference_for(saved, frames, **settings)
    with torch.no_grad():
        theirs = {out.frame_idx: out for out in reference.model.propagate_in_video_iterator(reference.session)}
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    ours = {}
    step = predictor._step

    def keep_raw(*args):
        raw, removed = step(*args)
        ours[raw.frame_idx] = raw
        return raw, removed

    predictor._step = keep_raw
    list(predictor.propagate_in_video(state))
    assert reference.session.removed_obj_ids == state.removed == set(range(13))  # 7-12 go on frame 3
    for frame_idx in (0, 1):
        assert sorted(theirs[frame_idx].obj_id_to_mask) == sorted(ours[frame_idx].low_res)
        for obj_id, mask in theirs[frame_idx].obj_id_to_mask.items():
            torch.testing.assert_close(ours[frame_idx].low_res[obj_id], mask[0], atol=1e-2, rtol=0)
    assert sorted(theirs[2].obj_id_to_mask) == list(range(7, 13)) and sorted(ours[2].low_res) == list(range(13))
    for shifted, obj_id in enumerate(range(7, 13)):
        torch.testing.assert_close(theirs[2].obj_id_to_mask[obj_id][0], ours[2].low_res[shifted], atol=1e-2, rtol=0)
        assert (theirs[2].obj_id_to_mask[obj_id][0] - ours[2].low_res[obj_id]).abs().max() > 0.1


def test_langsam_track_takes_the_checkpoints_own_rules(saved, frames):
    """LangSAM.track(association="sam3") on a transformers directory follows the rules its
    config.json records (here hole filling and mask NMS off, which the released defaults turn on),
    then sam3_settings, then an explicit box_threshold; and its masks are those of
    Sam3ConceptVideoPredictor.from_checkpoint on the same directory."""
    from dataclasses import asdict

    from langsam import LangSAM

    defaults = ConceptTrackingConfig()
    assert defaults.fill_hole_area > 0 and defaults.det_nms_thresh > 0  # so the file's values show
    pipeline = LangSAM(model="sam3", sam3_checkpoint=saved["transformers"], device="cpu")
    result = pipeline.track(frames[:2], TEXT, association="sam3")
    expected = asdict(predictor_for(saved).config)
    assert expected["fill_hole_area"] == 0 and expected["det_nms_thresh"] == 0.0
    assert {name: result.settings[name] for name in expected} == expected
    tracked = list(result)
    by_hand = predictor_for(saved)
    state = by_hand.init_state(frames[:2])
    by_hand.add_text_prompt(state, TEXT)
    theirs = list(by_hand.propagate_in_video(state))
    assert any(len(frame) for frame in tracked)
    for ours, their in zip(tracked, theirs, strict=True):
        assert list(ours.obj_ids) == [obj_id + 1 for obj_id in their.obj_ids]
        np.testing.assert_array_equal(ours.masks, their.masks.numpy())

    again = pipeline.track(frames[:2], TEXT, association="sam3", box_threshold=0.7,
                           sam3_settings={"det_nms_thresh": 0.5})
    assert again.settings["score_threshold_detection"] == 0.7 and again.settings["det_nms_thresh"] == 0.5
    assert again.settings["fill_hole_area"] == 0


def test_batched_tracking_is_bit_for_bit_one_by_one(saved, frames):
    """`_track_frame` steps all objects of a frame in one batch (13 here, their memory banks alike):
    every mask, pointer and score equals, bit for bit, what `_infer_frame` gives each one alone."""
    predictor = predictor_for(saved, non_overlap_masks=False, **STRICT)
    tracker = predictor.tracker
    batched = type(tracker)._track_frame
    sizes = []

    def checked(self, video, tracks, frame_idx, reverse):
        outputs = batched(self, video, tracks, frame_idx, reverse)
        sizes.append(len(tracks))
        for track, output in zip(tracks, outputs):
            alone = self._infer_frame(video, track, frame_idx, False, reverse, points=None, mask=None,
                                      prev_logits=None, encode_memory=False)
            assert torch.equal(output.low_res_masks, alone.low_res_masks)
            assert torch.equal(output.obj_ptr, alone.obj_ptr)
            assert torch.equal(output.object_score_logits, alone.object_score_logits)
        return outputs

    tracker._track_frame = checked.__get__(tracker)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    list(predictor.propagate_in_video(state))
    assert max(sizes) == 13
