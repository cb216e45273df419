"""Peak memory of one SAM 3 image call: ours (sam.sam3) vs transformers' Sam3Model, CPU, float32.

    python benchmarks/bench_sam3_memory.py                               # released size: ViT depth 32, 1008 px
    python benchmarks/bench_sam3_memory.py --depth 2 --image-size 336    # a quick small run

One random transformers `Sam3Model` (full detector and text sizes; the ViT at --depth /
--image-size) is saved once with `save_pretrained`; then each side runs in a fresh subprocess
(``--child``): load that directory (ours: `sam.sam3.load_sam3`, transformers:
`Sam3Model.from_pretrained`), then one full call (image pass + one text query + heads, the call
benchmarks/bench_sam3.py times; transformers gets the padded box so it computes what we do) under
torch.inference_mode on the same pixels and tokens. Each child reports:

- model:     RSS once the model is loaded and every weight page read once (/proc/self/statm,
             after gc); "file" is the part still mapped from the safetensors file (RssFile:
             transformers keeps its weights mapped, ours copies them into the modules);
- load peak: peak RSS of loading (it can hold the file's tensors and the model at once);
- peak:      peak RSS of the whole process, loading and the call (`ru_maxrss`);
- call:      the call's own peak minus the RSS right before it (the peak counter is reset before
             the call through /proc/self/clear_refs; both `ru_maxrss` and VmHWM follow it).

Memory does not depend on speed, so the children run one thread by default (--threads). Weights
are random; memory does not depend on their values. The logits of both sides are compared
(within 1e-3) so the two calls are known to compute the same thing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


# --------------------------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _file_backed() -> int:
    """Resident file-backed pages (RssFile): weights still mapped from the safetensors file."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssFile:"))


def _touch(model) -> None:
    """Read one value per 4 KiB page of every weight, so weights that are still mapped from the file
    (transformers' from_pretrained keeps them so) are resident before the call, as ours are."""
    for tensor in (*model.parameters(), *model.buffers()):
        flat = tensor.detach().reshape(-1)
        if flat.numel() and not flat.is_complex():
            flat[:: max(1, 4096 // flat.element_size())].sum()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _config(depth: int, image_size: int):
    from transformers import Sam3Config

    # A global-attention block every 8th, as the released 32-block ViT (7, 15, 23, 31).
    global_blocks = [i for i in range(depth) if i % 8 == 7] or [depth - 1]
    return Sam3Config(vision_config=dict(backbone_config=dict(
        model_type="sam3_vit_model", num_hidden_layers=depth, image_size=image_size,
        global_attn_indexes=global_blocks, layer_norm_eps=1e-5)))


def _inputs(image_size: int):
    import torch

    from sam.sam3.text import tokenize

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, image_size, image_size, generator=generator)
    return pixels, tokenize(["a dog"])


def _child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if args.child == "save":
        from transformers import Sam3Model

        torch.manual_seed(0)
        model = Sam3Model(_config(args.depth, args.image_size)).eval()
        model.save_pretrained(root)
        return {"parameters": sum(p.numel() for p in model.parameters())}

    pixels, ids = _inputs(args.image_size)
    result = {"after_imports": _rss()}
    if args.child == "ours":
        from sam.sam3 import load_sam3

        model = load_sam3(root)

        def call():
            return model.decode(model.encode_image(pixels), *model.encode_text(ids))["logits"]
    elif args.child == "transformers":
        from transformers import Sam3Model

        model = Sam3Model.from_pretrained(root, dtype=torch.float32).eval()
        box, label = torch.zeros(1, 1, 4), torch.full((1, 1), -10)

        def call():
            return model(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(),
                         input_boxes=box, input_boxes_labels=label).pred_logits
    else:
        raise SystemExit(f"unknown child {args.child}")
    gc.collect()
    result["load_peak"] = _peak()
    _touch(model)
    result["model"], result["model_file_backed"] = _rss(), _file_backed()
    result["peak_reset"] = _reset_peak()
    result["before_call"] = _rss()
    started = time.perf_counter()
    with torch.inference_mode():
        logits = call()
    result["call_seconds"] = time.perf_counter() - started
    result["call_peak"] = _peak()
    result["peak"] = max(result["load_peak"], result["call_peak"])
    torch.save(logits.clone(), root / f"logits_{args.child}.pt")
    return result


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------


def _run(kind: str, args: argparse.Namespace, root: Path) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--root", str(root), "--depth", str(args.depth),
               "--image-size", str(args.image_size), "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32, help="ViT blocks (32: released)")
    parser.add_argument("--image-size", type=int, default=1008, help="input side in pixels (1008: released)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    import torch

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        saved = _run("save", args, root)
        weights_mb = sum(f.stat().st_size for f in root.glob("*.safetensors")) / MB
        results = {kind: _run(kind, args, root) for kind in ("ours", "transformers")}
        ours_logits, their_logits = (torch.load(root / f"logits_{kind}.pt") for kind in results)
    difference = (ours_logits - their_logits).abs().max().item()
    print(f"SAM 3 image model, ViT depth {args.depth}, {args.image_size} px, {saved['parameters'] / 1e6:.0f}M "
          f"parameters ({weights_mb:.0f} MB of float32 weights), {args.threads} thread(s), CPU; "
          f"logits max |ours - transformers| {difference:.1e}")
    if not all(r["peak_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs refused; 'call' is then measured against the load peak")
    print(f"{'':<14}{'model':>10}{'(file)':>8}{'load peak':>11}{'peak':>10}{'call':>10}{'call s':>9}   (RSS, MB)")
    for kind, r in results.items():
        print(f"{kind:<14}{r['model'] / MB:10.0f}{r['model_file_backed'] / MB:8.0f}{r['load_peak'] / MB:11.0f}{r['peak'] / MB:10.0f}"
              f"{(r['call_peak'] - r['before_call']) / MB:10.0f}{r['call_seconds']:9.1f}")
    ours, theirs = results["ours"], results["transformers"]
    ratios = {name: ours[key] / theirs[key] for name, key in (("model", "model"), ("load peak", "load_peak"),
                                                               ("peak", "peak"))}
    ratios["call"] = (ours["call_peak"] - ours["before_call"]) / (theirs["call_peak"] - theirs["before_call"])
    print("ratio ours / transformers: " + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()))
    if difference > 1e-3:
        print(f"WARNING: the two calls disagree (max logit difference {difference:.1e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
