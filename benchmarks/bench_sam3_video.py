"""SAM 3 video tracker: ours (SamVideoPredictor on sam.sam3.tracker.Sam3Tracker) vs transformers'
Sam3TrackerVideoModel, same random weights, same pixels, one object clicked on frame 0.

    python benchmarks/bench_sam3_video.py [--image-size 1008] [--vit-depth 2] [--vit-dim 64]
                                          [--frames 3] [--threads 2] [--tiny]

The tracker (neck, memory attention, memory encoder, SAM heads) is at its released sizes (d_model
256, 64-wide memory, 4 memory-attention layers, 7 memories, a 72x72 grid at 1008 px); the ViT
trunk is cut down (--vit-depth / --vit-dim) because it is the same module on both sides and would
only add the same seconds to each. --tiny: the test suite's tiny tracker instead. Frames are timed
one by one after a warm-up frame; prints the median seconds per tracked frame of each side, the
ratio, and the masks' IoU on every frame (parity: ours runs with transformers' two conventions,
memory_mask_resize="logits" and refine_with_previous_mask=False).
"""

from __future__ import annotations

import argparse
import statistics
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
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1 or name.endswith("scale"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
        model.mask_decoder.pred_obj_score_head.proj_out.weight.mul_(0.1)
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(3.0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=1008)
    parser.add_argument("--vit-depth", type=int, default=2)
    parser.add_argument("--vit-dim", type=int, default=64)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
