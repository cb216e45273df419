"""SAM 3's video tracker (sam.sam3.tracker on sam.video.SamVideoPredictor) against transformers'
`Sam3TrackerVideoModel` + `Sam3TrackerVideoProcessor` on the same tiny random weights.

Our predictor loads Meta's `sam3.pt` layout (the reference loads its own save_pretrained directory,
so the Meta-name mapping is part of what is checked); the transformers and hub layouts must give
the same weights. The clip pans and zooms over a real photo (video_support). The reference gets the
very pixels our predictor makes (each frame stretched to the square with PIL bicubic, normalised
with mean = std = 0.5) and the clicks through its processor; both sides' low-res logits go to the
video size by the same bilinear resize. transformers does not feed an object's previous mask with a
correction click (Meta does), and it resizes a mask for the memory encoder before binarising it
(Meta after), so ours runs with refine_with_previous_mask=False and memory_mask_resize="logits" here;
`test_meta_memory_order` checks the default order on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sam3_video_support import (
    reference_pixels,
    reference_processor,
    reference_session,
    save_tiny_sam3_tracker_video,
    tiny_transformers_tracker_video,
)
from video_support import iter_clip, make_clip, write_mp4

from sam.build import CheckpointError
from sam.sam3.tracker import Sam3Tracker, load_sam3_tracker, tracker_video_to_transformers
from sam.video import SamVideoPredictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_FRAMES, HEIGHT, WIDTH = 8, 96, 128


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_sam3_tracker_video(tmp_path_factory.mktemp("sam3v"))


@pytest.fixture(scope="module")
def reference(saved):
    return saved["model"]


@pytest.fixture(scope="module")
def predictor(saved):
    return SamVideoPredictor.from_sam3(saved["meta"], memory_mask_resize="logits", refine_with_previous_mask=False)


@pytest.fixture(scope="module")
def frames():
    return make_clip(NUM_FRAMES, HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def processor():
    return reference_processor()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


class Reference:
    """transformers driven as its docs show: inputs through the processor, one forward per prompted
    frame, propagate_in_video_iterator, post_process_masks to the video size (logits)."""

    def __init__(self, model, processor, frames):
        self.model, self.processor = model, processor
        self.session = reference_session(reference_pixels(frames), HEIGHT, WIDTH)

    def _masks(self, output) -> torch.Tensor:
        return self.processor.post_process_masks([output.pred_masks], original_sizes=[[HEIGHT, WIDTH]], binarize=False)[0]

    def prompt(self, frame_idx, obj_id, points=None, labels=None, box=None):
        kwargs = {}
        if points is not None:
            kwargs.update(input_points=[[points]], input_labels=[[labels]])
        if box is not None:
            kwargs.update(input_boxes=[[box]])
        self.processor.add_inputs_to_inference_session(self.session, frame_idx=frame_idx, obj_ids=[obj_id], **kwargs)
        with torch.no_grad():
            output = self.model(inference_session=self.session, frame_idx=frame_idx)
        return frame_idx, list(output.object_ids), self._masks(output)

    def propagate(self, **kwargs):
        return [(out.frame_idx, list(out.object_ids), self._masks(out))
                for out in self.model.propagate_in_video_iterator(self.session, **kwargs)]


def assert_same(theirs, ours, what: str) -> None:
    """(frame_idx, obj_ids, masks): same frame and ids; every object's mask at IoU >= 0.99, neither
    empty nor full."""
    assert ours[0] == theirs[0], what
    assert list(ours[1]) == list(theirs[1]), what
    assert ours[2].shape == theirs[2].shape == (len(ours[1]), 1, HEIGHT, WIDTH), what
    for index, obj_id in enumerate(ours[1]):
        fill = (ours[2][index] > 0).float().mean().item()
        assert 0.02 < fill < 0.98, f"{what}: frame {ours[0]} object {obj_id} fill {fill:.3f}"
        overlap = iou(theirs[2][index], ours[2][index])
        assert overlap >= 0.99, f"{what}: frame {ours[0]} object {obj_id} IoU {overlap:.4f}"


def assert_same_run(theirs, ours, what: str) -> None:
    assert [r[0] for r in ours] == [r[0] for r in theirs], what
    for their_frame, our_frame in zip(theirs, ours):
        assert_same(their_frame, our_frame, what)


def test_points_and_mid_clip_correction_match_transformers(predictor, reference, processor, frames):
    """Two objects clicked on frame 0, tracked forward; a correction click on frame 4 (a tracked
    frame), tracked forward again from there; then the whole clip backwards from the last frame."""
    ref = Reference(reference, processor, frames)
    state = predictor.init_state(frames)
    prompts = [dict(frame_idx=0, obj_id=1, points=[[60.0, 50.0]], labels=[1]),
               dict(frame_idx=0, obj_id=2, points=[[20.0, 30.0], [100.0, 80.0]], labels=[1, 0])]
    for prompt in prompts:
        assert_same(ref.prompt(**prompt), predictor.add_new_points_or_box(state, **prompt), "prompt")
    forward = list(predictor.propagate_in_video(state))
    assert_same_run(ref.propagate(), forward, "forward")
    assert len(forward) == NUM_FRAMES
    # The objects' masks differ where they were clicked, so a swap of ids would show there. (With random
    # weights the image dominates later frames and the two converge.)
    assert iou(forward[0][2][0], forward[0][2][1]) < 0.95
    masks = forward[4][2]

    correction = dict(frame_idx=4, obj_id=1, points=[[60.0, 50.0], [30.0, 70.0]], labels=[1, 0])
    corrected = predictor.add_new_points_or_box(state, **correction)
    assert_same(ref.prompt(**correction), corrected, "correction")
    assert iou(corrected[2][0], masks[0]) < 0.99  # the click changed the object's mask
    assert_same_run(ref.propagate(start_frame_idx=4), list(predictor.propagate_in_video(state, start_frame_idx=4)),
                    "forward after the correction")

    backward = list(predictor.propagate_in_video(state, start_frame_idx=NUM_FRAMES - 1, reverse=True))
    assert [frame for frame, _, _ in backward] == list(range(NUM_FRAMES - 1, -1, -1))
    assert_same_run(ref.propagate(start_frame_idx=NUM_FRAMES - 1, reverse=True), backward, "reverse")


def test_box_mid_clip_then_reverse_matches_transformers(predictor, reference, processor, frames):
    """A box on frame 5 tracked backwards to frame 0 (memory only from later frames); then a second
    object clicked on frame 5, the first removed (the second's result stays), and a reset."""
    ref = Reference(reference, processor, frames)
    state = predictor.init_state(frames)
    prompt = dict(frame_idx=5, obj_id=7, box=[20.0, 15.0, 90.0, 80.0])
    assert_same(ref.prompt(**prompt), predictor.add_new_points_or_box(state, **prompt), "box")
    backward = list(predictor.propagate_in_video(state, reverse=True))
    assert [frame for frame, _, _ in backward] == [5, 4, 3, 2, 1, 0]
    assert_same_run(ref.propagate(reverse=True), backward, "reverse")
    assert iou(backward[0][2][0], backward[-1][2][0]) < 0.99  # the mask moves with the camera

    prompt = dict(frame_idx=5, obj_id=8, points=[[90.0, 40.0]], labels=[1])
    both = predictor.add_new_points_or_box(state, **prompt)
    assert_same(ref.prompt(**prompt), both, "second object")
    ids, updated = predictor.remove_object(state, 7)
    assert ids == [8] and [frame for frame, _ in updated] == [5]
    assert torch.equal(updated[0][1], both[2][1:])
    predictor.reset_state(state)
    assert state.obj_ids == []


def test_three_layouts_hold_the_same_weights(saved, reference):
    """Meta's sam3.pt, the transformers directory and the hub's combined file load to the same
    model, and it maps back onto transformers' names exactly."""
    models = {layout: load_sam3_tracker(saved[layout]) for layout in ("meta", "transformers", "hub")}
    states = {layout: model.state_dict() for layout, model in models.items()}
    for layout in ("transformers", "hub"):
        assert states[layout].keys() == states["meta"].keys()
        for key, value in states["meta"].items():
            assert torch.equal(value, states[layout][key]), (layout, key)
    model = models["meta"]
    assert isinstance(model, Sam3Tracker) and model.image_size == 168 and model.tracking.max_cond_frames_in_attn == 4
    back = tracker_video_to_transformers(model)
    theirs = reference.state_dict()
    assert back.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(back[key], value), key


def test_bad_checkpoints_say_what_is_wrong(saved, tmp_path, tiny_sam_checkpoint):
    with pytest.raises(CheckpointError, match="SAM 1 checkpoint"):
        load_sam3_tracker(tiny_sam_checkpoint)
    # Meta's layout with the tracker left out: SAM 3's image model only.
    state = torch.load(saved["meta"], weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("tracker.")}}, tmp_path / "image.pt")
    with pytest.raises(CheckpointError, match="without the video tracker"):
        load_sam3_tracker(tmp_path / "image.pt")
    missing = {k: v for k, v in state.items() if k != "tracker.obj_ptr_tpos_proj.weight"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="lacks 'tracker.obj_ptr_tpos_proj.weight'"):
        load_sam3_tracker(tmp_path / "missing.pt")
    # A transformers tracker file without its config.json beside it.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes((saved["transformers"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no config.json"):
        load_sam3_tracker(tmp_path / "hf")


def test_video_input_errors_are_the_sam2_predictor_s(predictor, frames):
    state = predictor.init_state(frames)
    with pytest.raises(ValueError, match="outside the video's frames 0..7"):
        predictor.add_new_points_or_box(state, frame_idx=8, obj_id=1, points=[[10, 10]], labels=[1])
    with pytest.raises(ValueError, match="no objects to track"):
        list(predictor.propagate_in_video(state))
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, 3, 168, 168\)"):
        predictor.model.encode_frame(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="needs a SAM 2 model"):
        SamVideoPredictor(np.zeros(3))


@pytest.mark.parametrize("binarize", [True, False], ids=["clicked", "tracked"])
def test_meta_memory_order(saved, frames, binarize):
    """The default order is Meta's: the 0/1 mask (clicked frames) or its sigmoid (tracked frames),
    scaled to +-10, goes through Meta's own memory encoder (sam3.model.memory, its 1152-px resize
    inside the mask downsampler at our 168 -> 192), loaded with our weights."""
    memory = pytest.importorskip("sam3.model.memory")
    from sam3.model.position_encoding import PositionEmbeddingSine

    model = load_sam3_tracker(saved["meta"])
    assert model.memory_mask_resize == "mask"
    dim, size = model.hidden_dim, model.memory_encoder.mask_downsampler.mask_size
    meta = memory.SimpleMaskEncoder(
        out_dim=model.mem_dim, in_dim=dim,
        mask_downsampler=memory.SimpleMaskDownSampler(embed_dim=dim, kernel_size=3, stride=2, padding=1, interpol_size=[size, size]),
        fuser=memory.SimpleFuser(memory.CXBlock(dim=dim, kernel_size=7, padding=3, layer_scale_init_value=1e-6), num_layers=2),
        position_encoding=PositionEmbeddingSine(num_pos_feats=model.mem_dim, normalize=True, temperature=10000),
    ).eval()
    meta.load_state_dict(model.memory_encoder.state_dict(), strict=True)
    with torch.no_grad():
        features = model.encode_frame(reference_pixels(frames[:1]) * 0.5 + 0.5)
        predictor = SamVideoPredictor(model)
        state = predictor.init_state(frames)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[60.0, 50.0]], labels=[1])
        high_res = torch.nn.functional.interpolate(state.objects[1].pending[0].low_res_masks, (168, 168), mode="bilinear")
        present = torch.ones(1, 1)
        ours, ours_pos = model.encode_memory(features, high_res, present, binarize)
        mask = (high_res > 0).float() if binarize else torch.sigmoid(high_res)
        theirs = meta(features.vision_feats, mask * 20.0 - 10.0, skip_mask_sigmoid=True)
        torch.testing.assert_close(ours, theirs["vision_features"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_pos, theirs["vision_pos_enc"][0], atol=1e-5, rtol=1e-5)
        model.memory_mask_resize = "logits"
        other, _ = model.encode_memory(features, high_res, present, binarize)
    assert (other - ours).abs().max() > 1e-3  # the two orders are not the same numbers


def test_window_memory_gives_the_same_forward_masks(saved, frames):
    """keep_memory="window" (bounded memory) drops what later frames cannot read: a forward run gives
    the masks of keep_memory="all", and the bank stays within the window."""
    predictor = SamVideoPredictor.from_sam3(saved["hub"])
    runs = {}
    for keep in ("all", "window"):
        state = predictor.init_state(frames, keep_memory=keep)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[60.0, 50.0]], labels=[1])
        runs[keep] = [masks for _, _, masks in predictor.propagate_in_video(state)]
        kept = [t for t, memory in state.objects[1].tracked.items() if memory.maskmem_features is not None]
        if keep == "window":
            assert len(kept) <= predictor.model.tracking.num_maskmem - 1 < NUM_FRAMES - 1
        else:
            assert len(kept) == NUM_FRAMES - 1
    for ours, reference in zip(runs["window"], runs["all"]):
        assert torch.equal(ours, reference)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    torch.set_num_threads(1)
    from sam.video import SamVideoPredictor
    predictor = SamVideoPredictor.from_sam3({checkpoint!r})
    state = predictor.init_state({video!r}, keep_memory="window")
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[300, 250]], labels=[1])
    fills = []
    for frame_idx, obj_ids, masks in predictor.propagate_in_video(state, max_frame_num_to_track={frames} - 1):
        fills.append((masks[0] > 0).float().mean().item())
    track = state.objects[1]
    # VmHWM is this process's own peak RSS; ru_maxrss would include the parent's at fork.
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({{"frames": len(fills), "peak_mb": peak_kb / 1024, "fill": [min(fills), max(fills)],
                      "bank": [len(track.tracked), sum(m.maskmem_features is not None for m in track.tracked.values())]}}))
    """
)
MEMORY_IMAGE_SIZE = 84  # a 6x6 grid: the 300-frame run takes about 11 s of CPU time on one thread
GROWTH_MARGIN_MB = 20


def test_peak_memory_does_not_grow_with_video_length(tmp_path):
    """300 frames of 640x480 from an .mp4, one object tracked with keep_memory="window" by a tiny
    SAM 3 tracker (84 px): the peak RSS is within 20 MB of the first 30 frames' (measured: +2.4 MB),
    the bank holds as many entries after 300 frames as after 30, and every mask is textured.
    What keeping the 270 extra frames' data would add: decoded frames 249 MB (0.92 MB each), the
    video-size logits returned 332 MB (1.23 MB each), image features 25 MB (92 KB each at this size;
    holding them all measured +43 MB); their memories (7 KB each) are below any RSS margin, hence
    the bank check. Each run is a fresh process (its VmHWM); both run at once."""
    checkpoint = tmp_path / "tracker"
    tiny_transformers_tracker_video(image_size=MEMORY_IMAGE_SIZE).save_pretrained(checkpoint)
    video = write_mp4(iter_clip(300, 480, 640), tmp_path / "long.mp4", fps=30)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    runs = {
        frames: subprocess.Popen(
            [sys.executable, "-c", MEMORY_SCRIPT.format(checkpoint=str(checkpoint), video=str(video), frames=frames)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env,
        )
        for frames in (30, 300)
    }
    results = {}
    for frames, process in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
        results[frames] = json.loads(out.strip().splitlines()[-1])
    assert results[30]["frames"] == 30 and results[300]["frames"] == 300
    for frames, result in results.items():
        low, high = result["fill"]
        assert 0.02 < low and high < 0.98, f"{frames} frames: mask fill from {low:.3f} to {high:.3f}"
    assert results[300]["bank"] == results[30]["bank"], results
    growth = results[300]["peak_mb"] - results[30]["peak_mb"]
    assert growth < GROWTH_MARGIN_MB, f"peak RSS grew by {growth:.0f} MB from 30 to 300 frames ({results})"
