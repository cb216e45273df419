"""Clicks in a text-prompted SAM 3 video session (`Sam3ConceptVideoPredictor.add_prompt` /
`add_new_points_or_box`), against Meta's semantics executed on transformers' parts.

Meta's `Sam3VideoInferenceWithInstanceInteractivity` is the reference for what a click does
(transformers' `Sam3VideoModel` takes no clicks). Its video model cannot be built at tiny sizes on a
CPU here (the builder hard-codes the released sizes, the tracker needs triton), so `ClickReference`
(sam3_concept_support) runs its steps with the same tiny weights through transformers: the text-
prompted run is `Sam3VideoModel`'s, the click and the re-tracking its `Sam3TrackerVideoModel`'s, in
the order and with the inputs Meta's code gives them. What is compared: per frame, the same object
ids and every object's mask at IoU >= 0.99, on the click's frame, forward from it, and in reverse.
transformers resizes logits before the memory encoder's sigmoid (Meta after), so our tracker runs
with memory_mask_resize="logits" here (test_sam3_video checks the two orders on their own).

The clip is real photos moving over a real background (vis_clip); the released thresholds leave
one object (0) of the 14 that frame 0 detects.
"""

from __future__ import annotations

import pytest
import torch
from sam3_concept_support import ClickReference, Reference, reference_pixels, save_tiny_video_model, text_reference
from sam3_concept_support import mask_iou as iou
from vis_clip import moving_objects_clip

from sam.video.concept import Sam3ConceptVideoPredictor, _Action, plan_propagation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_FRAMES, HEIGHT, WIDTH = 6, 72, 96
TEXT = "a cat"
CLICK_FRAME = 3
CLICKS = dict(points=[[40.0, 30.0], [70.0, 50.0]], labels=[1, 0])  # video pixels
NEW_OBJECT = 20


@pytest.fixture(scope="module")
def frames():
    return moving_objects_clip(NUM_FRAMES, HEIGHT, WIDTH)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, frames):
    from sam.sam3.text import tokenize

    return save_tiny_video_model(tmp_path_factory.mktemp("sam3click"),
                                 calibration=(reference_pixels(frames), tokenize([TEXT])),
                                 fill_hole_area=0, det_nms_thresh=0.0)


def predictor_for(saved) -> Sam3ConceptVideoPredictor:
    predictor = Sam3ConceptVideoPredictor.from_checkpoint(saved["transformers"])
    predictor.tracker.model.memory_mask_resize = "logits"  # transformers' order (see the module docstring)
    return predictor


def reference_for(saved, frames, **settings) -> Reference:
    return text_reference(saved, frames, TEXT, **settings)


def assert_same(theirs: dict, ours, what: str) -> None:
    """theirs: {obj_id: (H, W) bool}; ours: a ConceptFrame. Same ids, masks at IoU >= 0.99, textured."""
    where = f"{what}, frame {ours.frame_idx}"
    assert ours.obj_ids == sorted(k for k in theirs if k != "frame_idx"), where
    for index, obj_id in enumerate(ours.obj_ids):
        fill = ours.masks[index].float().mean().item()
        assert 0.01 < fill < 0.9, f"{where}: object {obj_id} fill {fill:.3f}"
        overlap = iou(theirs[obj_id], ours.masks[index])
        assert overlap >= 0.99, f"{where}: object {obj_id} IoU {overlap:.4f}"


def test_a_click_mid_clip_then_both_directions_match_meta_s_semantics(saved, frames):
    """Text prompt, forward over the clip; a positive and a negative click on object 0 at frame 3;
    forward from 3 and backwards from 3 (only object 0 re-tracked, the detector never runs); a third
    propagation returns the cache; a click with a new id on frame 2 starts object 20, tracked
    forward from there while object 0 keeps its results."""
    predictor = predictor_for(saved)
    reference = reference_for(saved, frames)
    theirs = reference.propagate()
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    before = list(predictor.propagate_in_video(state))
    assert [frame.obj_ids for frame in before] == [f["obj_ids"] for f in theirs] == [[0]] * NUM_FRAMES
    for their, our in zip(theirs, before):
        assert iou(their["masks"][0], our.masks[0]) >= 0.99

    clicks = ClickReference(reference, theirs)
    detect = predictor._detect
    predictor._detect = lambda *args: pytest.fail("a propagation after clicks ran the detector")
    clicked = predictor.add_new_points_or_box(state, CLICK_FRAME, 0, **CLICKS)
    assert_same(clicks.click(CLICK_FRAME, 0, CLICKS["points"], CLICKS["labels"]), clicked, "click")
    assert clicked.scores.tolist() == [1.0] and clicked.tracker_scores.tolist() == [1.0]  # the reference's
    assert iou(clicked.masks[0], before[CLICK_FRAME].masks[0]) < 0.5  # the click changed the mask
    assert sorted(state.video.objects[0].cond) == [CLICK_FRAME]  # frame 0's detector frame downgraded

    forward = list(predictor.propagate_in_video(state, start_frame_idx=CLICK_FRAME))
    assert [frame.frame_idx for frame in forward] == list(range(CLICK_FRAME, NUM_FRAMES))
    for their, our in zip(clicks.propagate(range(CLICK_FRAME, NUM_FRAMES), [0]), forward):
        assert_same(their, our, "forward")
    backward = list(predictor.propagate_in_video(state, start_frame_idx=CLICK_FRAME, reverse=True))
    assert [frame.frame_idx for frame in backward] == list(range(CLICK_FRAME - 1, -1, -1))
    for their, our in zip(clicks.propagate(range(CLICK_FRAME - 1, -1, -1), [0]), backward):
        assert_same(their, our, "reverse")
    changed = [iou(a.masks[0], b.masks[0]) < 0.95 for a, b in zip(backward[::-1] + forward, before)]
    assert sum(changed) >= 4, changed  # refining reached most frames

    calls = []
    infer = predictor.tracker._infer_frame
    predictor.tracker._infer_frame = lambda *args, **kwargs: calls.append(1) or infer(*args, **kwargs)
    again = list(predictor.propagate_in_video(state))  # the third: cached results
    assert calls == [] and [frame.frame_idx for frame in again] == list(range(NUM_FRAMES))
    for our, earlier in zip(again, backward[::-1] + forward):
        assert our.obj_ids == earlier.obj_ids and iou(our.masks[0], earlier.masks[0]) >= 0.99

    relative = [[50.0 / WIDTH, 40.0 / HEIGHT]]
    added = predictor.add_prompt(state, 2, points=relative, point_labels=[1], obj_id=NEW_OBJECT)
    assert_same(clicks.click(2, NEW_OBJECT, [[50.0, 40.0]], [1]), added, "new object")
    assert added.obj_ids == [0, NEW_OBJECT] and added.labels == [TEXT, ""] and state.max_obj_id == NEW_OBJECT
    forward = list(predictor.propagate_in_video(state, start_frame_idx=2))
    assert calls and all(frame.obj_ids == [0, NEW_OBJECT] for frame in forward)
    for their, our in zip(clicks.propagate(range(2, NUM_FRAMES), [NEW_OBJECT]), forward):
        assert_same(their, our, "new object, forward")
    predictor._detect = detect


def test_bad_clicks_say_what_is_wrong(saved, frames):
    predictor = predictor_for(saved)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    with pytest.raises(ValueError, match="frame 1 has no results yet: propagate_in_video over it"):
        predictor.add_new_points_or_box(state, 1, 0, points=[[10, 10]], labels=[1])
    flat = predictor.init_state(frames, cache_results=False)
    predictor.add_text_prompt(flat, TEXT)
    list(predictor.propagate_in_video(flat, max_frame_num_to_track=1))
    assert flat.frame_outputs == {}
    with pytest.raises(ValueError, match="keeps no results"):
        predictor.add_new_points_or_box(flat, 0, 0, points=[[10, 10]], labels=[1])
    list(predictor.propagate_in_video(state, max_frame_num_to_track=1))
    with pytest.raises(ValueError, match="outside the video's frames 0..5"):
        predictor.add_new_points_or_box(state, 6, 0, points=[[10, 10]], labels=[1])
    with pytest.raises(ValueError, match=r"points \[\[100.0, 10.0\]\] lie outside the 96x72 frame"):
        predictor.add_new_points_or_box(state, 0, 0, points=[[10, 10], [100, 10]], labels=[1, 1])
    with pytest.raises(ValueError, match="relative coordinates must be in"):
        predictor.add_prompt(state, 0, points=[[10, 10]], point_labels=[1], obj_id=0)
    with pytest.raises(ValueError, match="2 points but labels has shape"):
        predictor.add_new_points_or_box(state, 0, 0, points=[[10, 10], [20, 20]], labels=[1])
    with pytest.raises(ValueError, match="labels must be 1"):
        predictor.add_new_points_or_box(state, 0, 0, points=[[10, 10]], labels=[2])
    with pytest.raises(ValueError, match="give points"):
        predictor.add_new_points_or_box(state, 0, 0)
    with pytest.raises(ValueError, match="use add_text_prompt"):
        predictor.add_prompt(state, 0, "a dog")
    with pytest.raises(ValueError, match="need the obj_id"):
        predictor.add_prompt(state, 0, points=[[0.5, 0.5]], point_labels=[1])
    with pytest.raises(ValueError, match="obj_id must be an int"):
        predictor.add_new_points_or_box(state, 0, "0", points=[[10, 10]], labels=[1])
    assert state.actions == []  # nothing was clicked

    boxed = predictor.add_new_points_or_box(state, 1, 0, box=[20, 10, 70, 60])  # a box: two corner clicks
    assert boxed.obj_ids == [0] and state.actions == [_Action("refine", 1, [0])]
    with pytest.raises(ValueError, match="call reset_state"):
        predictor.add_text_prompt(state, "a dog")
    predictor.remove_object(state, 0)
    assert [frame.obj_ids for frame in predictor.propagate_in_video(state, max_frame_num_to_track=1)] == [[], []]
    predictor.reset_state(state)
    assert state.actions == [] and state.frame_outputs == {}
    predictor.add_text_prompt(state, "a dog")


def test_a_clicked_mask_has_its_holes_filled_at_the_video_size(saved, frames):
    """With hole filling on, a click's mask is filled at the video size (Meta's add_tracker_new_points)
    and shown so; re-tracking the frame fills the tracker's mask at low resolution, as on tracked
    frames (Meta's partial propagation), and ranks it by its object-score logit."""
    from sam.video.concept import fill_holes_and_sprinkles

    # The random tracker's click masks are speckled at the video size: 2 pixels keeps some of it.
    predictor = Sam3ConceptVideoPredictor.from_checkpoint(saved["transformers"], fill_hole_area=2)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    list(predictor.propagate_in_video(state, max_frame_num_to_track=1))
    clicked = predictor.add_new_points_or_box(state, 1, 0, **CLICKS)
    low_res = state.video.objects[0].cond[1].low_res_masks.float()
    logits = torch.nn.functional.interpolate(low_res, (HEIGHT, WIDTH), mode="bilinear", align_corners=False)[:, 0]
    expected = fill_holes_and_sprinkles(logits, 2)[0] > 0
    assert 0 < expected.sum() < (logits > 0).sum()  # filling changed it
    assert torch.equal(clicked.masks[0], expected) and torch.equal(state.frame_outputs[1].video_size[0], expected)
    again = list(predictor.propagate_in_video(state, start_frame_idx=1, max_frame_num_to_track=0))
    filled_low_res = fill_holes_and_sprinkles(low_res[:, 0], 2)[:, None]
    shown = torch.nn.functional.interpolate(filled_low_res, (HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    assert torch.equal(again[0].masks[0], shown[0, 0] > 0) and state.frame_outputs[1].video_size == {}
    logit = float(state.video.objects[0].cond[1].object_score_logits.flatten()[0])
    assert logit > 1 and again[0].tracker_scores.tolist() == [pytest.approx(logit)]


def test_a_removed_id_starts_afresh_and_clicks_can_add_up(saved, frames):
    """Object 5, removed by the hot-start rules (a duplicate), clicked: it starts again from the clicks
    alone (as Meta's: no tracker holds it any more), shown with score 1. clear_old_points=False adds
    clicks to the frame's earlier ones; a click on the frame of an object's detection replaces it."""
    predictor = predictor_for(saved)
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    list(predictor.propagate_in_video(state, max_frame_num_to_track=1))
    assert 5 in state.removed and 5 in state.hidden and 5 not in state.obj_ids
    frame = predictor.add_new_points_or_box(state, 1, 5, points=[[50.0, 40.0]], labels=[1])
    assert frame.obj_ids == [0, 5] and frame.scores.tolist() == [pytest.approx(state.scores[0]), 1.0]
    assert 5 not in state.removed | state.hidden and sorted(state.video.objects[5].cond) == [1]
    predictor.add_new_points_or_box(state, 1, 5, points=[[20.0, 20.0]], labels=[0], clear_old_points=False)
    assert state.video.objects[5].points[1].labels.tolist() == [[1, 0]]
    many = [[float(x), 30.0] for x in range(5, 95, 5)]  # 18 clicks: the first 8 and the last 8 are decoded
    decoded = []
    heads = predictor.tracker.model.track_heads
    predictor.tracker.model.track_heads = lambda *args: decoded.append(args[2].clone()) or heads(*args)
    predictor.add_new_points_or_box(state, 1, 5, points=many, labels=[1] * len(many))
    predictor.tracker.model.track_heads = heads
    expected = torch.tensor(many[:8] + many[-8:]) / torch.tensor([WIDTH, HEIGHT]) * predictor.image_size
    torch.testing.assert_close(decoded[0][0], expected)
    assert state.video.objects[5].points[1].labels.shape == (1, 16)
    detected = state.video.objects[0].cond[0].low_res_masks.clone()
    predictor.add_new_points_or_box(state, 0, 0, points=[[50.0, 40.0]], labels=[1])
    assert sorted(state.video.objects[0].cond) == [0] and 0 in state.video.objects[0].points
    assert not torch.equal(state.video.objects[0].cond[0].low_res_masks, detected)
    assert [a.kind for a in state.actions] == ["add", "refine", "refine", "refine"]

    live = predictor_for(saved)
    live.config.hotstart_delay = 0  # frames come out as they are done, so one can be clicked mid-run
    state = live.init_state(frames)
    live.add_text_prompt(state, TEXT)
    run = live.propagate_in_video(state)
    first = next(run)
    live.add_new_points_or_box(state, first.frame_idx, 0, points=[[50.0, 40.0]], labels=[1])
    with pytest.raises(ValueError, match="clicked while this propagation ran"):
        next(run)


META_KINDS = {"full": "propagation_full", "partial": "propagation_partial", "fetch": "propagation_fetch"}


def test_what_propagation_runs_after_clicks():
    """plan_propagation on action lists; where Meta's sam3 imports, the same answers as its own
    `parse_action_history_for_propagation` (obj_ids compared as sets: Meta's come from a set)."""
    T = 10
    cases = [
        ([], ("full", None)),
        ([_Action("refine", 3, [0]), _Action("add", 3, [5]), _Action("refine", 4, [0])], ("partial", [0, 5])),
        ([_Action("refine", 3, [0]), _Action("partial", 3, [0])], ("partial", [0])),  # the other direction
        ([_Action("refine", 3, [0]), _Action("partial", 3, [0]), _Action("partial", 3, [0])], ("fetch", None)),
        ([_Action("refine", 3, [0]), _Action("partial", 0, [0])], ("fetch", None)),
        ([_Action("refine", 3, [0]), _Action("partial", T - 1, [0])], ("fetch", None)),
        ([_Action("fetch", 4), _Action("remove", obj_ids=[0])], ("fetch", None)),
        ([_Action("fetch", 4), _Action("add", 2, [7]), _Action("remove", obj_ids=[7])], ("partial", [7])),
        ([_Action("fetch", 4)], ("fetch", None)),
    ]
    for actions, expected in cases:
        assert plan_propagation(actions, T) == expected, actions
    try:
        import meta_sam3_shim  # noqa: F401  (before any `sam3` import: stubs its triton-only edt module)
        from sam3.model.sam3_video_inference import Sam3VideoInferenceWithInstanceInteractivity
    except ImportError:
        return
    for actions, (kind, obj_ids) in cases:
        history = [dict(type=META_KINDS.get(a.kind, a.kind), frame_idx=a.frame_idx, obj_ids=a.obj_ids) for a in actions]
        meta_kind, meta_ids = Sam3VideoInferenceWithInstanceInteractivity.parse_action_history_for_propagation(
            None, {"action_history": history, "num_frames": T})
        assert meta_kind == META_KINDS[kind], actions
        assert (None if meta_ids is None else sorted(meta_ids)) == obj_ids, actions
