"""`SamVideoPredictor` as a drop-in for Meta's `SAM2VideoPredictor`: the calls of Meta's
video example notebook (facebookresearch/sam2, notebooks/video_predictor_example.ipynb), as
they are written there (keywords, numpy prompts, the notebook's pixel coordinates on a
960x540 clip like its bedroom video), then the rest of the reference's public methods called
positionally, run on both predictors with the same tiny random weights. Every answer must
match: the same frame and object ids, logits within 2e-4, and so the same mask pixels
wherever a logit is not within 2e-4 of 0.

The clip is 8 frames panning over a real photo; the notebook's frame 150 correction goes on
the last frame.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from video_support import make_clip, make_reference_video_predictor, make_video_sam2, write_frame_folder

from sam.video import SamVideoPredictor

NUM_FRAMES = 8
HEIGHT, WIDTH = 540, 960  # the notebook's bedroom video
# Float rounding (ours and the reference order some sums differently; memories are stored in
# bfloat16) grows from ~5e-6 on a prompted frame to ~1.3e-4 after 7 tracked frames.
LOGIT_TOLERANCE = 2e-4

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # see conftest.py
    pytest.mark.filterwarnings("ignore:cannot import name .*_C"),  # the reference skips its CUDA hole filling
]


@pytest.fixture(scope="module")
def model():
    return make_video_sam2()


@pytest.fixture(scope="module")
def reference(model):
    return make_reference_video_predictor(model)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return str(write_frame_folder(make_clip(NUM_FRAMES, HEIGHT, WIDTH), tmp_path_factory.mktemp("bedroom") / "frames"))


def assert_same_answer(theirs, ours, step: str) -> None:
    """(frame_idx, obj_ids, masks) or a list of (frame_idx, masks): equal ids, masks at IoU
    1.0 and logits within LOGIT_TOLERANCE."""
    if theirs is None:
        assert ours is None, step
        return
    frame_idx, obj_ids, masks = theirs
    assert ours[0] == frame_idx and list(ours[1]) == list(obj_ids), (step, ours[:2], theirs[:2])
    assert_same_masks(masks, ours[2], f"{step}, frame {frame_idx}")


def assert_same_masks(theirs: torch.Tensor, ours: torch.Tensor, step: str) -> None:
    """Logits within LOGIT_TOLERANCE, so masks (> 0) are identical wherever the reference's
    logit is further than that from 0 (float rounding may flip a pixel inside that band)."""
    assert ours.shape == theirs.shape, (step, ours.shape, theirs.shape)
    if not ours.numel():
        return
    difference = (ours - theirs).abs().max().item()
    assert difference < LOGIT_TOLERANCE, f"{step}: logits differ by {difference:.2e}"
    decided = theirs.abs() >= LOGIT_TOLERANCE
    assert torch.equal((ours > 0) & decided, (theirs > 0) & decided), step


def propagate_both(reference, ref_state, ours, state, step: str, *args, **kwargs) -> list[dict[int, np.ndarray]]:
    """Run propagate_in_video on both with the same arguments; compare every frame. Returns
    the notebook's video_segments ({frame: {obj_id: mask}}) of ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm
        theirs = list(reference.propagate_in_video(ref_state, *args, **kwargs))
    video_segments = {}
    ours_run = list(ours.propagate_in_video(state, *args, **kwargs))
    assert [frame for frame, _, _ in ours_run] == [frame for frame, _, _ in theirs], step
    for their_frame, our_frame in zip(theirs, ours_run):
        assert_same_answer(their_frame, our_frame, step)
        out_frame_idx, out_obj_ids, out_mask_logits = our_frame
        video_segments[out_frame_idx] = {
            out_obj_id: (out_mask_logits[i] > 0.0).cpu().numpy() for i, out_obj_id in enumerate(out_obj_ids)
        }
    return video_segments


def test_the_notebook_calls_give_the_reference_answers(reference, model, video_dir):
    predictor_ref = reference
    predictor = SamVideoPredictor(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_state = predictor_ref.init_state(video_path=video_dir)
    inference_state = predictor.init_state(video_path=video_dir)
    predictor_ref.reset_state(ref_state)
    predictor.reset_state(inference_state)

    def both(step: str, **kwargs):
        theirs = predictor_ref.add_new_points_or_box(inference_state=ref_state, **kwargs)
        ours = predictor.add_new_points_or_box(inference_state=inference_state, **kwargs)
        assert_same_answer(theirs, ours, step)
        return ours

    # Example 1: segment & track one object
    ann_frame_idx = 0  # the frame index we interact with
    ann_obj_id = 1  # give a unique id to each object we interact with (it can be any integers)
    points = np.array([[210, 350]], dtype=np.float32)
    labels = np.array([1], np.int32)
    both("first click", frame_idx=ann_frame_idx, obj_id=ann_obj_id, points=points, labels=labels)
    points = np.array([[210, 350], [250, 220]], dtype=np.float32)
    labels = np.array([1, 1], np.int32)
    _, out_obj_ids, out_mask_logits = both("second click", frame_idx=ann_frame_idx, obj_id=ann_obj_id,
                                           points=points, labels=labels)
    first_mask = (out_mask_logits[0] > 0.0).cpu().numpy()
    assert 0 < first_mask.mean() < 1  # random weights, yet neither empty nor everything
    video_segments = propagate_both(predictor_ref, ref_state, predictor, inference_state, "example 1")
    assert sorted(video_segments) == list(range(NUM_FRAMES))
    # Step 3: refine on a later frame with a negative click, propagate again
    ann_frame_idx = NUM_FRAMES - 1  # the notebook's frame 150
    points = np.array([[82, 415]], dtype=np.float32)
    labels = np.array([0], np.int32)
    both("refinement", frame_idx=ann_frame_idx, obj_id=ann_obj_id, points=points, labels=labels)
    propagate_both(predictor_ref, ref_state, predictor, inference_state, "example 1, refined")

    # Example 2: a box, then a box with a click
    predictor_ref.reset_state(ref_state)
    predictor.reset_state(inference_state)
    ann_frame_idx, ann_obj_id = 0, 4
    box = np.array([300, 0, 500, 400], dtype=np.float32)
    both("box", frame_idx=ann_frame_idx, obj_id=ann_obj_id, box=box)
    points = np.array([[460, 60]], dtype=np.float32)
    labels = np.array([1], np.int32)
    both("box and click", frame_idx=ann_frame_idx, obj_id=ann_obj_id, points=points, labels=labels, box=box)
    propagate_both(predictor_ref, ref_state, predictor, inference_state, "example 2")

    # Example 3: two objects
    predictor_ref.reset_state(ref_state)
    predictor.reset_state(inference_state)
    prompts = {}
    ann_frame_idx, ann_obj_id = 0, 2
    points = np.array([[200, 300]], dtype=np.float32)
    labels = np.array([1], np.int32)
    prompts[ann_obj_id] = points, labels
    both("object 2", frame_idx=ann_frame_idx, obj_id=ann_obj_id, points=points, labels=labels)
    points = np.array([[200, 300], [275, 175]], dtype=np.float32)
    labels = np.array([1, 0], np.int32)
    prompts[ann_obj_id] = points, labels
    both("object 2 refined", frame_idx=ann_frame_idx, obj_id=ann_obj_id, points=points, labels=labels)
    ann_obj_id = 3
    points = np.array([[400, 150]], dtype=np.float32)
    labels = np.array([1], np.int32)
    prompts[ann_obj_id] = points, labels
    _, out_obj_ids, _ = both("object 3", frame_idx=ann_frame_idx, obj_id=ann_obj_id, points=points, labels=labels)
    assert out_obj_ids == [2, 3]
    video_segments = propagate_both(predictor_ref, ref_state, predictor, inference_state, "example 3")
    assert all(set(video_segments[frame]) == {2, 3} for frame in video_segments)


def test_the_other_public_methods_positionally(reference, model, video_dir):
    """init_state's second positional is offload_video_to_cpu; add_new_points (the old name),
    add_new_mask, tensors with a batch of one, propagate_in_video_preflight, propagate with
    positional start, count and reverse, clear_all_prompts_in_frame, remove_object (unknown
    id: nothing; strict: an error; need_output), all against the reference."""
    predictor = SamVideoPredictor(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_state = reference.init_state(video_dir, True, False)
    state = predictor.init_state(video_dir, True, False)
    assert state.storage_device == model.device  # True was offload_video_to_cpu, not the state
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[100:400, 250:600] = True
    steps = [
        ("add_new_points", (2, 1, np.array([[210, 350]], np.float32), np.array([1], np.int32))),
        ("add_new_points_or_box", (2, 5, None, None, True, True, np.array([300, 0, 500, 400], np.float32))),
        ("add_new_mask", (2, 6, mask)),
        ("add_new_points_or_box", (2, 1, torch.tensor([[[250.0, 220.0]]]), torch.tensor([[0]]), False)),
        ("add_new_points_or_box", (4, 6, np.array([[0.4, 0.5]], np.float32), np.array([1], np.int32), True, False)),
    ]
    for method, args in steps:
        assert_same_answer(getattr(reference, method)(ref_state, *args), getattr(predictor, method)(state, *args),
                           f"{method}{args[:2]}")
    reference.propagate_in_video_preflight(ref_state)
    predictor.propagate_in_video_preflight(state)
    propagate_both(reference, ref_state, predictor, state, "positional start, count", 2, 3)
    propagate_both(reference, ref_state, predictor, state, "reverse", 4, None, True)

    assert_same_answer(reference.clear_all_prompts_in_frame(ref_state, 4, 6),
                       predictor.clear_all_prompts_in_frame(state, 4, 6), "clear frame 4 of object 6")
    assert predictor.clear_all_prompts_in_frame(state, 2, 6, False) is None
    reference.clear_all_prompts_in_frame(ref_state, 2, 6, False)
    assert_same_answer(reference.add_new_points_or_box(ref_state, 2, 6, box=[250, 100, 600, 400]),
                       predictor.add_new_points_or_box(state, 2, 6, box=[250, 100, 600, 400]), "re-prompt")

    assert predictor.remove_object(state, 99) == reference.remove_object(ref_state, 99) == ([1, 5, 6], [])
    with pytest.raises(ValueError, match="no object with id 99"):
        predictor.remove_object(state, 99, strict=True)
    theirs = reference.remove_object(ref_state, 5, False, True)
    ours = predictor.remove_object(state, 5, False, True)
    assert ours[0] == theirs[0] == [1, 6]
    assert [frame for frame, _ in ours[1]] == [frame for frame, _ in theirs[1]] == [2]
    assert_same_masks(theirs[1][0][1], ours[1][0][1], "remove_object's output")
    assert predictor.remove_object(state, 6, need_output=False) == ([1], [])
    reference.remove_object(ref_state, 6, need_output=False)
    propagate_both(reference, ref_state, predictor, state, "after removals")


def test_non_overlap_masks_keeps_the_top_object_as_the_reference_does(reference, model, video_dir):
    """non_overlap_masks=True: every returned mask is the plain one with the reference's own
    constraint applied (exactly; at near-ties float noise decides which object wins, so the
    two predictors are compared through the same constraint, not with each other)."""
    plain, constrained = SamVideoPredictor(model), SamVideoPredictor(model, non_overlap_masks=True)
    prompts = [dict(obj_id=1, points=[[210, 350]], labels=[1]), dict(obj_id=5, box=[150, 100, 500, 450])]
    states = [predictor.init_state(video_dir) for predictor in (plain, constrained)]
    for prompt in prompts:
        answers = [predictor.add_new_points_or_box(state, 0, **prompt)
                   for predictor, state in zip((plain, constrained), states)]
    runs = [list(predictor.propagate_in_video(state, 0, 2)) for predictor, state in zip((plain, constrained), states)]
    overlapped = 0
    for (_, _, plain_masks), (_, _, constrained_masks) in [answers] + list(zip(*runs)):
        assert torch.equal(constrained_masks, reference._apply_non_overlapping_constraints(plain_masks))
        assert not ((constrained_masks > 0).sum(dim=0) > 1).any()
        overlapped += int(((plain_masks > 0).sum(dim=0) > 1).sum())
    assert overlapped > 0  # the objects did overlap, so the constraint was exercised
