"""Tracking metrics (`langsam.video.metrics`, `langsam eval --video`) on a clip with known masks.

Every expected value is worked by hand from the clip's construction (tests/vis_clip.py: two
objects cut from real photos moving over a real photo, one passing in front of the other):
a perfect tracker, a track whose id changes halfway, a missing half, a shifted square, and
detections ranked right or wrong for AP.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from vis_clip import moving_objects_clip, results_from_masks, split_track

from langsam.video.metrics import (
    VideoEvaluationError,
    boundary_f_measure,
    evaluate_video,
    evaluated_frames,
    region_similarity,
)


@pytest.fixture(scope="module")
def clip():
    frames, masks, ground_truth = moving_objects_clip()
    for stack in masks.values():  # the clip is not trivial: objects visible, occlusion happens
        assert stack.any(axis=(1, 2)).all() and not stack.all(axis=(1, 2)).any()
    assert masks[1].sum(axis=(1, 2)).min() < masks[1].sum(axis=(1, 2)).max()
    return frames, masks, ground_truth


def test_a_perfect_tracker_scores_one_everywhere(clip):
    _, masks, ground_truth = clip
    report = evaluate_video(ground_truth, results_from_masks(masks, {1: 1, 2: 2}))
    assert report["jf"]["J&F"] == report["jf"]["J"] == report["jf"]["F"] == 1.0
    overall = report["identity"]["overall"]
    assert overall["idf1"] == 1.0 and overall["mota"] == 1.0
    assert overall["num_switches"] == overall["num_fragmentations"] == 0
    assert overall["num_objects"] == overall["num_predictions"] == 16  # 2 objects x 8 frames, all visible
    assert [report["ap"][k] for k in ("ap", "ap50", "ap75")] == pytest.approx([1.0, 1.0, 1.0])


def test_an_id_change_halfway_is_exactly_one_switch(clip):
    _, masks, ground_truth = clip
    first, rest = split_track(masks[1], 4)
    results = results_from_masks({1: first, 7: rest, 2: masks[2]}, {1: 1, 7: 1, 2: 2})
    identity = evaluate_video(ground_truth, results, metrics=("identity",))["identity"]["overall"]
    assert identity["num_switches"] == 1
    # Best one-to-one identity match: gt1-pred1 (4 frames), gt2-pred2 (8); pred7's 4 frames are
    # unmatched: IDTP 12, IDFN 4, IDFP 4 -> IDF1 = 24 / (24 + 8) = 0.75.
    assert identity["idf1"] == pytest.approx(0.75)
    assert identity["mota"] == pytest.approx(1 - 1 / 16)  # no miss, no false positive, one switch
    # Prompted tracking matches by id: object 1 is lost after frame 3. DAVIS scores frames 1..6:
    # 1, 2, 3 perfect, 4, 5, 6 empty -> J = F = 0.5 for object 1, 1.0 for object 2.
    jf = evaluate_video(ground_truth, results, metrics=("jf",))["jf"]
    assert evaluated_frames(8) == [1, 2, 3, 4, 5, 6]
    assert jf["per_object"]["clip.mp4/1"]["J"] == pytest.approx(0.5)
    assert jf["per_object"]["clip.mp4/1"]["F"] == pytest.approx(0.5)
    assert jf["J&F"] == pytest.approx(0.75)


def test_region_and_boundary_measures_match_a_hand_worked_square():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True                       # 4x4 square: 16 pixels, 12 on its boundary
    pred = np.zeros_like(gt)
    pred[2:6, 3:7] = True                     # shifted one column right
    assert region_similarity(gt, pred) == pytest.approx(12 / 20)
    # Exact boundaries: the top and bottom rows share 3 pixels each -> P = R = 6/12, F = 0.5.
    assert boundary_f_measure(gt, pred, tolerance=0) == pytest.approx(0.5)
    # Within 1 pixel every boundary pixel has a partner.
    assert boundary_f_measure(gt, pred, tolerance=1) == pytest.approx(1.0)
    # DAVIS' default tolerance on a 10x10 image: ceil(0.008 x 14.1) = 1 pixel.
    assert boundary_f_measure(gt, pred) == pytest.approx(1.0)
    empty = np.zeros_like(gt)
    assert region_similarity(empty, empty) == 1.0 and boundary_f_measure(empty, empty) == 1.0
    assert region_similarity(gt, empty) == 0.0 and boundary_f_measure(gt, empty) == 0.0


def test_video_ap_ranks_detections_by_score_and_uses_the_iou_over_the_video(clip):
    _, masks, ground_truth = clip
    wrong = np.roll(masks[2], 40, axis=2) & ~masks[2]  # the face's shape where no face is
    assert wrong.any(axis=(1, 2)).all()
    right_first = results_from_masks({1: masks[1], 2: masks[2], 3: wrong}, {1: 1, 2: 2, 3: 2},
                                     scores={1: 0.9, 2: 0.9, 3: 0.8})
    assert evaluate_video(ground_truth, right_first, metrics=("ap",))["ap"]["ap"] == pytest.approx(1.0)
    # The wrong one ranked first: for the face, precision is 1/2 at every recall -> AP 0.5; the cat 1.0.
    wrong_first = results_from_masks({1: masks[1], 2: masks[2], 3: wrong}, {1: 1, 2: 2, 3: 2},
                                     scores={1: 0.9, 2: 0.7, 3: 0.8})
    assert evaluate_video(ground_truth, wrong_first, metrics=("ap",))["ap"]["ap"] == pytest.approx(0.75)
    # Half the frames missing: video IoU = (visible frames' area) / (all frames' area).
    first, _ = split_track(masks[1], 4)
    iou = masks[1][:4].sum() / masks[1].sum()
    assert 0.55 < iou < 0.6  # of the IoU thresholds 0.50:0.05:0.95 only 0.50 and 0.55 pass: AP 2/10 for the cat
    half = results_from_masks({1: first, 2: masks[2]}, {1: 1, 2: 2})
    ap = evaluate_video(ground_truth, half, metrics=("ap",))["ap"]
    assert ap["ap"] == pytest.approx((0.2 + 1.0) / 2)
    assert ap["ap50"] == pytest.approx(1.0) and ap["ap75"] == pytest.approx(0.5)


def test_bad_inputs_get_clear_errors(clip, tmp_path):
    _, masks, ground_truth = clip
    good = results_from_masks(masks, {1: 1, 2: 2})
    with pytest.raises(VideoEvaluationError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        evaluate_video(tmp_path / "bad.json", good)
    with pytest.raises(VideoEvaluationError, match="cannot read"):
        evaluate_video(tmp_path / "missing.json", good)
    resized = results_from_masks({k: v[:, :, :80] for k, v in masks.items()}, {1: 1, 2: 2})
    with pytest.raises(VideoEvaluationError, match="72x80"):
        evaluate_video(ground_truth, resized)
    changing = json.loads(json.dumps(good))
    small = results_from_masks({1: masks[1][:, :40, :40]}, {1: 1})["annotations"][0]["segmentations"][3]
    changing["annotations"][0]["segmentations"][3] = small
    with pytest.raises(VideoEvaluationError, match="change size"):
        evaluate_video(ground_truth, changing)
    other = json.loads(json.dumps(good))
    other["videos"][0].update(file_name="other.mp4", id=5)
    for annotation in other["annotations"]:
        annotation["video_id"] = 5
    with pytest.raises(VideoEvaluationError, match="no result for video 'clip.mp4'"):
        evaluate_video(ground_truth, other)
    with pytest.raises(VideoEvaluationError, match="metrics must be"):
        evaluate_video(ground_truth, good, metrics=("hota",))


@pytest.mark.usefixtures("one_torch_thread")
def test_langsam_eval_video_scores_what_langsam_track_wrote(clip, tmp_path, monkeypatch, capsys):
    """The whole loop a user runs: `langsam track` on the clip (tiny random models), then
    `langsam eval GT --video video.json`. The CLI's report equals the Python API's on the same
    files, and the identity counts equal what the files hold."""
    from tiny_gdino import save_tiny_grounding_dino
    from video_support import make_video_sam2, write_mp4

    from langsam import cli
    from langsam.cli import track
    from langsam.pipeline import LangSAM

    frames, _, ground_truth = clip
    write_mp4(list(frames), tmp_path / "clip.mp4")
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    gdino = save_tiny_grounding_dino(tmp_path / "gdino", logit_scale=0.1, num_queries=2)
    model = make_video_sam2(128)
    monkeypatch.setattr(track, "load_pipeline",
                        lambda args, mode: LangSAM(sam_model=model, detector=str(gdino), device="cpu"))
    assert cli.main(["track", str(tmp_path / "clip.mp4"), "--text", "a cat", "--text", "a face", "-o", str(tmp_path / "out"),
                     "--detect-every", "3", "--box-threshold", "0", "--device", "cpu", "--save", "json"]) == 0
    written = next((tmp_path / "out").rglob("*.json"))
    results = json.loads(written.read_text())
    visible = sum(1 for a in results["annotations"] for rle in a["segmentations"]
                  if rle is not None and decode_area(rle) > 0)
    assert visible > 0  # the tracker found something: the scores below are not of an empty run
    report_path = tmp_path / "report.json"
    assert cli.main(["eval", str(tmp_path / "gt.json"), "--video", str(written), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    expected = json.loads(json.dumps(evaluate_video(ground_truth, results)))  # JSON keeps floats exactly
    assert {k: report[k] for k in ("jf", "identity", "ap")} == {k: expected[k] for k in ("jf", "identity", "ap")}
    assert report["identity"]["overall"]["num_predictions"] == visible
    assert report["identity"]["overall"]["num_objects"] == 16
    assert "J&F" in capsys.readouterr().out
    # A results file for another clip is refused with the reason, exit 1.
    results["videos"][0]["file_name"] = "other.mp4"
    (tmp_path / "other.json").write_text(json.dumps(results))
    assert cli.main(["eval", str(tmp_path / "gt.json"), "--video", str(tmp_path / "other.json"),
                     "--report", str(tmp_path / "r2.json")]) == 1
    assert "no result for video 'clip.mp4'" in capsys.readouterr().err
    assert not (tmp_path / "r2.json").exists()


def decode_area(rle) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))


@pytest.mark.usefixtures("one_torch_thread")
def test_langsam_eval_track_runs_prompted_tracking_from_the_labels(clip, tmp_path, monkeypatch, capsys):
    """`langsam eval GT --track clip.mp4`: SAM 2.1's video predictor (tiny, random) prompted
    with each labelled object's first mask. On the prompt frame the predictor returns the
    prompt itself, so J there is high for each object under its own id (a swapped or dropped
    id would score ~0); the saved tracks and the report agree with the Python API."""
    from video_support import make_video_sam2, write_mp4

    from langsam import cli
    from langsam.cli import options
    from langsam.pipeline import LangSAM
    from langsam.video.metrics import load_vis

    frames, masks, ground_truth = clip
    write_mp4(list(frames), tmp_path / "clip.mp4")
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    model = make_video_sam2(128)
    monkeypatch.setattr(options, "load_pipeline", lambda args, mode: LangSAM(sam_model=model, device="cpu"))
    report_path = tmp_path / "prompted.json"
    assert cli.main(["eval", str(tmp_path / "gt.json"), "--track", str(tmp_path / "clip.mp4"), "--quiet",
                     "--report", str(report_path)]) == 0
    tracks = json.loads((tmp_path / "prompted_tracks.json").read_text())
    tracked = load_vis(tracks, what="tracks")[1]
    for obj_id in (1, 2):
        assert region_similarity(masks[obj_id][0], tracked.mask(obj_id, 0)) > 0.8
    later = [tracked.mask(obj_id, t).mean() for obj_id in (1, 2) for t in range(1, 8)]
    assert 0 < np.mean(later) < 1  # tracked frames are neither all empty nor all full
    report = json.loads(report_path.read_text())
    assert report["jf"] == json.loads(json.dumps(evaluate_video(ground_truth, tracks, metrics=("jf",))["jf"]))
    assert set(report) >= {"jf"} and "identity" not in report
    # A video the labels do not name is refused before any model loads.
    (tmp_path / "other.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes())
    assert cli.main(["eval", str(tmp_path / "gt.json"), "--track", str(tmp_path / "other.mp4"),
                     "--report", str(tmp_path / "r3.json")]) == 1
    assert "no video of that name" in capsys.readouterr().err
