"""SAM 3 video tracker: ours (SamVideoPredictor on sam.sam3.tracker.Sam3Tracker) vs transformers'
Sam3TrackerVideoModel, same random weights, same pixels, one object clicked on frame 0.

    python benchmarks/bench_sam3_video.py [--image-size 1008] [--vit-depth 2] [--vit-dim 64]
                                          [--frames 3] [--threads 2] [--tiny]
    python benchmarks/bench_sam3_video.py --memory [--memory-frames 30 300] [--threads 1] [--no-tiny]

The tracker (neck, memory attention, memory encoder, SAM heads) is at its released sizes (d_model
256, 64-wide memory, 4 memory-attention layers, 7 memories, a 72x72 grid at 1008 px); the ViT
trunk is cut down (--vit-depth / --vit-dim) because it is the same module on both sides and would
only add the same seconds to each. --tiny: the test suite's tiny tracker instead. Frames are timed
one by one after a warm-up frame; prints the median seconds per tracked frame of each side, the
ratio, and the masks' IoU on every frame (parity: ours runs with transformers' two conventions,
memory_mask_resize="logits" and refine_with_previous_mask=False).

--memory: peak RSS instead of speed, each run a fresh subprocess on the same tracker (the tiny test
tracker unless --no-tiny) and the same 640x480 .mp4 (300 frames), one object clicked on frame 0 and
tracked to the end; first the first 30 frames, then all 300, so the growth per frame shows. Ours
streams the file (keep_memory "all", as the references keep everything, and "window");
transformers as its docs drive it: the whole video decoded (transformers.video_utils.load_video) and
preprocessed into the session up front ("video"), or streamed frame by frame through the processor
("stream", frames decoded one at a time). Reports RSS after loading the model, the peak (VmHWM),
their difference ("working", longest run), the peak's growth from the shortest run to the longest,
the masks' fill range and their IoU with ours ("all") on the last frame.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def real_size_tracker(image_size: int, vit_depth: int, vit_dim: int):
    from sam3_video_support import randomise_parameters
    from transformers import Sam3TrackerVideoConfig, Sam3TrackerVideoModel

    backbone = dict(model_type="sam3_vit_model", hidden_size=vit_dim, intermediate_size=4 * vit_dim,
                    num_hidden_layers=vit_depth, num_attention_heads=max(1, vit_dim // 64), image_size=image_size,
                    patch_size=14, window_size=24, global_attn_indexes=[vit_depth - 1], pretrain_image_size=336)
    config = Sam3TrackerVideoConfig(vision_config=dict(model_type="sam3_vision_model", backbone_config=backbone),
                                    image_size=image_size)
    torch.manual_seed(0)
    model = Sam3TrackerVideoModel(config).eval()
    # The same redraw as the tests' tiny tracker (tests/sam3_video_support.py): objects stay present.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        randomise_parameters(model, generator)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
        model.mask_decoder.pred_obj_score_head.proj_out.weight.mul_(0.1)
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(3.0)
    return model


MEMORY_KINDS = ("ours_all", "ours_window", "transformers_video", "transformers_stream")
MEMORY_CLICK = [[300.0, 220.0]]  # on the 640x480 video


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    # VmHWM is this process's own peak RSS; ru_maxrss would include the parent's at fork.
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) * 1024 / 1e6


def _tracker_processor(size: int):
    from transformers import Sam2ImageProcessor, Sam3TrackerVideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    shape = {"height": size, "width": size}
    return Sam3TrackerVideoProcessor(
        image_processor=Sam2ImageProcessor(size=shape, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Sam2VideoVideoProcessor(size=shape, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        target_size=size,
    )


def memory_child(kind: str, root: Path, video: Path, frames: int) -> dict:
    """One run of `kind` over the first `frames` frames of `video` in this (fresh) process."""
    from sam.video import open_frames

    result: dict = {}
    fills, last = [], None
    with torch.inference_mode():
        if kind.startswith("ours"):
            from sam.sam3.tracker import load_sam3_tracker
            from sam.video import SamVideoPredictor

            predictor = SamVideoPredictor(load_sam3_tracker(root, memory_mask_resize="logits"),
                                          refine_with_previous_mask=False)
            result["model_mb"] = _rss_mb()
            state = predictor.init_state(video, keep_memory=kind.removeprefix("ours_"))
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=MEMORY_CLICK, labels=[1])
            for _, _, logits in predictor.propagate_in_video(state, max_frame_num_to_track=frames - 1):
                last = logits[0, 0] > 0
                fills.append(last.float().mean().item())
        else:
            from transformers import Sam3TrackerVideoModel

            model = Sam3TrackerVideoModel.from_pretrained(root, dtype=torch.float32).eval()
            processor = _tracker_processor(model.config.image_size)
            result["model_mb"] = _rss_mb()

            def to_mask(output, size):
                logits = processor.post_process_masks([output.pred_masks], original_sizes=[size], binarize=False)[0]
                return logits[0, 0] > 0

            if kind == "transformers_video":
                from transformers.video_utils import load_video

                # The first `frames` frames of the file, no more decoded.
                clip, _ = load_video(str(video), backend="pyav", sample_indices_fn=lambda metadata, **_: np.arange(frames))
                session = processor.init_video_session(video=clip, inference_device="cpu", dtype=torch.float32)
                processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1],
                                                          input_points=[[MEMORY_CLICK]], input_labels=[[[1]]])
                size = [session.video_height, session.video_width]
                model(inference_session=session, frame_idx=0)
                for output in model.propagate_in_video_iterator(session):
                    last = to_mask(output, size)
                    fills.append(last.float().mean().item())
            else:
                session = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
                source = open_frames(video)
                for frame_idx in range(frames):
                    inputs = processor(images=source[frame_idx], return_tensors="pt")
                    size = inputs.original_sizes[0].tolist()
                    if frame_idx == 0:
                        processor.add_inputs_to_inference_session(
                            session, frame_idx=0, obj_ids=[1], input_points=[[MEMORY_CLICK]], input_labels=[[[1]]],
                            original_size=size)
                    last = to_mask(model(inference_session=session, frame=inputs.pixel_values[0]), size)
                    fills.append(last.float().mean().item())
    torch.save(last.clone(), root.parent / f"last_{kind}_{frames}.pt")
    result.update(frames=len(fills), fill=[min(fills), max(fills)], peak_mb=_peak_mb())
    return result


def run_memory(args: argparse.Namespace) -> None:
    from video_support import iter_clip, write_mp4

    with tempfile.TemporaryDirectory() as tmp:
        root, video = Path(tmp) / "tracker", Path(tmp) / "clip.mp4"
        if args.tiny:
            from sam3_video_support import tiny_transformers_tracker_video

            tiny_transformers_tracker_video().save_pretrained(root)
        else:
            real_size_tracker(args.image_size, args.vit_depth, args.vit_dim).save_pretrained(root)
        write_mp4(iter_clip(max(args.memory_frames), 480, 640), video, fps=30)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        results = {}
        for frames in args.memory_frames:
            for kind in MEMORY_KINDS:
                command = [sys.executable, __file__, "--memory-child", kind, "--memory-root", str(root),
                           "--memory-video", str(video), "--memory-frames", str(frames), "--threads", str(args.threads)]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{kind}, {frames} frames failed:\n{done.stderr[-3000:]}")
                results[kind, frames] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  {kind} {frames} frames: {results[kind, frames]}", file=sys.stderr, flush=True)
        masks = {key: torch.load(Path(tmp) / f"last_{key[0]}_{key[1]}.pt") for key in results}

    label = "tiny test tracker" if args.tiny else f"tracker at released sizes, {args.image_size}px, ViT {args.vit_depth}x{args.vit_dim}"
    print(f"{label}; 640x480 .mp4; {args.threads} thread(s); peak = VmHWM of a fresh process (MB)")
    first, longest = min(args.memory_frames), max(args.memory_frames)
    print(f"{'':<22}{'model':>8}" + "".join(f"{f'peak {f}':>11}" for f in args.memory_frames)
          + f"{'working':>9}{'growth':>9}{'fill':>14}{'IoU':>7}")
    for kind in MEMORY_KINDS:
        runs = [results[kind, frames] for frames in args.memory_frames]
        growth = results[kind, longest]["peak_mb"] - results[kind, first]["peak_mb"]
        low = min(r["fill"][0] for r in runs)
        high = max(r["fill"][1] for r in runs)
        a, b = masks["ours_all", longest], masks[kind, longest]
        iou = (a & b).sum().item() / max((a | b).sum().item(), 1)
        print(f"{kind:<22}{runs[-1]['model_mb']:8.0f}" + "".join(f"{r['peak_mb']:11.0f}" for r in runs)
              + f"{runs[-1]['peak_mb'] - runs[-1]['model_mb']:9.0f}{growth:+9.1f}{f'{low:.2f}-{high:.2f}':>14}{iou:7.3f}")
    for kind in ("transformers_video", "transformers_stream"):
        ratio = results["ours_window", longest]["peak_mb"] / results[kind, longest]["peak_mb"]
        print(f"peak, {longest} frames: ours (window) / {kind} {ratio:.2f}x; "
              f"ours (all) / {kind} {results['ours_all', longest]['peak_mb'] / results[kind, longest]['peak_mb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=1008)
    parser.add_argument("--vit-depth", type=int, default=2)
    parser.add_argument("--vit-dim", type=int, default=64)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: 2 for speed, 1 for --memory")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak RSS over a 300-frame clip instead of speed")
    parser.add_argument("--memory-frames", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--no-tiny", dest="memory_tiny", action="store_false",
                        help="--memory: the tracker at released sizes (--image-size, --vit-*) instead of the tiny one")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-root", help=argparse.SUPPRESS)
    parser.add_argument("--memory-video", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1 if (args.memory or args.memory_child) else 2
    torch.set_num_threads(args.threads)
    if args.memory_child:
        result = memory_child(args.memory_child, Path(args.memory_root), Path(args.memory_video), args.memory_frames[0])
        print(json.dumps(result))
        return
    if args.memory:
        args.tiny = args.tiny or args.memory_tiny
        run_memory(args)
        return

    from sam3_video_support import IMAGE_SIZE, reference_processor, reference_session, tiny_transformers_tracker_video
    from video_support import make_clip

    from sam.sam3.tracker import load_sam3_tracker
    from sam.video import SamVideoPredictor

    size = IMAGE_SIZE if args.tiny else args.image_size
    reference = tiny_transformers_tracker_video() if args.tiny else real_size_tracker(size, args.vit_depth, args.vit_dim)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp) / "tracker")
        ours = SamVideoPredictor(load_sam3_tracker(Path(tmp) / "tracker", memory_mask_resize="logits"),
                                 refine_with_previous_mask=False)
    frames = make_clip(args.frames + 2, 480, 640)
    resized = [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames]
    pixels = (torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    processor = reference_processor()
    processor.image_processor.size = {"height": size, "width": size}
    processor.target_size = size
    click = [[300.0, 220.0]]

    def run_ours():
        state = ours.init_state(frames)
        ours.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=click, labels=[1])
        times, masks, start = [], [], time.perf_counter()
        for _, _, logits in ours.propagate_in_video(state):
            times.append(time.perf_counter() - start)
            masks.append(logits[0, 0])
            start = time.perf_counter()
        return times, masks

    def run_reference():
        session = reference_session(pixels, 480, 640)
        processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1], input_points=[[click]],
                                                  input_labels=[[[1]]])
        with torch.no_grad():
            reference(inference_session=session, frame_idx=0)
        times, masks, start = [], [], time.perf_counter()
        for out in reference.propagate_in_video_iterator(session):
            times.append(time.perf_counter() - start)
            masks.append(processor.post_process_masks([out.pred_masks], original_sizes=[[480, 640]], binarize=False)[0][0, 0])
            start = time.perf_counter()
        return times, masks

    with torch.inference_mode():
        our_times, our_masks = run_ours()
        their_times, their_masks = run_reference()
    # Frame 0 is the prompted frame (no tracking) and frame 1 warms up; the rest are timed.
    ours_s, theirs_s = statistics.median(our_times[2:]), statistics.median(their_times[2:])
    ious = [((a > 0) & (b > 0)).sum().item() / max(((a > 0) | (b > 0)).sum().item(), 1)
            for a, b in zip(our_masks, their_masks)]
    label = "tiny test tracker" if args.tiny else f"tracker at released sizes, {size}px, ViT {args.vit_depth}x{args.vit_dim}"
    print(f"{label}; {args.threads} threads; {len(our_times) - 2} timed frames")
    print(f"seconds per tracked frame: ours {ours_s:.3f}, transformers {theirs_s:.3f}, ratio {ours_s / theirs_s:.2f}x")
    print(f"mask IoU per frame: min {min(ious):.4f}; fill {[round((m > 0).float().mean().item(), 3) for m in our_masks]}")


if __name__ == "__main__":
    main()
