"""SAM 2.1 video tracking: ours (sam.video) vs Meta's SAM2VideoPredictor, same weights, same clip.

    python benchmarks/bench_video.py [--frames 4] [--repeats 2] [--threads N]
                                     [--memory-frames 300] [--memory-track 2] [--skip-memory]

1. Time per propagated frame, hiera-tiny at its real size (1024 input, random weights
   shared by both), one object clicked on frame 0 of a 640x480 clip panned over a real photo,
   then `--frames` frames tracked. Runs alternate (ours, reference, ...) after a warm-up of
   each; prints median seconds per frame, the ratio (target: ours <= 0.75x on CPU) and the
   masks' IoU (parity must hold while we are faster). On a shared machine wall time is
   noisy; process CPU time is printed too (with --threads 1 it measures the work itself). Both read the same JPEG folder; the
   reference's loading of every frame at init_state is timed apart from propagation, ours
   decodes each frame inside the loop (so it is counted against us).
2. Peak memory (VmHWM, the peak RSS of a fresh process per side) on a `--memory-frames` clip of
   640x480 frames: (a) the real-size model, init_state + click + `--memory-track` tracked
   frames (the reference holds every frame as a 1024x1024 float tensor); (b) the tiny test
   model at 128x128 input tracking all frames (ours with keep_memory="window"), to show
   growth with length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
MODEL_TYPE = "sam2.1_hiera_tiny"
CLICK = [[300, 220]]  # on the cat in the 640x480 clip


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def save_real_size_checkpoint(path: Path) -> Path:
    from sam_factory import randomize_parameters

    from sam import build_sam, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(randomize_parameters(build_sam(MODEL_TYPE), seed=0), path)


def time_propagation(checkpoint: Path, folder: Path, frames: int, repeats: int) -> None:
    from sam2.build_sam import build_sam2_video_predictor

    from sam import build_sam
    from sam.video import SamVideoPredictor

    ours = SamVideoPredictor(build_sam(MODEL_TYPE, checkpoint))
    reference = build_sam2_video_predictor(CONFIG, str(checkpoint), device="cpu")
    results: dict[str, list] = {"ours": [], "reference": []}

    def run(name: str) -> tuple[float, float, float, list[torch.Tensor]]:
        start = time.perf_counter()
        if name == "ours":
            state = ours.init_state(folder)
            ours.add_new_points_or_box(state, 0, 1, points=CLICK, labels=[1])
            loaded, loaded_cpu = time.perf_counter(), time.process_time()
            masks = [m for _, _, m in ours.propagate_in_video(state, max_frame_num_to_track=frames)]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = reference.init_state(str(folder))
                reference.add_new_points_or_box(state, 0, 1, points=CLICK, labels=[1])
                loaded, loaded_cpu = time.perf_counter(), time.process_time()
                masks = [m for _, _, m in reference.propagate_in_video(state, max_frame_num_to_track=frames)]
        done, done_cpu = time.perf_counter(), time.process_time()
        # Per tracked frame (the prompted frame is yielded from the bank); wall and CPU time.
        return loaded - start, (done - loaded) / frames, (done_cpu - loaded_cpu) / frames, masks

    with torch.inference_mode():
        for name in ("ours", "reference"):  # warm-up
            run(name)
        for _ in range(repeats):
            for name in ("ours", "reference"):
                results[name].append(run(name))
    print(f"{MODEL_TYPE} (random weights), 640x480 clip, {frames} tracked frames, threads {torch.get_num_threads()}")
    for index, clock in ((1, "wall"), (2, "cpu")):
        ours_frame = [r[index] for r in results["ours"]]
        reference_frame = [r[index] for r in results["reference"]]
        ratio = statistics.median(ours_frame) / statistics.median(reference_frame)
        pairwise = statistics.median(o / r for o, r in zip(ours_frame, reference_frame))
        print(f"  [{clock}] reference: {statistics.median(reference_frame):.2f} s/frame "
              f"({', '.join(f'{t:.2f}' for t in reference_frame)})")
        print(f"  [{clock}] ours:      {statistics.median(ours_frame):.2f} s/frame "
              f"({', '.join(f'{t:.2f}' for t in ours_frame)})")
        print(f"  [{clock}] ratio ours/reference per frame: {ratio:.3f} (median of pairwise {pairwise:.3f}); "
              "target <= 0.75")
    for name in ("reference", "ours"):
        print(f"  {name} init_state + click: {statistics.median(r[0] for r in results[name]):.2f} s")
    ious = [iou(a, b) for a, b in zip(results["ours"][-1][3], results["reference"][-1][3])]
    print(f"  mask IoU ours vs reference per frame: min {min(ious):.4f}")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    sys.path.insert(0, {tests!r})
    side, video, checkpoint, track, tiny = {side!r}, {video!r}, {checkpoint!r}, {track}, {tiny}
    def peak():
        # VmHWM: this process's own peak RSS (ru_maxrss would carry over the parent's at fork)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    with torch.inference_mode():
        if tiny:
            torch.set_num_threads(1)
            from video_support import make_video_sam2, make_reference_video_predictor
            model = make_video_sam2()
            if side == "ours":
                from sam.video import SamVideoPredictor
                predictor = SamVideoPredictor(model)
            else:
                predictor = make_reference_video_predictor(model)
        elif side == "ours":
            from sam import build_sam
            from sam.video import SamVideoPredictor
            predictor = SamVideoPredictor(build_sam("sam2.1_hiera_tiny", checkpoint))
        else:
            from sam2.build_sam import build_sam2_video_predictor
            predictor = build_sam2_video_predictor({config!r}, checkpoint, device="cpu")
        model_mb = peak()
        if side == "ours":
            state = predictor.init_state(video, keep_memory="window")
        else:
            state = predictor.init_state(video)
        predictor.add_new_points_or_box(state, 0, 1, points={click!r}, labels=[1])
        count = sum(1 for _ in predictor.propagate_in_video(state, max_frame_num_to_track=track))
    print(json.dumps({{"model_mb": model_mb, "peak_mb": peak(), "frames": count}}))
    """
)


def peak_memory(side: str, video: Path, checkpoint: Path, track: int, tiny: bool) -> dict:
    script = MEMORY_SCRIPT.format(
        tests=str(ROOT / "tests"), side=side, video=str(video), checkpoint=str(checkpoint), track=track,
        tiny=tiny, config=CONFIG, click=CLICK,
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if process.returncode != 0:
        raise RuntimeError(process.stderr[-3000:])
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4, help="tracked frames per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-frames", type=int, default=300)
    parser.add_argument("--memory-track", type=int, default=2, help="tracked frames in the real-size memory run")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from video_support import iter_clip, write_frame_folder, write_mp4

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        checkpoint = save_real_size_checkpoint(tmp_path / "sam2.1_hiera_tiny_random.pt")
        if not args.skip_timing:
            folder = write_frame_folder(iter_clip(args.frames + 1, 480, 640), tmp_path / "short")
            time_propagation(checkpoint, folder, args.frames, args.repeats)
        if not args.skip_memory:
            n = args.memory_frames
            folder = write_frame_folder(iter_clip(n, 480, 640), tmp_path / "long")
            video = write_mp4(iter_clip(n, 480, 640), tmp_path / "long.mp4", fps=30)
            print(f"peak RSS, {n} frames of 640x480 (MB; model-only RSS in brackets)")
            rows = [
                ("real size, JPEG folder", "reference", folder, args.memory_track, False),
                ("real size, JPEG folder", "ours", folder, args.memory_track, False),
                ("real size, .mp4", "ours", video, args.memory_track, False),
                ("tiny 128px, all frames tracked", "reference", folder, n, True),
                ("tiny 128px, all frames tracked", "ours", video, n, True),
            ]
            for label, side, source, track, tiny in rows:
                result = peak_memory(side, source, checkpoint, track, tiny)
                print(f"  {label:32s} {side:9s}: {result['peak_mb']:7.0f} ({result['model_mb']:.0f}), "
                      f"{result['frames']} frames yielded")


if __name__ == "__main__":
    main()
