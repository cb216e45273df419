"""Text-prompted video tracking (`langsam.video`).

The tracking rules are checked with a scripted detector and a scripted video predictor that
follows `sam.video.SamVideoPredictor`'s API: the "world" is a set of rectangles moving through
the frames; the detector reports the visible ones on the frames it is asked about, and the
predictor, prompted with a box, follows the rectangle that box covers. So every id, label,
start frame and mask of the result is known in advance. The end-to-end test runs the real
`SamVideoPredictor` on a tiny random SAM 2.1 and the tiny Grounding DINO, and checks the result
against the predictor driven by hand with the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from langsam.detector import Detections
from langsam.video import (
    TrackedFrame,
    box_iou,
    mask_iou,
    render_overlay,
    track_color,
    track_video,
)

H, W = 48, 64
#: Input side of the tiny SAM 2.1 in the end-to-end tests: an 8x8 memory grid (a frame in tens of ms).
VIDEO_SIZE = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ------------------------------------------------------------------------------------------
# A scripted world: rectangles per frame
# ------------------------------------------------------------------------------------------


class Frames:
    """A frame source (len, height, width, [i]); frame i's top-left pixel holds i, so the
    scripted detector knows which frame it is shown. Counts reads."""

    def __init__(self, count: int, height: int = H, width: int = W, sizes: dict | None = None):
        self.count, self.height, self.width = count, height, width
        self.sizes = sizes or {}
        self.reads: list[int] = []

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        self.reads.append(index)
        height, width = self.sizes.get(index, (self.height, self.width))
        image = np.full((height, width, 3), 90, dtype=np.uint8)
        image[..., 1] = np.arange(width, dtype=np.uint8)[None, :] * 3
        image[0, 0, 0] = index
        return image


def rect_mask(box) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = True
    return mask


class World:
    """{name: {frame: (x0, y0, x1, y1) integer box}}; absent frames have no entry."""

    def __init__(self, objects: dict[str, dict[int, tuple[int, int, int, int]]]):
        self.objects = objects

    def box(self, name, frame):
        return self.objects[name].get(frame)

    def closest(self, box, frame) -> str:
        names = [n for n in self.objects if self.box(n, frame) is not None]
        ious = [box_iou(np.asarray(box, float), np.asarray([self.box(n, frame)], float))[0] for n in names]
        return names[int(np.argmax(ious))]


class ScriptedDetector:
    """Reports, on each frame it is shown, the scripted detections of that frame:
    {frame: [(name_in_world, label, score, jitter)]}; boxes are the world's, shifted by jitter."""

    def __init__(self, world: World, script: dict[int, list[tuple[str, str, float, int]]]):
        self.world, self.script = world, script
        self.frames: list[int] = []

    def detect(self, image, queries, box_threshold=0.3, text_threshold=0.25):
        frame = int(image[0, 0, 0])
        self.frames.append(frame)
        found = self.script.get(frame, [])
        if not found:
            return Detections.empty(queries)
        boxes = np.array([np.add(self.world.box(n, frame), j) for n, _, _, j in found], dtype=np.float32)
        labels = [label for _, label, _, _ in found]
        return Detections(boxes, np.array([s for _, _, s, _ in found], np.float32), labels,
                          np.array([list(queries).index(label) for label in labels]), labels, list(queries))


class ScriptedPredictor:
    """SamVideoPredictor's API over a World. A box prompt picks the world object it covers best;
    propagation yields that object's rectangle as +10/-10 logits (empty where it is absent) and
    object scores +5 (present) / -5 (absent). Checks that new objects are added only on the
    frame where propagation is suspended (or before it starts)."""

    def __init__(self, world: World):
        self.world = world
        self.calls: list[tuple] = []

    def init_state(self, frames, offload_state_to_cpu=False, keep_memory="window"):
        assert keep_memory == "window"
        return {"frames": frames, "objects": {}, "at": None}

    def _logits(self, state, frame, ids):
        masks = [rect_mask(self.world.box(state["objects"][i], frame)) for i in ids]
        logits = np.where(np.stack(masks), 10.0, -10.0).astype(np.float32) if ids else np.zeros((0, H, W), np.float32)
        return torch.from_numpy(logits)[:, None]

    def add_new_points_or_box(self, state, frame_idx, obj_id, points=None, labels=None, clear_old_points=True,
                              normalize_coords=True, box=None):
        assert obj_id not in state["objects"] and box is not None
        assert state["at"] in (None, frame_idx), "new objects may only be added on the suspended frame"
        state["objects"][obj_id] = self.world.closest(box, frame_idx)
        self.calls.append(("add", frame_idx, obj_id))
        ids = sorted(state["objects"])
        return frame_idx, ids, self._logits(state, frame_idx, ids)

    def propagate_in_video(self, state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        assert state["objects"], "nothing to propagate"
        self.calls.append(("propagate", start_frame_idx))
        for frame in range(start_frame_idx, len(state["frames"])):
            state["frames"][frame]  # the real predictor decodes the frame here
            state["at"] = frame
            ids = sorted(state["objects"])
            yield frame, ids, self._logits(state, frame, ids)
        state["at"] = None

    def object_scores(self, state, frame_idx):
        return {i: (5.0 if self.world.box(name, frame_idx) is not None else -5.0)
                for i, name in state["objects"].items()}

    def remove_object(self, state, obj_id):
        self.calls.append(("remove", state["at"], obj_id))
        del state["objects"][obj_id]

    def reset_state(self, state):
        self.calls.append(("reset",))
        state["objects"].clear()
        state["at"] = None


class FakeLangSAM:
    def __init__(self, detector):
        self.detector = detector


def moving(x0, y0, w, h, frames, dx=1):
    return {f: (x0 + dx * f, y0, x0 + dx * f + w, y0 + h) for f in frames}


def run(world, script, num_frames=10, **kwargs):
    detector = ScriptedDetector(world, script)
    predictor = ScriptedPredictor(world)
    frames = Frames(num_frames)
    result = track_video(FakeLangSAM(detector), frames, ["a car", "a person"], video_predictor=predictor, **kwargs)
    return result, list(result), detector, predictor, frames


# ------------------------------------------------------------------------------------------
# Tracking logic
# ------------------------------------------------------------------------------------------


def test_new_object_mid_video_gets_a_new_id_at_its_detection_frame_and_ids_stay_stable():
    world = World({"car": moving(2, 5, 16, 12, range(10)), "man": moving(30, 20, 10, 20, range(3, 10))})
    # The detector sees what is visible on each frame it runs on; the man shows up at frame 3,
    # but the next detection frame is 4.
    script = {f: [("car", "a car", 0.9, 0)] + ([("man", "a person", 0.6, 0)] if f >= 3 else []) for f in range(10)}
    result, frames, detector, predictor, _ = run(world, script, detect_every=2)

    assert detector.frames == [0, 2, 4, 6, 8]
    assert [f.frame_index for f in frames] == list(range(10))
    assert [f.obj_ids.tolist() for f in frames] == [[1]] * 4 + [[1, 2]] * 6
    assert {i: (t.label, t.started_at, t.first_frame, t.last_frame) for i, t in result.tracks.items()} == {
        1: ("a car", 0, 0, 9), 2: ("a person", 4, 4, 9)}
    for frame in frames:
        np.testing.assert_array_equal(frame.mask_of(1), rect_mask(world.box("car", frame.frame_index)))
        assert frame.labels[0] == "a car"
        if frame.frame_index >= 4:
            np.testing.assert_array_equal(frame.mask_of(2), rect_mask(world.box("man", frame.frame_index)))
            assert frame.labels[1] == "a person"
            np.testing.assert_allclose(frame.scores, [0.9, 0.6])
        np.testing.assert_allclose(frame.boxes[0], world.box("car", frame.frame_index))
        np.testing.assert_array_equal(frame.image, Frames(10)[frame.frame_index])
    # One box prompt per object, on the frame it was found; one propagation from frame 0.
    assert [c for c in predictor.calls if c[0] in ("add", "propagate")] == [
        ("add", 0, 1), ("propagate", 0), ("add", 4, 2)]


def test_redetections_keep_their_ids_and_duplicates_on_one_frame_make_one_object():
    world = World({"car": moving(4, 4, 20, 16, range(8))})
    # Every frame: the car twice (a near-duplicate box under another query, lower score), then
    # re-detected with a 2-pixel shift (box IoU ~0.7 > 0.5) on later frames.
    script = {f: [("car", "a person", 0.5, 1), ("car", "a car", 0.8, 2 if f else 0)] for f in range(8)}
    result, frames, detector, predictor, _ = run(world, script, num_frames=8, detect_every=1)

    assert detector.frames == list(range(8))
    assert [f.obj_ids.tolist() for f in frames] == [[1]] * 8
    assert result.tracks[1].label == "a car"  # the better-scored detection started it
    assert result.tracks[1].detections == 16
    assert [c for c in predictor.calls if c[0] == "add"] == [("add", 0, 1)]


def test_low_overlap_detection_starts_a_new_object_and_threshold_is_honoured():
    world = World({"a": {f: (4, 4, 24, 24) for f in range(4)}, "b": {f: (14, 4, 34, 24) for f in range(4)}})
    script = {0: [("a", "a car", 0.9, 0), ("b", "a car", 0.8, 0)]}  # box IoU 1/3
    _, frames, *_ = run(world, script, num_frames=4, detect_every=4)
    assert frames[0].obj_ids.tolist() == [1, 2]
    _, frames, *_ = run(world, script, num_frames=4, detect_every=4, new_object_iou=0.3)
    assert frames[0].obj_ids.tolist() == [1]


def test_detection_whose_box_prompted_mask_is_a_tracked_object_keeps_its_id():
    # The car is 20x16; on frame 2 the detector boxes it loosely (40x40: box IoU 0.2 < 0.5), but
    # SAM, prompted with that box, outlines the car itself (mask IoU 1): a re-detection. The
    # trial prompt is withdrawn and its id goes to the next new object (the man on frame 4).
    world = World({"car": {f: (10, 10, 30, 26) for f in range(6)}, "man": {f: (44, 4, 60, 40) for f in range(4, 6)}})
    detector_box = {2: [("car", "a car", 0.7, 0)], 4: [("man", "a person", 0.8, 0)]}
    detector = ScriptedDetector(world, {0: [("car", "a car", 0.9, 0)], **detector_box})
    original = detector.detect

    def loose(image, queries, box_threshold=0.3, text_threshold=0.25):
        found = original(image, queries, box_threshold, text_threshold)
        if int(image[0, 0, 0]) == 2:
            found.boxes = np.array([[0, 0, 40, 40]], np.float32)
        return found

    detector.detect = loose
    predictor = ScriptedPredictor(world)
    result = track_video(FakeLangSAM(detector), Frames(6), ["a car", "a person"], detect_every=2,
                         video_predictor=predictor)
    frames = list(result)
    assert [f.obj_ids.tolist() for f in frames] == [[1]] * 4 + [[1, 2]] * 2
    assert result.tracks[1].detections == 2 and result.tracks[2].label == "a person"
    assert [c for c in predictor.calls if c[0] in ("add", "remove")] == [
        ("add", 0, 1), ("add", 2, 2), ("remove", 2, 2), ("add", 4, 2)]


def test_lost_object_ends_after_max_lost_frames_and_comes_back_with_a_new_id():
    # Visible on frames 0-3, gone on 4-7, back on 8-9.
    world = World({"car": {f: (10, 10, 30, 30) for f in [0, 1, 2, 3, 8, 9]}})
    script = {f: [("car", "a car", 0.9, 0)] for f in [0, 1, 2, 3, 8, 9]}
    result, frames, _, predictor, _ = run(world, script, detect_every=1, max_lost_frames=2)

    # Absent on 4, 5, 6: more than 2 frames at frame 6, so it ends there.
    assert ("remove", 6, 1) in predictor.calls and predictor.calls.count(("reset",)) >= 1
    assert result.tracks[1].ended_at == 6 and result.tracks[1].last_frame == 3
    assert [f.obj_ids.tolist() for f in frames] == [[1]] * 4 + [[]] * 4 + [[2]] * 2
    assert result.tracks[2].started_at == 8 and result.tracks[2].label == "a car"
    # Propagation restarted at the new object's frame.
    assert [c for c in predictor.calls if c[0] == "propagate"] == [("propagate", 0), ("propagate", 8)]
    # A short gap (2 frames) does not end it.
    world = World({"car": {f: (10, 10, 30, 30) for f in [0, 1, 4, 5, 6]}})
    result, frames, _, predictor, _ = run(world, {0: [("car", "a car", 0.9, 0)]}, num_frames=7,
                                          detect_every=100, max_lost_frames=2)
    assert [f.obj_ids.tolist() for f in frames] == [[1], [1], [], [], [1], [1], [1]]
    assert not [c for c in predictor.calls if c[0] == "remove"]


def test_nothing_found_until_later_frame_propagates_from_there():
    world = World({"car": moving(0, 0, 10, 10, range(3, 6))})
    result, frames, detector, predictor, _ = run(world, {3: [("car", "a car", 0.7, 0)]}, num_frames=6, detect_every=3)
    assert detector.frames == [0, 3]
    assert [len(f) for f in frames] == [0, 0, 0, 1, 1, 1]
    assert frames[0].masks.shape == (0, H, W) and frames[0].image is not None
    assert [c for c in predictor.calls if c[0] == "propagate"] == [("propagate", 3)]


def test_iteration_is_lazy_frame_by_frame():
    world = World({"car": moving(2, 5, 16, 12, range(30))})
    detector = ScriptedDetector(world, {f: [("car", "a car", 0.9, 0)] for f in range(30)})
    frames = Frames(30)
    result = track_video(FakeLangSAM(detector), frames, "a car", detect_every=5,
                         video_predictor=ScriptedPredictor(world))
    assert frames.reads == [] and detector.frames == []  # nothing runs before iteration
    iterator = iter(result)
    for _ in range(3):
        next(iterator)
    assert detector.frames == [0] and max(frames.reads) <= 2
    iterator.close()
    # A second pass runs again from the start and gives the same ids.
    assert [f.obj_ids.tolist() for f in result] == [[1]] * 30


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_value_errors(tmp_path):
    fake = FakeLangSAM(ScriptedDetector(World({}), {}))
    predictor = ScriptedPredictor(World({}))
    with pytest.raises(ValueError, match="no frames"):
        track_video(fake, Frames(0), "a car", video_predictor=predictor)
    with pytest.raises(ValueError, match="12 frames, more than the limit of 10"):
        track_video(fake, Frames(12), "a car", max_frames=10, video_predictor=predictor)
    with pytest.raises(ValueError, match="longer side is over the limit of 50"):
        track_video(fake, Frames(3), "a car", max_side=50, video_predictor=predictor)
    with pytest.raises(ValueError, match="text is empty"):
        track_video(fake, Frames(3), " . ", video_predictor=predictor)
    with pytest.raises(ValueError, match="detect_every must be an integer >= 1"):
        track_video(fake, Frames(3), "a car", detect_every=0, video_predictor=predictor)
    with pytest.raises(ValueError, match="new_object_iou"):
        track_video(fake, Frames(3), "a car", new_object_iou=1.5, video_predictor=predictor)
    with pytest.raises(ValueError, match="no such file"):
        track_video(fake, tmp_path / "missing.mp4", "a car", video_predictor=predictor)
    # A frame of another size is refused when it is reached, naming the frame.
    result = track_video(fake, Frames(4, sizes={2: (H, W + 2)}), "a car", video_predictor=predictor)
    with pytest.raises(ValueError, match="frame 2 is 66x48 but the video started at 64x48"):
        list(result)

    class Sam1Pipeline:
        detector = None
        sam_type = "vit_b"

        class predictor:  # noqa: N801
            family = "sam1"
            model = object()

    with pytest.raises(ValueError, match="needs a SAM 2"):
        track_video(Sam1Pipeline(), Frames(3), "a car")


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    world = World({"car": moving(2, 14, 16, 16, range(8)), "man": moving(30, 20, 11, 21, range(2, 8))})
    script = {f: [("car", "a car", 0.9, 0)] + ([("man", "a person", 0.6, 0)] if f >= 2 else []) for f in range(8)}
    detector = ScriptedDetector(world, script)
    result = track_video(FakeLangSAM(detector), Frames(8), ["a car", "a person"], detect_every=2,
                         video_predictor=ScriptedPredictor(world))
    yielded: list[TrackedFrame] = []
    out = tmp_path_factory.mktemp("track_out")
    paths = result.save(out, ("json", "overlay", "masks"), source_name="clip.mp4", on_frame=yielded.append)
    return result, yielded, paths, out


def test_json_is_youtube_vis_and_its_rle_decodes_to_the_yielded_masks(saved):
    from pycocotools import mask as mask_utils

    result, yielded, paths, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["masks", "overlay.mp4", "tracks.json"]
    data = json.loads(paths["json"].read_text())
    assert data["videos"] == [{"id": 1, "file_name": "clip.mp4", "height": H, "width": W, "length": 8, "fps": 25.0}]
    assert data["categories"] == [{"id": 1, "name": "a car", "supercategory": "query"},
                                  {"id": 2, "name": "a person", "supercategory": "query"}]
    assert data["info"]["detection_frames"] == [0, 2, 4, 6]
    annotations = {a["id"]: a for a in data["annotations"]}
    assert sorted(annotations) == [1, 2]
    assert (annotations[2]["category_id"], annotations[2]["label"], annotations[2]["first_frame"]) == (2, "a person", 2)
    assert annotations[1]["score"] == pytest.approx(0.9) and annotations[2]["score"] == pytest.approx(0.6)
    for obj_id, annotation in annotations.items():
        assert len(annotation["segmentations"]) == len(annotation["bboxes"]) == len(annotation["areas"]) == 8
        for frame in yielded:
            mask = frame.mask_of(obj_id)
            rle = annotation["segmentations"][frame.frame_index]
            if mask is None:
                assert rle is None and annotation["bboxes"][frame.frame_index] is None
                continue
            decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            np.testing.assert_array_equal(decoded, mask)
            assert annotation["areas"][frame.frame_index] == int(mask.sum())
            x, y, w, h = annotation["bboxes"][frame.frame_index]
            rows, cols = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert annotations[2]["segmentations"][:2] == [None, None]


def test_mask_pngs_hold_object_ids(saved):
    _, yielded, _, out = saved
    files = sorted((out / "masks").iterdir())
    assert [p.name for p in files] == [f"{i:06d}.png" for i in range(8)]
    for frame, path in zip(yielded, files):
        ids = np.asarray(Image.open(path))
        expected = np.zeros((H, W), np.uint8)
        for obj_id in frame.obj_ids.tolist():
            expected[frame.mask_of(obj_id)] = obj_id
        np.testing.assert_array_equal(ids, expected)
        assert Image.open(path).getpalette()[3:6] == list(track_color(1))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels of ``mask`` whose whole (2r+1)^2 neighbourhood is in the mask."""
    padded = np.pad(mask, radius)
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def text_bottom(frame, obj_id) -> int:
    """First row below the "id label" text drawn above the object's box (11 px tall band)."""
    top = int(frame.boxes[list(frame.obj_ids).index(obj_id)][1])
    return max(0, top - 11) + 12


def test_overlay_colours_are_per_id_and_stable(saved):
    import av

    _, yielded, paths, _ = saved
    alpha = 0.5
    rendered = [render_overlay(frame) for frame in yielded]
    for frame, pixels in zip(yielded, rendered):
        for obj_id in frame.obj_ids.tolist():
            inner = erode(frame.mask_of(obj_id), 2)  # away from the box outline
            inner[: text_bottom(frame, obj_id)] = False  # below the label text
            expected = np.rint(frame.image[inner] * (1 - alpha) + np.array(track_color(obj_id)) * alpha)
            assert inner.any()
            np.testing.assert_array_equal(pixels[inner], expected.astype(np.uint8))
    assert track_color(1) != track_color(2) and track_color(1) == track_color(1)
    # The MP4 holds every frame at the video size, close to the rendered frames (H.264, crf 18).
    with av.open(str(paths["overlay"])) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 8 and decoded[0].shape == (H, W, 3)
    for frame, pixels, back in zip(yielded, rendered, decoded):
        assert np.abs(back.astype(int) - pixels.astype(int)).mean() < 10  # yuv420p halves the colour resolution
        for obj_id in frame.obj_ids.tolist():
            core = erode(frame.mask_of(obj_id), 3)
            core[: text_bottom(frame, obj_id)] = False
            np.testing.assert_allclose(back[core].mean(0), pixels[core].mean(0), atol=12)


def test_failed_save_leaves_no_overlay_or_temp_file(tmp_path):
    world = World({"car": moving(2, 5, 16, 12, range(5))})
    detector = ScriptedDetector(world, {0: [("car", "a car", 0.9, 0)]})
    result = track_video(FakeLangSAM(detector), Frames(5, sizes={3: (H + 2, W)}), "a car",
                         video_predictor=ScriptedPredictor(world))
    with pytest.raises(ValueError, match="frame 3"):
        result.save(tmp_path, ("json", "overlay"))
    assert list(tmp_path.iterdir()) == []


class CutShortFrames(Frames):
    """Frames whose source breaks at frame `bad`, as sam.video's file source does."""

    def __init__(self, count: int, bad: int):
        super().__init__(count)
        self.bad = bad

    def __getitem__(self, index):
        if index >= self.bad:
            from sam.video import VideoLoadError

            raise VideoLoadError(f"clip.mp4: cannot decode frame {self.bad} of {self.count}", frame_index=self.bad)
        return super().__getitem__(index)


def test_a_video_cut_short_writes_the_frames_before_the_cut_then_raises(tmp_path):
    """Frames 0-2 decode, frame 3 does not: the three frames are tracked and written (JSON of
    length 3 with info.damaged, 3 id maps, a 3-frame overlay), equal to a run over an intact
    3-frame video, and then the source's error is raised."""
    world = World({"car": moving(2, 5, 16, 12, range(8))})
    script = {0: [("car", "a car", 0.9, 0)]}
    result = track_video(FakeLangSAM(ScriptedDetector(world, script)), CutShortFrames(8, bad=3), "a car",
                         video_predictor=ScriptedPredictor(world))
    with pytest.raises(ValueError, match="cannot decode frame 3 of 8") as raised:
        result.save(tmp_path / "cut", ("json", "overlay", "masks"))
    assert result.damage is raised.value and raised.value.frame_index == 3
    intact = track_video(FakeLangSAM(ScriptedDetector(world, script)), Frames(3), "a car",
                         video_predictor=ScriptedPredictor(world))
    intact.save(tmp_path / "intact", ("json", "overlay", "masks"))
    cut = json.loads((tmp_path / "cut" / "tracks.json").read_text())
    whole = json.loads((tmp_path / "intact" / "tracks.json").read_text())
    assert cut["info"].pop("damaged") == {"first_bad_frame": 3, "listed_frames": 8,
                                          "error": "clip.mp4: cannot decode frame 3 of 8"}
    assert cut == whole and cut["videos"][0]["length"] == 3 and cut["annotations"]
    assert sorted(p.name for p in (tmp_path / "cut" / "masks").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    import av

    with av.open(str(tmp_path / "cut" / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------
# End to end: the real SamVideoPredictor, tiny random SAM 2.1 and Grounding DINO
# ------------------------------------------------------------------------------------------


class RecordingPredictor:
    """Forwards every call to the real predictor and records the prompts and removals, in order:
    ("add", frame, obj_id, box, returned mask of obj_id) and ("remove", obj_id)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.log: list[tuple] = []

    def add_new_points_or_box(self, state, frame_idx, obj_id, **kwargs):
        answer = self.predictor.add_new_points_or_box(state, frame_idx, obj_id, **kwargs)
        mask = (answer[2][list(answer[1]).index(obj_id), 0] > 0).numpy()
        self.log.append(("add", frame_idx, obj_id, np.asarray(kwargs["box"], dtype=np.float32).copy(), mask))
        return answer

    def remove_object(self, state, obj_id):
        self.log.append(("remove", obj_id))
        return self.predictor.remove_object(state, obj_id)

    @property
    def adds(self):
        return [entry[1:4] for entry in self.log if entry[0] == "add"]

    def __getattr__(self, name):
        return getattr(self.predictor, name)


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    from tiny_gdino import save_tiny_grounding_dino
    from video_support import make_clip, make_video_sam2

    from langsam.pipeline import LangSAM

    gdino = save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino"), logit_scale=0.1, num_queries=2)
    pipeline = LangSAM(sam_model=make_video_sam2(VIDEO_SIZE), detector=str(gdino), device="cpu")
    return pipeline, make_clip(8, 120, 160)


def test_real_predictor_tracking_equals_the_predictor_driven_by_hand(real_models):
    from sam.video import SamVideoPredictor, open_frames

    pipeline, clip = real_models
    queries = ["a cat", "a sofa"]
    recorder = RecordingPredictor(SamVideoPredictor(pipeline.predictor.model))
    result = track_video(pipeline, clip, queries, detect_every=100, box_threshold=0.0, video_predictor=recorder)
    frames = list(result)
    assert result.detection_frames == [0] and len(frames) == 8

    # Each detection of frame 0 either started an object (prompted with its own box, labelled
    # with its query), or matched one started before it: box IoU >= 0.5 with that object's
    # mask box, or (a trial prompt, withdrawn) mask IoU >= 0.5 with its mask.
    detections = pipeline.detector.detect(clip[0], queries, box_threshold=0.0, text_threshold=0.25)
    assert len(detections) >= 1
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the prompts still standing after each step
    trial_masks = []
    for entry in recorder.log:
        if entry[0] == "add":
            kept[entry[2]] = (entry[3], entry[4])
            trial_masks.append((entry[3], entry[4]))
        else:
            del kept[entry[1]]
    assert sorted(kept) == sorted(result.tracks) == list(range(1, len(kept) + 1))
    for box, label in zip(detections.boxes, detections.labels):
        started = [i for i, (b, _) in kept.items() if np.abs(b - box).max() < 1e-3]
        if started:
            assert result.tracks[started[0]].label == label
            continue
        others = [m for _, m in kept.values() if m.any()]
        by_box = box_iou(box, np.stack([_box_of(m) for m in others])).max()
        trial = [m for b, m in trial_masks if np.abs(b - box).max() < 1e-3]
        by_mask = mask_iou(trial[0], np.stack(others)).max() if trial else 0.0
        assert max(by_box, by_mask) >= 0.5

    # The same prompts (and withdrawals) given to a fresh predictor by hand give the same masks.
    predictor = SamVideoPredictor(pipeline.predictor.model)
    state = predictor.init_state(open_frames(clip))
    for entry in recorder.log:
        if entry[0] == "add":
            predictor.add_new_points_or_box(state, entry[1], entry[2], box=entry[3])
        else:
            predictor.remove_object(state, entry[1])
    by_hand = {}
    for frame_idx, obj_ids, logits in predictor.propagate_in_video(state, start_frame_idx=0):
        scores = predictor.object_scores(state, frame_idx)
        by_hand[frame_idx] = {int(i): (logits[row, 0] > 0).numpy() for row, i in enumerate(obj_ids)
                              if scores[int(i)] > 0 and (logits[row, 0] > 0).any()}
    for frame in frames:
        assert frame.obj_ids.tolist() == sorted(by_hand[frame.frame_index])
        for obj_id, mask in by_hand[frame.frame_index].items():
            np.testing.assert_array_equal(frame.mask_of(obj_id), mask)


def _box_of(mask):
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def test_real_predictor_adds_objects_mid_video_and_writes_outputs(real_models, tmp_path):
    from pycocotools import mask as mask_utils

    pipeline, clip = real_models
    result = track_video(pipeline, clip, ["a cat", "a sofa"], detect_every=3, box_threshold=0.0)
    frames: list[TrackedFrame] = []
    paths = result.save(tmp_path, ("json", "overlay"), on_frame=frames.append)
    assert result.detection_frames == [0, 3, 6]
    for obj_id, info in result.tracks.items():
        assert info.started_at in (0, 3, 6) and info.label in ("a cat", "a sofa")
        visible = [f.frame_index for f in frames if f.mask_of(obj_id) is not None]
        assert all(index >= info.started_at for index in visible)
    starts = [info.started_at for _, info in sorted(result.tracks.items())]
    assert starts == sorted(starts)  # ids are given in order of appearance
    data = json.loads(paths["json"].read_text())
    for annotation in data["annotations"]:
        for frame in frames:
            rle = annotation["segmentations"][frame.frame_index]
            mask = frame.mask_of(annotation["id"])
            assert (rle is None) == (mask is None)
            if mask is not None:
                np.testing.assert_array_equal(
                    mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), mask)


def test_demo_video_tab_gives_the_library_result(real_models, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from demo_support import serve
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from video_support import write_mp4

    from langsam.demo import build_app
    from langsam.demo import video_tab

    pipeline, clip = real_models
    path = write_mp4(clip, tmp_path / "clip.mp4")
    app = build_app(pipeline)
    with serve(app) as url:
        client = Client(url, verbose=False)
        overlay, json_path, table, status = client.predict(handle_file(str(path)), "a cat, a sofa", 3, 0.0, 0.25,
                                                           api_name="/track_video")
        expected = track_video(pipeline, path, ["a cat", "a sofa"], detect_every=3, box_threshold=0.0)
        frames = list(expected)
        data = json.loads(Path(json_path).read_text())
        assert {a["id"]: a["label"] for a in data["annotations"]} == {
            i: t.label for i, t in expected.tracks.items() if t.first_frame is not None}
        assert f"over {len(frames)} frames" in status
        assert [row[0] for row in table["data"]] == sorted(expected.tracks)
        import av

        with av.open(overlay["video"]["path"] if isinstance(overlay, dict) else overlay) as container:
            assert sum(1 for _ in container.decode(video=0)) == len(frames)
    monkeypatch.setattr(video_tab, "MAX_VIDEO_FRAMES", 5)
    app = build_app(pipeline)
    with serve(app) as url:
        with pytest.raises(AppError, match="8 frames, more than the limit of 5"):
            Client(url, verbose=False).predict(handle_file(str(path)), "a cat", 3, 0.0, 0.25, api_name="/track_video")


def test_demo_shows_what_was_tracked_before_a_clip_is_cut_short(real_models, tmp_path):
    from video_support import write_mp4

    from langsam.demo import video_tab

    pipeline, clip = real_models
    whole = write_mp4(np.concatenate([clip, clip[::-1]]), tmp_path / "whole.mp4", faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    video, paths = video_tab.track_clip(pipeline, str(cut), ["a cat"], tmp_path / "out", detect_every=3,
                                        box_threshold=0.0)
    bad = video.damage.frame_index
    assert 0 < bad < len(video) and json.loads(paths["json"].read_text())["videos"][0]["length"] == bad
    import av

    with av.open(str(paths["overlay"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == bad
    status = video_tab.clip_status(video)
    assert f"over {bad} frames" in status and f"cut short at frame {bad} of {len(video)}" in status


def test_real_predictor_ends_lost_objects_and_restarts_on_the_next_detection(real_models):
    """Object scores forced to "absent" on frames 2-4: every object ends on frame 3 (absent on
    more than 1 frame), is removed from the real predictor, and the detection on frame 5 starts
    new objects with new ids, propagated from there."""
    from sam.video import SamVideoPredictor

    class Occluding(RecordingPredictor):
        def object_scores(self, state, frame_idx):
            scores = self.predictor.object_scores(state, frame_idx)
            return {i: (-3.0 if 2 <= frame_idx <= 4 else s) for i, s in scores.items()}

    pipeline, clip = real_models
    recorder = Occluding(SamVideoPredictor(pipeline.predictor.model))
    result = track_video(pipeline, clip, ["a cat", "a sofa"], detect_every=5, box_threshold=0.0,
                         max_lost_frames=1, video_predictor=recorder)
    frames = list(result)
    first = [i for i, t in result.tracks.items() if t.started_at == 0]
    later = [i for i, t in result.tracks.items() if t.started_at == 5]
    assert first and later and min(later) > max(first)
    assert all(result.tracks[i].ended_at == 3 for i in first)
    assert [len(f) for f in frames[2:5]] == [0, 0, 0]
    for frame in frames[5:]:
        assert set(frame.obj_ids.tolist()) <= set(later)
    assert {frame_idx for frame_idx, _, _ in recorder.adds} == {0, 5}
