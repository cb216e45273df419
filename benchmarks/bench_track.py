"""Text-prompted tracking (`langsam.video.track_video`) against the video predictor alone.

    python benchmarks/bench_track.py [--frames 40] [--detect-every 10] [--repeats 3] [--threads N]
    python benchmarks/bench_track.py --memory [--frames 30]     # peak RSS: frames vs 10 x frames

Time: the whole tracker (decoding, Grounding DINO every N frames, new-object checks, lost-object
bookkeeping, building each frame's Segmentation) against `SamVideoPredictor` driven by hand with
the same box prompts on the same frames -- the floor any text tracker on this predictor pays.
Measured alternately after a warm-up; prints the median ratio and the detector's share.

Memory: peak RSS of a fresh process tracking an MP4 of `--frames` frames and writing the JSON and
the overlay, against one of 10 x `--frames` frames (the result is lazy and the predictor keeps a
window of memory, so the difference should be the JSON's RLE strings, not frames or masks).

Models are the tests' tiny random SAM 2.1 (hiera-tiny layout, `--image-size` input) and tiny
Grounding DINO, so timings show overheads, not the released models' speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

QUERIES = ["a cat", "a sofa"]


def build(image_size: int, workdir: Path):
    from tiny_gdino import save_tiny_grounding_dino
    from video_support import make_video_sam2

    from langsam.pipeline import LangSAM

    gdino = save_tiny_grounding_dino(workdir / "gdino", logit_scale=0.1, num_queries=3)
    return LangSAM(sam_model=make_video_sam2(image_size), detector=str(gdino), device="cpu")


class Recorder:
    """Forwards to the real predictor; records box prompts and removals in order."""

    def __init__(self, predictor):
        self.predictor, self.log = predictor, []

    def add_new_points_or_box(self, state, frame_idx, obj_id, **kwargs):
        self.log.append(("add", frame_idx, obj_id, kwargs["box"]))
        return self.predictor.add_new_points_or_box(state, frame_idx, obj_id, **kwargs)

    def remove_object(self, state, obj_id):
        self.log.append(("remove", obj_id))
        return self.predictor.remove_object(state, obj_id)

    def __getattr__(self, name):
        return getattr(self.predictor, name)


def time_tracker(pipeline, clip, detect_every: int) -> tuple[float, float, list]:
    from sam.video import SamVideoPredictor

    from langsam.video import track_video

    recorder = Recorder(SamVideoPredictor(pipeline.predictor.model))
    detector = pipeline.detector
    detect, spent = detector.detect, []

    def timed_detect(*args, **kwargs):
        start = time.perf_counter()
        try:
            return detect(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    detector.detect = timed_detect
    try:
        start = time.perf_counter()
        for _ in track_video(pipeline, clip, QUERIES, detect_every=detect_every, box_threshold=0.0,
                             video_predictor=recorder):
            pass
        total = time.perf_counter() - start
    finally:
        del detector.detect
    return total, sum(spent), recorder.log


def time_predictor_alone(pipeline, clip, log) -> float:
    """The same prompts, removals excluded (withdrawn trials never track), replayed by hand."""
    from sam.video import SamVideoPredictor, open_frames

    predictor = SamVideoPredictor(pipeline.predictor.model)
    standing = {}
    for entry in log:
        if entry[0] == "add":
            standing[entry[2]] = entry
        else:
            standing.pop(entry[1], None)
    by_frame: dict[int, list] = {}
    for _, frame_idx, obj_id, box in standing.values():
        by_frame.setdefault(frame_idx, []).append((obj_id, box))
    start = time.perf_counter()
    state = predictor.init_state(open_frames(clip), keep_memory="window")
    first = min(by_frame)
    for obj_id, box in by_frame.pop(first):
        predictor.add_new_points_or_box(state, first, obj_id, box=box)
    for frame_idx, _, _ in predictor.propagate_in_video(state, start_frame_idx=first):
        for obj_id, box in by_frame.pop(frame_idx, []) if frame_idx != first else []:
            predictor.add_new_points_or_box(state, frame_idx, obj_id, box=box)
    return time.perf_counter() - start


def memory_child(args) -> None:
    """Track an MP4 of args.child_frames frames, write JSON + overlay; print peak RSS (MiB)."""
    from video_support import iter_clip, write_mp4

    from langsam.video import track_video

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        path = write_mp4(iter_clip(args.child_frames, 240, 320), workdir / "clip.mp4", fps=30)
        pipeline = build(args.image_size, workdir)
        video = track_video(pipeline, path, QUERIES, detect_every=args.detect_every, box_threshold=0.0)
        video.save(workdir / "out", ("json", "overlay"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"frames": args.child_frames, "peak_mib": peak, "objects": len(video.tracks)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--detect-every", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=256, help="SAM 2.1 input side (model-input pixels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="compare peak RSS of frames vs 10 x frames")
    parser.add_argument("--child-frames", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_frames is not None:
        memory_child(args)
        return
    if args.memory:
        results = []
        for frames in (args.frames, 10 * args.frames):
            command = [sys.executable, __file__, "--child-frames", str(frames), "--image-size", str(args.image_size),
                       "--detect-every", str(args.detect_every)] + (["--threads", str(args.threads)] if args.threads else [])
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
        for result in results:
            print(f"{result['frames']:5d} frames: peak RSS {result['peak_mib']:.0f} MiB ({result['objects']} objects)")
        print(f"difference: {results[1]['peak_mib'] - results[0]['peak_mib']:+.0f} MiB for "
              f"{results[1]['frames'] - results[0]['frames']} more frames")
        return

    from video_support import make_clip

    with tempfile.TemporaryDirectory() as workdir:
        pipeline = build(args.image_size, Path(workdir))
        clip = make_clip(args.frames, 240, 320)
        _, _, log = time_tracker(pipeline, clip, args.detect_every)  # warm-up
        time_predictor_alone(pipeline, clip, log)
        ours, alone, detector_share = [], [], []
        for _ in range(args.repeats):
            total, detecting, log = time_tracker(pipeline, clip, args.detect_every)
            ours.append(total)
            detector_share.append(detecting / total)
            alone.append(time_predictor_alone(pipeline, clip, log))
    standing: set[int] = set()
    for entry in log:
        standing.add(entry[2]) if entry[0] == "add" else standing.discard(entry[1])
    objects = len(standing)
    ratios = [o / a for o, a in zip(ours, alone)]
    print(f"{args.frames} frames 320x240, detect every {args.detect_every}, SAM input {args.image_size}, "
          f"{objects} objects, threads {torch.get_num_threads()}")
    print(f"predictor alone: median {statistics.median(alone) / args.frames * 1000:.1f} ms/frame")
    print(f"track_video:     median {statistics.median(ours) / args.frames * 1000:.1f} ms/frame "
          f"(detector {statistics.median(detector_share):.0%} of it)")
    print(f"ratio track_video / predictor alone: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
