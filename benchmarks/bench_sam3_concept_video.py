"""SAM 3 video concept inference: ours (sam.video.concept.Sam3ConceptVideoPredictor) against
transformers' Sam3VideoModel + Sam3VideoProcessor, then the two trackers of `LangSAM.track` side by
side on a clip with ground truth.

    python benchmarks/bench_sam3_concept_video.py [--frames 6] [--repeats 3] [--threads 1] [--cpu-time]
                                                  [--size tiny|wide] [--track-frames 8] [--skip-track]

1. Speed and parity. The same random weights (tests/sam3_concept_support.py: every parameter
   redrawn, `spread_queries` so detections differ) and the same clip (tests/vis_clip.py: two real
   photos moving over a real background), the same pixels and text tokens on both sides, driven as
   tests/test_sam3_concept_video.py drives them: a whole-clip session, `propagate_in_video_iterator`
   and `postprocess_outputs` per frame for transformers; init_state, add_text_prompt and
   propagate_in_video for ours. The settings are the test's strict thresholds (several objects live
   through the clip, more start on frame 1), with the last one-object-per-pixel step off on both
   sides (its winner is decided by tracker scores ~1e-5 apart, below float noise) and mask NMS and
   hole filling off (transformers skips both without its CUDA kernels); --released: the released
   thresholds instead (frame 0's detections start objects, the hot-start rule removes duplicates). Each run is checked: the
   same frames, the same object ids per frame, every mask at IoU >= 0.99. The two sides alternate
   after a warm-up; prints the median seconds per frame of each and the median ratio.
   --size tiny: the test's model (168 px, 32-wide ViT, 128-wide heads). --size wide: the released
   detector and tracker (transformers' default Sam3 / Sam3TrackerVideo configs: 256 wide, 200
   queries, 6 + 6 DETR layers, 4 memory-attention layers) on a 2-block 256-wide ViT at 504 px and a
   2-layer text encoder; the ViT and the text encoder are the same modules on both sides.

2. Tracking metrics. `LangSAM.track` on the vis_clip clip ("a cat", "a face"): the default tracker
   (tiny Grounding DINO every --detect-every frames + tiny SAM 2.1, built as tests/test_track.py
   builds them) against SAM 3's own video inference (model="sam3", association="sam3", the tiny SAM
   3 of part 1 at its released association settings). Each writes tracks.json with
   `TrackedVideo.save` (timed: the tracking happens there), scored by
   `langsam.video.metrics.evaluate_video` against the clip's ground truth: J&F, IDF1, ID switches,
   video mask AP. The weights are random, so the metrics are low; the point is that the tool
   reports them side by side.

On a shared, loaded machine use --threads 1 --cpu-time (this process's CPU seconds instead of wall
time, so other workers' load changes little): with 2 threads both sides ran 10-25x slower and the
ratio swung between runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TEXT = "a cat"
TRACK_QUERIES = ["a cat", "a face"]  # the ground truth's categories 1 and 2
HEIGHT, WIDTH = 72, 96
STRICT = dict(score_threshold_detection=0.8, assoc_iou_thresh=0.7, trk_assoc_iou_thresh=0.8, new_det_thresh=0.9,
              recondition_every_nth_frame=2, high_iou_thresh=0.5)
UNCHECKED = dict(fill_hole_area=0, det_nms_thresh=0.0)  # what transformers does on CPU, offline


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def wide_config():
    """The released detector and tracker heads on a cut-down ViT (2 blocks, 256 wide, 504 px)."""
    from sam3_factory import TINY_CONFIG
    from transformers import Sam3Config, Sam3TrackerVideoConfig, Sam3VideoConfig

    image_size, patch, grid = 504, 14, 36
    backbone = dict(model_type="sam3_vit_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                    num_attention_heads=4, image_size=image_size, patch_size=patch, window_size=24,
                    global_attn_indexes=[1], pretrain_image_size=336)
    vision = dict(backbone_config=backbone, fpn_hidden_size=256,
                  backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2])
    text = copy.deepcopy(TINY_CONFIG["text_config"])
    detector = Sam3Config(vision_config=vision, text_config=text)
    tracker = Sam3TrackerVideoConfig(vision_config=dict(model_type="sam3_vision_model", **vision),
                                     prompt_encoder_config=dict(image_size=image_size, patch_size=patch),
                                     image_size=image_size)
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid, **UNCHECKED)


def build_model(size: str, frames: np.ndarray, workdir: Path) -> tuple[Path, object, int]:
    """(save_pretrained directory, the transformers model, input side) at `size`."""
    from sam3_concept_support import IMAGE_SIZE, reference_pixels, tiny_video_model

    from sam.sam3.text import tokenize

    image_size = IMAGE_SIZE if size == "tiny" else 504
    calibration = (reference_pixels(frames, image_size), tokenize([TEXT]))
    config = None if size == "tiny" else wide_config()
    model = tiny_video_model(0, calibration, config=config, **({} if config is not None else UNCHECKED))
    directory = workdir / f"sam3_video_{size}"
    model.save_pretrained(directory)
    return directory, model, image_size


def run_ours(predictor, frames: np.ndarray) -> list:
    state = predictor.init_state(frames)
    predictor.add_text_prompt(state, TEXT)
    return list(predictor.propagate_in_video(state))


def run_theirs(model, frames: np.ndarray, image_size: int) -> list[dict]:
    from sam3_concept_support import Reference

    reference = Reference(model, frames, image_size)
    reference.add_text(TEXT)
    return reference.propagate(non_overlap=False)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def check_parity(theirs: list[dict], ours: list) -> tuple[int, float]:
    """(objects on the last frame, the lowest mask IoU); raises where the runs differ."""
    if [f["frame_idx"] for f in theirs] != [f.frame_idx for f in ours]:
        raise AssertionError("the two sides yielded different frames")
    lowest = 1.0
    for their, our in zip(theirs, ours):
        if their["obj_ids"] != our.obj_ids:
            raise AssertionError(f"frame {our.frame_idx}: ids {our.obj_ids} vs transformers' {their['obj_ids']}")
        for index in range(len(our.obj_ids)):
            lowest = min(lowest, mask_iou(their["masks"][index].bool(), our.masks[index]))
    if lowest < 0.99:
        raise AssertionError(f"a mask differs from transformers' (IoU {lowest:.4f} < 0.99)")
    return len(ours[-1].obj_ids), lowest


def bench_parity(args, workdir: Path) -> None:
    from vis_clip import moving_objects_clip

    from sam.video.concept import ConceptTrackingConfig, Sam3ConceptVideoPredictor

    frames = moving_objects_clip(args.frames, HEIGHT, WIDTH)[0]
    directory, model, image_size = build_model(args.size, frames, workdir)
    settings = {} if args.released else STRICT
    for name, value in {**ConceptTrackingConfig(**UNCHECKED).__dict__, **settings}.items():
        setattr(model, name, value)  # Sam3VideoModel reads its settings from attributes
    predictor = Sam3ConceptVideoPredictor.from_checkpoint(directory, non_overlap_masks=False, **settings)
    ours_s, theirs_s = [], []
    with torch.inference_mode():
        objects, lowest = check_parity(run_theirs(model, frames, image_size), run_ours(predictor, frames))  # warm-up
        for _ in range(args.repeats):
            start = CLOCK()
            theirs = run_theirs(model, frames, image_size)
            theirs_s.append(CLOCK() - start)
            start = CLOCK()
            ours = run_ours(predictor, frames)
            ours_s.append(CLOCK() - start)
            objects, worst = check_parity(theirs, ours)
            lowest = min(lowest, worst)
    ratios = [o / t for o, t in zip(ours_s, theirs_s)]
    print(f"[1] concept video, --size {args.size} ({image_size} px), {args.frames} frames {WIDTH}x{HEIGHT}, "
          f"{'released' if args.released else 'strict'} thresholds, {objects} objects on the last frame, "
          f"{args.repeats} repeats, threads {torch.get_num_threads()}, "
          f"{'CPU' if CLOCK is time.process_time else 'wall'} seconds")
    print(f"    parity: same ids on every frame, lowest mask IoU {lowest:.4f}")
    print(f"    transformers Sam3VideoModel: median {statistics.median(theirs_s) / args.frames:.3f} s/frame")
    print(f"    ours Sam3ConceptVideoPredictor: median {statistics.median(ours_s) / args.frames:.3f} s/frame")
    print(f"    ratio ours / transformers: {statistics.median(ratios):.2f}x (target <= 0.75x)")


def number(value) -> str:
    """A metric in six columns; undefined ones (no detections, no matches) as "-"."""
    return f"{value:6.3f}" if value is not None else f"{'-':>6s}"


def track_and_score(pipeline, frames, ground_truth, out: Path, **track_kwargs) -> tuple[float, dict]:
    from langsam.video.metrics import evaluate_video

    video = pipeline.track(frames, TRACK_QUERIES, **track_kwargs)
    start = time.perf_counter()
    paths = video.save(out, {"json"}, source_name=ground_truth["videos"][0]["file_name"])
    seconds = time.perf_counter() - start
    return seconds / len(frames), evaluate_video(ground_truth, paths["json"])


def bench_trackers(args, workdir: Path) -> None:
    from sam3_concept_support import reference_pixels, save_tiny_video_model
    from tiny_gdino import save_tiny_grounding_dino
    from video_support import make_video_sam2
    from vis_clip import moving_objects_clip

    from langsam.pipeline import LangSAM
    from sam.sam3.text import tokenize

    frames, _, ground_truth = moving_objects_clip(args.track_frames, HEIGHT, WIDTH)
    gdino = save_tiny_grounding_dino(workdir / "gdino", logit_scale=0.1, num_queries=2)
    default = LangSAM(sam_model=make_video_sam2(args.sam2_size), detector=str(gdino), device="cpu")
    sam3_dir = save_tiny_video_model(workdir / "track_sam3", calibration=(reference_pixels(frames), tokenize([TEXT])),
                                     **UNCHECKED)["transformers"]
    sam3 = LangSAM(model="sam3", sam3_checkpoint=str(sam3_dir), device="cpu")
    rows = []
    for name, pipeline, kwargs in (
            (f"default (GDINO every {args.detect_every} + SAM 2.1)", default,
             dict(detect_every=args.detect_every, box_threshold=0.0)),
            ("SAM 3 video (association=sam3)", sam3, dict(model="sam3", association="sam3"))):
        track_and_score(pipeline, frames, ground_truth, workdir / "warm", **kwargs)  # warm-up
        seconds, report = track_and_score(pipeline, frames, ground_truth, workdir / name.split()[0], **kwargs)
        rows.append((name, seconds, report))
    print(f"[2] LangSAM.track on vis_clip ({args.track_frames} frames {WIDTH}x{HEIGHT}, {TRACK_QUERIES}), "
          f"threads {torch.get_num_threads()}; random weights, so the metrics are low: the point is that "
          f"they are reported side by side")
    print(f"    {'tracker':44s} {'s/frame':>8s} {'objects':>7s} {'J&F':>6s} {'IDF1':>6s} {'ID sw':>5s} {'AP':>6s}")
    for name, seconds, report in rows:
        identity = report["identity"]["overall"]
        objects = len(json.loads((workdir / name.split()[0] / "tracks.json").read_text())["annotations"])
        print(f"    {name:44s} {seconds:8.3f} {objects:7d} {number(report['jf']['J&F'])} {number(identity['idf1'])} "
              f"{identity['num_switches']:5d} {number(report['ap']['ap'])}")
    if args.report:
        Path(args.report).write_text(json.dumps({name: dict(s_per_frame=s, **report) for name, s, report in rows},
                                                indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=6, help="clip length for part 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--released", action="store_true",
                        help="part 1 at the released association thresholds instead of the test's strict ones")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--track-frames", type=int, default=8, help="clip length for part 2")
    parser.add_argument("--detect-every", type=int, default=4)
    parser.add_argument("--sam2-size", type=int, default=256, help="SAM 2.1 input side in part 2")
    parser.add_argument("--cpu-time", action="store_true",
                        help="part 1 in this process's CPU seconds (time.process_time) instead of wall time")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-track", action="store_true")
    parser.add_argument("--report", default=None, help="write part 2's full evaluate_video reports here (JSON)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as workdir:
        if not args.skip_parity:
            bench_parity(args, Path(workdir))
        if not args.skip_track:
            bench_trackers(args, Path(workdir))


if __name__ == "__main__":
    main()
