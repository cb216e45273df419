"""`LangSAM.track(video, text)` with `model="sam3"`: SAM 3's concept model finds the objects and SAM 3's
video tracker (on the same ViT, from the same `sam3.pt`) tracks them, through the usual association
of langsam.video.tracker. Checked against the two parts run by hand on the same file: the concept
predictor's detections on frame 0 and SamVideoPredictor.from_sam3 box-prompted with them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sam3_video_support import save_tiny_sam3_with_tracker
from video_support import make_clip

from langsam import LangSAM
from langsam.result import clip_boxes
from sam.sam3 import Sam3Predictor, load_sam3
from sam.video import SamVideoPredictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERIES = ["a cat", "a red sofa"]
NUM_FRAMES, HEIGHT, WIDTH = 6, 96, 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_sam3_with_tracker(tmp_path_factory.mktemp("sam3_track"))


@pytest.fixture(scope="module")
def frames():
    return make_clip(NUM_FRAMES, HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def detections(checkpoint, frames):
    """The concept predictor's instances on frame 0, at the median score (so the cut matters)."""
    concept = Sam3Predictor(load_sam3(checkpoint))
    concept.set_image(frames[0])
    everything = concept.predict_many(QUERIES, threshold=0.0)
    scores = np.concatenate([p.scores for p in everything])
    threshold = float(np.median(scores))
    kept = concept.predict_many(QUERIES, threshold=threshold)
    return {"threshold": threshold, "scores": np.concatenate([p.scores for p in kept]),
            "boxes": np.concatenate([p.boxes for p in kept]), "labels": [l for p in kept for l in p.labels]}


def test_track_with_sam3_equals_its_parts(checkpoint, frames, detections, tmp_path):
    pipeline = LangSAM(model="sam3", sam3_checkpoint=checkpoint, device="cpu")
    result = pipeline.track(frames, QUERIES, detect_every=NUM_FRAMES, box_threshold=detections["threshold"])
    tracked = list(result)
    assert [frame.frame_index for frame in tracked] == list(range(NUM_FRAMES))
    tracks = result.tracks
    assert tracks and result.detection_frames == [0]
    # Each object is a frame-0 detection (same label, its score), and none is found twice.
    boxes = {}
    for obj_id, track in tracks.items():
        row = int(np.flatnonzero(detections["scores"] == np.float32(track.score))[0])
        assert detections["labels"][row] == track.label and track.started_at == 0
        boxes[obj_id] = clip_boxes(detections["boxes"][row:row + 1], (HEIGHT, WIDTH))[0]
    assert len(set(map(tuple, boxes.values()))) == len(boxes)
    # The same objects, prompted by hand on SAM 3's tracker from the same file, give the same masks.
    reference = SamVideoPredictor.from_sam3(checkpoint)
    state = reference.init_state(frames)
    for obj_id in sorted(boxes):
        reference.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, box=boxes[obj_id])
    for frame, (frame_idx, obj_ids, logits) in zip(tracked, reference.propagate_in_video(state)):
        assert frame.frame_index == frame_idx and list(frame.obj_ids) <= list(obj_ids)
        assert len(frame) > 0
        for obj_id in frame.obj_ids:
            expected = (logits[obj_ids.index(obj_id), 0] > 0).numpy()
            np.testing.assert_array_equal(frame.mask_of(obj_id), expected)
            assert 0.0 < expected.mean() < 1.0
    # The tracker runs on the concept model's ViT: one copy of the weights.
    video_predictor = pipeline.sam3_video_predictor()
    assert video_predictor.model.image_encoder.trunk is pipeline.sam3_predictor.model.backbone.vision_backbone.trunk
    # Outputs as with SAM 2.1: YouTube-VIS JSON with the ids and labels.
    result.save(tmp_path / "out", {"json"})
    record = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert sorted(a["id"] for a in record["annotations"]) == sorted(tracks)


def test_track_sam3_needs_the_tracker_weights(tmp_path, frames):
    from sam3_factory import save_tiny_sam3

    saved = save_tiny_sam3(tmp_path)  # SAM 3's image model only
    pipeline = LangSAM(model="sam3", sam3_checkpoint=saved["meta"], device="cpu")
    with pytest.raises(ValueError, match="without the video tracker"):
        pipeline.track(frames, QUERIES)
    with pytest.raises(ValueError, match="pass sam3_checkpoint"):
        LangSAM(model="sam3", sam3_model=load_sam3(saved["meta"]), device="cpu").track(frames, QUERIES)
    assert torch.get_num_threads() == 1


def test_cli_track_model_sam3_writes_what_the_pipeline_tracks(checkpoint, frames, detections, tmp_path, capsys):
    from video_support import write_frame_folder

    from langsam import cli

    folder = write_frame_folder(frames, tmp_path / "clip", ext="png")  # lossless: the same pixels
    threshold = f"{detections['threshold']:.6f}"
    argv = ["track", str(folder), "--text", QUERIES[0], "--text", QUERIES[1], "--model", "sam3",
            "--sam3-checkpoint", str(checkpoint), "--detect-every", str(NUM_FRAMES), "--box-threshold", threshold,
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    written = json.loads((tmp_path / "out" / "clip" / "tracks.json").read_text())
    pipeline = LangSAM(model="sam3", sam3_checkpoint=checkpoint, device="cpu")
    result = pipeline.track(folder, QUERIES, detect_every=NUM_FRAMES, box_threshold=float(threshold))
    result.save(tmp_path / "direct", {"json"})
    expected = json.loads((tmp_path / "direct" / "tracks.json").read_text())
    assert written["annotations"] and written["annotations"] == expected["annotations"]
    assert written["info"]["run"]["box_threshold"] == float(threshold)


def test_cli_track_model_sam3_without_tracker_weights_stops(tmp_path, frames, capsys):
    from sam3_factory import save_tiny_sam3
    from video_support import write_frame_folder

    from langsam import cli

    saved = save_tiny_sam3(tmp_path / "image_only")
    folder = write_frame_folder(frames[:2], tmp_path / "clip", ext="png")
    argv = ["track", str(folder), "--text", "a cat", "--model", "sam3", "--sam3-checkpoint", str(saved["meta"]),
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]
    assert cli.main(argv) != 0
    assert "without the video tracker" in capsys.readouterr().err


def test_demo_video_tab_tracks_with_sam3(checkpoint, frames, detections, tmp_path):
    from video_support import write_mp4

    from langsam.demo.video_tab import track_clip, track_rows

    clip = write_mp4(frames, tmp_path / "clip.mp4")
    pipeline = LangSAM(sam3_checkpoint=checkpoint, device="cpu")  # Grounding DINO by default; SAM 3 per call
    video, paths = track_clip(pipeline, str(clip), QUERIES, tmp_path / "out", detect_every=NUM_FRAMES,
                              box_threshold=detections["threshold"], model="sam3")
    direct = pipeline.track(str(clip), QUERIES, detect_every=NUM_FRAMES, box_threshold=detections["threshold"],
                            model="sam3")
    direct.save(tmp_path / "direct", {"json"})
    written = json.loads(paths["json"].read_text())
    assert written["annotations"] == json.loads((tmp_path / "direct" / "tracks.json").read_text())["annotations"]
    assert [row[0] for row in track_rows(video)] == sorted(video.tracks) and video.tracks
    assert paths["overlay"].stat().st_size > 0


def test_track_with_sam3_association_is_sam3_video_inference(checkpoint, frames, detections, tmp_path):
    """association="sam3" (CLI --sam3-association): SAM 3's own video inference, the same frames,
    ids (+1: 0 is the id maps' background), masks and labels as Sam3ConceptVideoPredictor run by hand
    on the same file; written in the usual layout."""
    from sam.video.concept import Sam3ConceptVideoPredictor
    from video_support import write_frame_folder

    from langsam import cli

    threshold = float(f"{detections['threshold']:.6f}")
    pipeline = LangSAM(model="sam3", sam3_checkpoint=checkpoint, device="cpu")
    result = pipeline.track(frames, QUERIES, association="sam3", box_threshold=threshold)
    tracked = list(result)
    by_hand = Sam3ConceptVideoPredictor.from_checkpoint(checkpoint, score_threshold_detection=threshold)
    state = by_hand.init_state(frames)
    for query in QUERIES:
        by_hand.add_text_prompt(state, query)
    expected = list(by_hand.propagate_in_video(state))
    assert [frame.frame_index for frame in tracked] == list(range(NUM_FRAMES)) == result.detection_frames
    assert any(len(frame) for frame in tracked)
    for ours, theirs in zip(tracked, expected):
        assert list(ours.obj_ids) == [obj_id + 1 for obj_id in theirs.obj_ids]
        np.testing.assert_array_equal(ours.masks, theirs.masks.numpy())
        assert ours.labels == theirs.labels and set(ours.labels) <= set(QUERIES)
    assert result.settings["association"] == "sam3" and result.settings["score_threshold_detection"] == threshold
    with pytest.raises(ValueError, match="needs model='sam3'"):
        LangSAM(sam3_checkpoint=checkpoint, device="cpu").track(frames, QUERIES, association="sam3")

    folder = write_frame_folder(frames, tmp_path / "clip", ext="png")
    argv = ["track", str(folder), "--text", QUERIES[0], "--text", QUERIES[1], "--model", "sam3", "--sam3-association",
            "--sam3-checkpoint", str(checkpoint), "--box-threshold", str(threshold), "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    written = json.loads((tmp_path / "out" / "clip" / "tracks.json").read_text())
    assert sorted(a["id"] for a in written["annotations"]) == sorted(result.tracks)
    assert written["info"]["run"]["association"] == "sam3"
