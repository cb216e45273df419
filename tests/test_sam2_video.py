"""SAM 2.1 video predictor (sam.video): parity with Meta's SAM2VideoPredictor on the same
random weights, streaming of new objects mid-propagation, bounded memory, frame sources and
bad inputs.

The model is the tiny random SAM 2.1 of sam2_factory run at a 128x128 input (an 8x8 memory
grid), so both predictors track a 10-frame clip in about a second; the clip pans and zooms
over a real photo. Both predictors read the same JPEG folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from video_support import (
    make_clip,
    make_reference_video_predictor,
    make_video_sam2,
    read_frame_folder,
    read_mp4,
    write_frame_folder,
    write_mp4,
)

from sam.video import SamVideoPredictor, VideoLoadError, open_frames

NUM_FRAMES = 10
HEIGHT, WIDTH = 96, 128
SCORE_TOLERANCE = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    return make_video_sam2()


@pytest.fixture(scope="module")
def reference(model):
    return make_reference_video_predictor(model)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return write_frame_folder(make_clip(NUM_FRAMES, HEIGHT, WIDTH), tmp_path_factory.mktemp("clip") / "frames")


@pytest.fixture(scope="module")
def predictor(model):
    return SamVideoPredictor(model)


def reference_state(reference, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference.init_state(str(folder))


def reference_propagate(reference, state, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm / hole-filling notices
        return list(reference.propagate_in_video(state, **kwargs))


def reference_scores(reference, state, frame_idx) -> dict[int, float]:
    scores = {}
    for obj_idx, outputs in state["output_dict_per_obj"].items():
        out = outputs["cond_frame_outputs"].get(frame_idx, outputs["non_cond_frame_outputs"].get(frame_idx))
        if out is not None:
            scores[reference._obj_idx_to_id(state, obj_idx)] = float(out["object_score_logits"])
    return scores


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def assert_same_result(theirs, ours, what: str) -> None:
    """(frame_idx, obj_ids, masks) from both predictors: same frame, ids, and every object's
    mask at IoU >= 0.99."""
    assert ours[0] == theirs[0], what
    assert list(ours[1]) == list(theirs[1]), what
    assert ours[2].shape == theirs[2].shape, what
    for index, obj_id in enumerate(ours[1]):
        overlap = iou(theirs[2][index], ours[2][index])
        assert overlap >= 0.99, f"{what}: frame {ours[0]} object {obj_id} IoU {overlap:.4f}"


def assert_same_run(reference, ref_state, predictor, state, theirs, ours, what: str) -> None:
    assert [r[0] for r in ours] == [r[0] for r in theirs], what
    for their_frame, our_frame in zip(theirs, ours):
        assert_same_result(their_frame, our_frame, what)
        expected = reference_scores(reference, ref_state, our_frame[0])
        got = predictor.object_scores(state, our_frame[0])
        assert got.keys() == expected.keys()
        for obj_id, score in expected.items():
            assert abs(got[obj_id] - score) < SCORE_TOLERANCE, (what, our_frame[0], obj_id, got[obj_id], score)


# --------------------------------------------------------------------------- parity
def test_points_box_and_mask_objects_match_reference(reference, predictor, clip_folder):
    """Three objects on frame 0 (clicks + a later negative click, a box, a mask), tracked
    forward: every prompt's answer and every frame match the reference."""
    ref_state = reference_state(reference, clip_folder)
    state = predictor.init_state(clip_folder)
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[30:70, 20:60] = True
    prompts = [
        ("add_new_points_or_box", dict(frame_idx=0, obj_id=1, points=[[60, 50]], labels=[1])),
        ("add_new_points_or_box", dict(frame_idx=0, obj_id=2, box=[10, 10, 80, 70])),
        ("add_new_mask", dict(frame_idx=0, obj_id=3, mask=mask)),
        ("add_new_points_or_box", dict(frame_idx=0, obj_id=1, points=[[20, 20]], labels=[0], clear_old_points=False)),
    ]
    for method, kwargs in prompts:
        theirs = getattr(reference, method)(ref_state, **kwargs)
        ours = getattr(predictor, method)(state, **kwargs)
        assert_same_result(theirs, ours, method)
        assert torch.allclose(ours[2], theirs[2], atol=1e-3)
    theirs = reference_propagate(reference, ref_state)
    ours = list(predictor.propagate_in_video(state))
    assert len(ours) == NUM_FRAMES
    assert_same_run(reference, ref_state, predictor, state, theirs, ours, "forward")
    # Not trivially equal masks: the objects differ from each other and change over time.
    assert iou(ours[-1][2][0], ours[-1][2][1]) < 0.99 or iou(ours[0][2][0], ours[-1][2][0]) < 0.99


@pytest.mark.parametrize("correct_as_cond", [False, True])
def test_mid_clip_prompt_reverse_and_correction_match_reference(reference, predictor, model, clip_folder,
                                                                 correct_as_cond):
    """Two clicks (relative coordinates) on frame 5, forward then reverse propagation, then a correction click on a
    tracked frame (7) and re-propagation from it, with corrections kept as tracked frames
    (the default) or made conditioning frames."""
    ref_state = reference_state(reference, clip_folder)
    ours_predictor = SamVideoPredictor(model, add_all_frames_to_correct_as_cond=correct_as_cond)
    state = ours_predictor.init_state(clip_folder)
    reference.add_all_frames_to_correct_as_cond = correct_as_cond
    try:
        # Relative coordinates (normalize_coords=False): x / W, y / H.
        kwargs = dict(frame_idx=5, obj_id=7, points=[[0.5, 0.42], [0.7, 0.625]], labels=[1, 1], normalize_coords=False)
        assert_same_result(reference.add_new_points_or_box(ref_state, **kwargs),
                           ours_predictor.add_new_points_or_box(state, **kwargs), "prompt")
        for direction in (dict(), dict(start_frame_idx=5, reverse=True)):
            theirs = reference_propagate(reference, ref_state, **direction)
            ours = list(ours_predictor.propagate_in_video(state, **direction))
            assert_same_run(reference, ref_state, ours_predictor, state, theirs, ours, f"{direction}")
        assert [frame for frame, _, _ in ours] == [5, 4, 3, 2, 1, 0]

        correction = dict(frame_idx=7, obj_id=7, points=[[100, 80]], labels=[0], clear_old_points=False)
        assert_same_result(reference.add_new_points_or_box(ref_state, **correction),
                           ours_predictor.add_new_points_or_box(state, **correction), "correction")
        theirs = reference_propagate(reference, ref_state, start_frame_idx=7)
        ours = list(ours_predictor.propagate_in_video(state, start_frame_idx=7))
        assert_same_run(reference, ref_state, ours_predictor, state, theirs, ours, "after correction")
    finally:
        reference.add_all_frames_to_correct_as_cond = False


# --------------------------------------------------------------------------- streaming objects
def test_new_object_mid_propagation_matches_its_own_reference_run(reference, predictor, clip_folder):
    """Object A is tracked from frame 0; while the generator is suspended at frame 4, object
    B is boxed on frame 4, and at frame 7 A is removed. A's masks equal a reference run of A
    alone, B's equal a reference run of B prompted on frame 4 and propagated from there."""
    prompt_a = dict(obj_id=1, points=[[60, 50]], labels=[1])
    prompt_b = dict(obj_id=2, box=[70, 20, 120, 80])

    ref_a = reference_state(reference, clip_folder)
    reference.add_new_points_or_box(ref_a, frame_idx=0, **prompt_a)
    alone_a = {frame: masks for frame, _, masks in reference_propagate(reference, ref_a)}
    ref_b = reference_state(reference, clip_folder)
    first_b = reference.add_new_points_or_box(ref_b, frame_idx=4, **prompt_b)
    alone_b = {frame: masks for frame, _, masks in reference_propagate(reference, ref_b, start_frame_idx=4)}

    state = predictor.init_state(clip_folder)
    predictor.add_new_points_or_box(state, frame_idx=0, **prompt_a)
    seen = []
    for frame_idx, obj_ids, masks in predictor.propagate_in_video(state):
        seen.append((frame_idx, list(obj_ids)))
        if 1 in obj_ids:
            assert iou(masks[obj_ids.index(1)], alone_a[frame_idx][0]) >= 0.99
            assert abs(predictor.object_scores(state, frame_idx)[1] - reference_scores(reference, ref_a, frame_idx)[1]) \
                < SCORE_TOLERANCE
        if 2 in obj_ids:
            assert iou(masks[obj_ids.index(2)], alone_b[frame_idx][0]) >= 0.99
            assert abs(predictor.object_scores(state, frame_idx)[2] - reference_scores(reference, ref_b, frame_idx)[2]) \
                < SCORE_TOLERANCE
        if frame_idx == 4:
            _, ids_now, masks_now = predictor.add_new_points_or_box(state, frame_idx=4, **prompt_b)
            assert ids_now == [1, 2]
            assert iou(masks_now[1], first_b[2][0]) >= 0.99
            assert iou(masks_now[0], masks[0]) == 1.0  # A's answer on frame 4 is untouched
        if frame_idx == 7:
            remaining, _ = predictor.remove_object(state, 1)
            assert remaining == [2]
    assert seen == [(f, [1]) for f in range(5)] + [(f, [1, 2]) for f in (5, 6, 7)] + [(8, [2]), (9, [2])]


# --------------------------------------------------------------------------- bounded memory
def test_window_memory_gives_the_same_masks_and_keeps_few_frames(predictor):
    """keep_memory="window" drops what no later frame reads: the masks are identical to
    keep_memory="all", and after 20 frames the bank holds the spatial memories of the last
    num_maskmem - 1 = 6 frames and the pointers of the last max_obj_ptrs_in_encoder - 1 = 15."""
    clip = make_clip(20, HEIGHT, WIDTH)
    runs = {}
    for keep in ("all", "window"):
        state = predictor.init_state(clip, keep_memory=keep)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[60, 50]], labels=[1])
        runs[keep] = [masks for _, _, masks in predictor.propagate_in_video(state)]
        track = state.objects[1]
        with_memory = sorted(t for t, out in track.tracked.items() if out.maskmem_features is not None)
        assert list(track.cond) == [0]
        if keep == "window":
            assert sorted(track.tracked) == list(range(5, 20))
            assert with_memory == list(range(14, 20))
        else:
            assert sorted(track.tracked) == with_memory == list(range(1, 20))
    for all_masks, window_masks in zip(runs["all"], runs["window"]):
        assert torch.equal(all_masks, window_masks)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from video_support import make_video_sam2
    from sam.video import SamVideoPredictor
    predictor = SamVideoPredictor(make_video_sam2(64))
    state = predictor.init_state({video!r}, keep_memory="window")
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[320, 200]], labels=[1])
    count = 0
    for frame_idx, obj_ids, masks in predictor.propagate_in_video(state, max_frame_num_to_track={frames} - 1):
        count += 1
    # VmHWM is this process's own peak RSS; ru_maxrss would include the parent's at fork.
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({{"frames": count, "peak_mb": peak_kb / 1024}}))
    """
)


def test_peak_memory_does_not_grow_with_video_length(tmp_path):
    """300 frames of 640x480 from an .mp4 (275 MB decoded) tracked with keep_memory="window"
    peak within 40 MB of the first 30 frames of the same file: frames are streamed, and the
    bank does not grow. Each run is a fresh process (its VmHWM); both run at once."""
    from video_support import iter_clip

    video = write_mp4(iter_clip(300, 480, 640), tmp_path / "long.mp4", fps=30)
    tests = str(Path(__file__).parent)
    runs = {
        frames: subprocess.Popen(
            [sys.executable, "-c", MEMORY_SCRIPT.format(tests=tests, video=str(video), frames=frames)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for frames in (30, 300)
    }
    results = {}
    for frames, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        results[frames] = json.loads(out.strip().splitlines()[-1])
    assert results[30]["frames"] == 30 and results[300]["frames"] == 300
    growth = results[300]["peak_mb"] - results[30]["peak_mb"]
    assert growth < 40, f"peak RSS grew by {growth:.0f} MB from 30 to 300 frames ({results})"


# --------------------------------------------------------------------------- frame sources
def test_frame_sources_decode_the_same_pixels(tmp_path, clip_folder):
    """A folder, an .mp4 (random access, backwards too), an array and a list give the frames
    that a full decode gives; folders sort by the number in the name, not the text."""
    import av

    clip = read_frame_folder(clip_folder)
    folder = open_frames(clip_folder)
    assert (len(folder), folder.height, folder.width) == (NUM_FRAMES, HEIGHT, WIDTH)
    assert all(np.array_equal(folder[i], clip[i]) for i in range(NUM_FRAMES))

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for index, path in enumerate(sorted(clip_folder.iterdir())):
        (renamed / f"frame_{index}.jpg").write_bytes(path.read_bytes())  # frame_10 after frame_9
    assert all(np.array_equal(open_frames(renamed)[i], clip[i]) for i in range(NUM_FRAMES))

    video = write_mp4(make_clip(NUM_FRAMES, HEIGHT, WIDTH), tmp_path / "clip.mp4")
    with av.open(str(video)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    frames = open_frames(video)
    assert (len(frames), frames.height, frames.width) == (NUM_FRAMES, HEIGHT, WIDTH)
    for index in (0, 1, 2, 9, 3, 8, 7, 0, 5):
        assert np.array_equal(frames[index], decoded[index]), index
    frames.close()

    array = make_clip(3, HEIGHT, WIDTH)
    assert np.array_equal(open_frames(array)[2], array[2])
    assert np.array_equal(open_frames(list(array))[1], array[1])


def test_a_file_cut_short_reads_up_to_the_cut_and_names_the_first_bad_frame(tmp_path):
    """A 12-frame H.264 MP4 with its index first (faststart), cut to 60% of its bytes: the
    index lists the frames whose packets survive; those before the cut decode exactly as in
    the whole file; the first that does not decode raises VideoLoadError naming it (and the
    path once), and so does every later one; earlier frames stay readable."""
    clip = make_clip(12, 96, 128)
    whole = write_mp4(clip, tmp_path / "whole.mp4", faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    expected, _, _ = read_mp4(whole)
    source = open_frames(cut)
    assert 1 < len(source) < 12
    readable = 0
    while True:
        try:
            frame = source[readable]
        except VideoLoadError as error:
            bad, message = error.frame_index, str(error)
            break
        np.testing.assert_array_equal(frame, expected[readable])
        readable += 1
    assert bad == readable and 0 < bad < 12
    assert message.startswith(f"{cut}: cannot decode frame {bad} of {len(source)}: the file is damaged or cut short")
    assert message.count(str(cut)) == 1 and "Errno" not in message
    for later in range(bad, len(source)):
        with pytest.raises(VideoLoadError, match=f"frame {bad} of") as raised:
            source[later]
        assert raised.value.frame_index == bad
    np.testing.assert_array_equal(source[0], expected[0])  # a seek back still works
    source.close()


def test_rotation_tags_are_applied_and_frame_times_kept(tmp_path):
    """A display-matrix rotation tag turns the frames as players show them (counterclockwise
    degrees, as PyAV reads them: 90 is np.rot90 once, -90 three times), and sizes follow;
    a variable frame rate shows in the timestamps, exactly."""
    clip = make_clip(3, 96, 128)
    for degrees, turns in ((90, 1), (-90, 3), (180, 2)):
        path = write_mp4(clip, tmp_path / f"rotated{degrees}.mp4", rotation=degrees)
        stored, _, rotations = read_mp4(path)
        assert [r % 360 for r in rotations] == [degrees % 360] * 3
        source = open_frames(path)
        assert (source.height, source.width) == np.rot90(clip[0], turns).shape[:2]
        for index in range(3):
            np.testing.assert_array_equal(source[index], np.rot90(stored[index], turns))
            assert np.abs(source[index].astype(int) - np.rot90(clip[index], turns)).mean() < 4  # what was filmed
        source.close()
    pts_ms = [0, 40, 200, 230, 500]
    source = open_frames(write_mp4(make_clip(5, 96, 128), tmp_path / "vfr.mp4", pts_ms=pts_ms))
    assert [t * source.time_base for t in source.timestamps] == [Fraction(t, 1000) for t in pts_ms]
    assert open_frames(make_clip(2, 8, 8)).timestamps is None


def test_array_and_folder_inputs_track_identically(predictor, clip_folder):
    clip = read_frame_folder(clip_folder)
    results = []
    for video in (clip_folder, clip):
        state = predictor.init_state(video)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[60, 50]], labels=[1])
        results.append([masks for _, _, masks in predictor.propagate_in_video(state, max_frame_num_to_track=2)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_videos_raise_clear_errors(tmp_path):
    with pytest.raises(VideoLoadError, match="no such video"):
        open_frames(tmp_path / "missing.mp4")
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoLoadError, match="cannot read the video"):
        open_frames(garbage)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoLoadError, match="zero frames"):
        open_frames(empty)
    with pytest.raises(VideoLoadError, match="zero frames"):
        open_frames(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(VideoLoadError, match="zero frames"):
        open_frames([])
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)]
    with pytest.raises(VideoLoadError, match="same size"):
        open_frames(frames)
    mixed = write_frame_folder(frames, tmp_path / "mixed", ext="png")
    source = open_frames(mixed)  # sizes are checked as frames are read
    with pytest.raises(VideoLoadError, match="same size"):
        source[1]
    with pytest.raises(VideoLoadError, match="uint8"):
        open_frames(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(VideoLoadError, match="limit of 2"):
        open_frames(np.zeros((3, 8, 8, 3), np.uint8), max_frames=2)
    with pytest.raises(VideoLoadError, match="limit of 50"):
        open_frames(np.zeros((1, 8, 8, 3), np.uint8), max_pixels=50)
    with pytest.raises(VideoLoadError, match="single image"):
        open_frames(next(mixed.iterdir()))
    assert issubclass(VideoLoadError, ValueError)


def test_bad_prompts_and_calls_raise_value_errors(predictor, model):
    state = predictor.init_state(make_clip(3, 32, 32))
    bad_calls = [
        (lambda: predictor.propagate_in_video(state), "no objects"),
        (lambda: predictor.add_new_points_or_box(state, 3, 1, points=[[1, 1]], labels=[1]), "outside"),
        (lambda: predictor.add_new_points_or_box(state, -1, 1, points=[[1, 1]], labels=[1]), "outside"),
        (lambda: predictor.add_new_points_or_box(state, 1.5, 1, points=[[1, 1]], labels=[1]), "frame_idx must be an int"),
        (lambda: predictor.add_new_points_or_box(state, 0, "car", points=[[1, 1]], labels=[1]), "obj_id must be an int"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, points=[[1, 1]]), "together"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1), "points .* or a box"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, points=[[1, 1]], labels=[1, 0]), "one label per point"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, points=[[1, 1, 1]], labels=[1]), r"\(N, 2\)"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, points=[[1, 1]], labels=[5]), "1 \\(positive\\)"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, points=[[np.nan, 1]], labels=[1]), "finite"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, box=[1, 2, 3]), "4 numbers"),
        (lambda: predictor.add_new_points_or_box(state, 0, 1, box=[1, 2, 3, 4], clear_old_points=False), "box must come"),
        (lambda: predictor.add_new_mask(state, 0, 1, np.zeros((2, 4, 4))), r"\(H, W\)"),
        (lambda: predictor.add_new_mask(state, 0, 1, np.full((4, 4), 0.5)), "boolean or 0/1"),
        (lambda: predictor.remove_object(state, 9, strict=True), "no object with id 9"),
        (lambda: predictor.object_scores(state, 7), "outside"),
        (lambda: predictor.init_state(make_clip(2, 32, 32), keep_memory="some"), "keep_memory"),
        (lambda: SamVideoPredictor(torch.nn.Linear(2, 2)), "SAM 2 model"),
    ]
    for call, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            call()
    assert state.obj_ids == []  # failed prompts leave no half-made object behind
    predictor.add_new_points_or_box(state, 0, 1, points=[[10, 10]], labels=[1])
    for kwargs, message in [(dict(start_frame_idx=5), "outside"), (dict(max_frame_num_to_track=-1), "non-negative")]:
        with pytest.raises(ValueError, match=message):
            predictor.propagate_in_video(state, **kwargs)
    predictor.reset_state(state)
    assert state.obj_ids == []


def test_fill_holes_fills_only_small_background_regions():
    """Hand-made logits: a 1-pixel and a 2x2 hole inside an object, and a large background;
    with max_area 4 both holes become 0.1 and the background stays."""
    from sam.video.predictor import fill_holes

    logits = torch.full((2, 1, 12, 12), -5.0)
    logits[0, 0, 1:8, 1:8] = 3.0
    logits[0, 0, 2, 2] = -1.0  # 1-pixel hole
    logits[0, 0, 4:6, 4:6] = -2.0  # 2x2 hole
    filled = fill_holes(logits, max_area=4)
    expected = logits.clone()
    expected[0, 0, 2, 2] = 0.1
    expected[0, 0, 4:6, 4:6] = 0.1
    assert torch.equal(filled, expected)
    assert torch.equal(fill_holes(logits, max_area=1)[0, 0, 4:6, 4:6], logits[0, 0, 4:6, 4:6])
