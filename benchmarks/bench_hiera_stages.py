"""Where SAM 2.1 set_image time goes, stage by stage: ours vs Meta's reference, against the
machine's measured matmul peak.

    python benchmarks/bench_hiera_stages.py [--model-type sam2.1_hiera_base_plus]
                                            [--threads 1] [--repeats 3] [--clock auto]

First measures the fp32 matmul peak (torch.mm on large square matrices, same thread count),
then times the image transform, the patch embedding, each Hiera stage and the FPN neck
(through conv_s0 / conv_s1 and no_mem_embed, as `set_image` hands them to the decoder) for
our model and the reference on the same weights and the same inputs, alternating after a
warm-up. Inside each stage the time is split into norms, qkv, SDPA, the output projections
(plus the widening shortcut at a stage change), the MLP, pooling / window partition, and the
rest (residual sums, reshapes, pads) by wrapping the real forward's own layers and helpers:
the code that runs is the code users run. FLOPs are counted from the shapes each matmul and
each attention call actually gets (so window padding counts; multiply-add = 2 FLOPs).

Prints, per stage and per component: median ms, GFLOP, GFLOP/s as % of the measured peak, and
the ours/reference ratio; then the bound: how long ours would take with every qkv / proj / MLP
product at 100% of the peak and everything else as measured. With --threads 1 (the default)
the process CPU time is used, which on a shared machine measures the work itself; --clock wall
for wall time. The peak is measured again after the runs, and the higher figure used.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_sam2_encoder import REFERENCE_CONFIGS  # noqa: E402 - the same model types and sam2 configs

COMPONENTS = ("norm", "qkv", "sdpa", "proj", "mlp", "pool/window", "other")


def measure_peak(clock: Callable[[], float], repeats: int) -> tuple[float, int]:
    """Best fp32 torch.mm GFLOP/s over a few large square sizes: (GFLOP/s, size)."""
    best, best_size = 0.0, 0
    for size in (1024, 2048, 3072):
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up
        for _ in range(max(2, repeats)):
            start = clock()
            torch.mm(a, b, out=out)
            rate = 2 * size**3 / (clock() - start) / 1e9
            if rate > best:
                best, best_size = rate, size
    return best, best_size


class Recorder:
    """Time and FLOPs per component. Regions nest; only the outermost one is timed, and the
    FLOPs of inner ones (the MLP's linears) go to it."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float]] = []

    def enter(self, component: str, flops: float = 0.0) -> None:
        owner = self._stack[0][0] if self._stack else component
        self.flops[owner] += flops
        self._stack.append((component, self.clock() if not self._stack else 0.0))

    def exit(self) -> None:
        component, start = self._stack.pop()
        if not self._stack:
            self.seconds[component] += self.clock() - start

    @contextlib.contextmanager
    def region(self, component: str, flops: float = 0.0):
        self.enter(component, flops)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, function: Callable, component: str, flops: Callable[..., float] | None = None) -> Callable:
        def wrapped(*args, **kwargs):
            with self.region(component, flops(*args, **kwargs) if flops else 0.0):
                return function(*args, **kwargs)

        return wrapped


def linear_flops(x: torch.Tensor, out_features: int) -> float:
    return 2.0 * x.numel() * out_features


def attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> float:
    # q (..., Lq, d) @ k^T (..., d, Lk), then (..., Lq, Lk) @ v (..., Lk, d).
    return 4.0 * q.numel() * k.shape[-2]


def conv_flops(module: torch.nn.Conv2d, output: torch.Tensor) -> float:
    kh, kw = module.kernel_size
    return 2.0 * output.numel() * module.in_channels // module.groups * kh * kw


@contextlib.contextmanager
def patched(items: list[tuple[object, str, object]]):
    """Temporarily set attributes (object, name, value)."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in items]
    try:
        for owner, name, value in items:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def hooked(recorder: Recorder, modules: list[tuple[torch.nn.Module, str]]):
    """Time each module's forward as `component`; Linear and Conv2d layers add their FLOPs."""
    handles = []
    for module, component in modules:
        def pre(mod, args, component=component):
            flops = linear_flops(args[0], mod.out_features) if isinstance(mod, torch.nn.Linear) else 0.0
            recorder.enter(component, flops)

        def post(mod, args, output, component=component):
            if isinstance(mod, torch.nn.Conv2d):
                recorder.flops[recorder._stack[0][0]] += conv_flops(mod, output)
            recorder.exit()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ours_instrumentation(recorder: Recorder, model) -> contextlib.ExitStack:
    """Wrap our trunk's layers and helpers (sam/sam2/hiera.py) for `recorder`."""
    from sam.sam2 import hiera, model as sam2_model

    trunk = model.image_encoder.trunk
    component_of: dict[int, str] = {}
    modules = []
    for block in trunk.blocks:
        component_of[id(block.attn.qkv)] = "qkv"
        component_of[id(block.attn.proj)] = "proj"
        if hasattr(block, "proj"):
            component_of[id(block.proj)] = "proj"
        modules += [(block.norm1, "norm"), (block.norm2, "norm"), (block.mlp, "mlp")]
    modules += [(trunk.patch_embed.proj, "other")]
    original_linear = hiera.linear

    def timed_linear(x, layer, *args, **kwargs):
        with recorder.region(component_of.get(id(layer), "mlp"), linear_flops(x, layer.out_features)):
            return original_linear(x, layer, *args, **kwargs)

    original_linear_weights = sam2_model.linear_weights

    def counted_linear_weights(x, weight, *args, **kwargs):  # the neck's folded 1x1 convs
        with recorder.region("other", linear_flops(x, weight.shape[0])):
            return original_linear_weights(x, weight, *args, **kwargs)

    stack = contextlib.ExitStack()
    stack.enter_context(hooked(recorder, modules))
    stack.enter_context(
        patched(
            [
                (hiera, "linear", timed_linear),
                (sam2_model, "linear_weights", counted_linear_weights),
                (hiera, "window_partition", recorder.wrap(hiera.window_partition, "pool/window")),
                (hiera, "merge_heads", recorder.wrap(hiera.merge_heads, "pool/window")),
                (hiera, "max_pool_tokens", recorder.wrap(hiera.max_pool_tokens, "pool/window")),
                (F, "scaled_dot_product_attention",
                 recorder.wrap(F.scaled_dot_product_attention, "sdpa", attention_flops)),
            ]
        )
    )
    return stack


def reference_instrumentation(recorder: Recorder, model) -> contextlib.ExitStack:
    """Wrap the reference trunk's layers and helpers (sam2/modeling/backbones/hieradet.py)."""
    from sam2.modeling.backbones import hieradet

    trunk = model.image_encoder.trunk
    modules = []
    for block in trunk.blocks:
        modules += [(block.norm1, "norm"), (block.norm2, "norm"), (block.mlp, "mlp")]
        modules += [(block.attn.qkv, "qkv"), (block.attn.proj, "proj")]
        modules += [(layer, "mlp") for layer in block.mlp.layers]  # FLOPs inside the MLP region
        if hasattr(block, "proj"):
            modules.append((block.proj, "proj"))
    modules.append((trunk.patch_embed.proj, "other"))
    neck_convs = [conv for conv in model.image_encoder.neck.modules() if isinstance(conv, torch.nn.Conv2d)]
    modules += [(conv, "other") for conv in neck_convs]
    modules += [(model.sam_mask_decoder.conv_s0, "other"), (model.sam_mask_decoder.conv_s1, "other")]
    stack = contextlib.ExitStack()
    stack.enter_context(hooked(recorder, modules))
    stack.enter_context(
        patched(
            [
                (hieradet, "window_partition", recorder.wrap(hieradet.window_partition, "pool/window")),
                (hieradet, "window_unpartition", recorder.wrap(hieradet.window_unpartition, "pool/window")),
                (hieradet, "do_pool", recorder.wrap(hieradet.do_pool, "pool/window")),
                (F, "scaled_dot_product_attention",
                 recorder.wrap(F.scaled_dot_product_attention, "sdpa", attention_flops)),
            ]
        )
    )
    return stack


def reference_neck(model, features: list[torch.Tensor], feature_sizes) -> dict:
    """What `SAM2ImagePredictor.set_image` does after the trunk (sam2 1.1.0): the neck with its
    position encodings, scalp, conv_s0 / conv_s1 (`forward_image`), flattening, no_mem_embed."""
    encoder = model.image_encoder
    fpn, positions = encoder.neck(features)
    if encoder.scalp > 0:
        fpn, positions = fpn[: -encoder.scalp], positions[: -encoder.scalp]
    backbone_out = {"vision_features": fpn[-1], "vision_pos_enc": positions, "backbone_fpn": fpn}
    fpn[0] = model.sam_mask_decoder.conv_s0(fpn[0])
    fpn[1] = model.sam_mask_decoder.conv_s1(fpn[1])
    _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [
        feat.permute(1, 2, 0).view(1, -1, *size) for feat, size in zip(vision_feats[::-1], feature_sizes[::-1])
    ][::-1]
    return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}


def describe_stages(trunk) -> list[str]:
    """One line per stage: blocks, token grid, width, heads, attention kinds."""
    lines, start, grid = [], 0, 256
    for stage, end in enumerate(trunk.stage_ends):
        blocks = trunk.blocks[start : end + 1]
        if blocks[0].q_stride is not None:
            grid //= blocks[0].q_stride[0]
        kinds = defaultdict(int)
        for block in blocks:
            kinds["global" if block.window_size == 0 else f"win{block.window_size}"] += 1
        layout = ", ".join(f"{count}x {kind}" for kind, count in kinds.items())
        lines.append(
            f"stage {stage + 1}: blocks {start}-{end}, {grid}x{grid} tokens, width {blocks[-1].dim_out}, "
            f"heads {blocks[-1].attn.num_heads}, {layout}"
        )
        start = end + 1
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="sam2.1_hiera_base_plus", choices=sorted(REFERENCE_CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--clock", choices=("auto", "cpu", "wall"), default="auto",
        help="auto: process CPU time with --threads 1, wall time otherwise",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.threads == 1)
    clock = time.process_time if use_cpu_clock else time.perf_counter

    from PIL import Image
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam_factory import randomize_parameters, real_photo

    from sam import build_sam
    from sam.transforms import transform_for

    peak, peak_size = measure_peak(clock, args.repeats)
    print(
        f"fp32 matmul peak: {peak:.1f} GFLOP/s (torch.mm {peak_size}x{peak_size}), threads {args.threads}, "
        f"clock {'process CPU' if use_cpu_clock else 'wall'}"
    )

    torch.manual_seed(0)
    ours = randomize_parameters(build_sam(args.model_type), seed=0).eval()
    reference = build_sam2(REFERENCE_CONFIGS[args.model_type], None, device="cpu")
    reference.load_state_dict(ours.state_dict(), strict=True)
    reference.eval()
    predictor = SAM2ImagePredictor(reference)
    transform = transform_for(ours)
    trunk, reference_trunk = ours.image_encoder.trunk, reference.image_encoder.trunk
    print(f"{args.model_type}: " + "; ".join(describe_stages(trunk)))
    image = np.array(Image.fromarray(real_photo("astronaut")).resize((1024, 768), Image.Resampling.BICUBIC))

    # Every stage of both models gets the same input: our previous stage's output.
    with torch.inference_mode():
        pixels = ours.preprocess(transform.to_input_tensor(image))
        ours_tokens = trunk.forward_tokens(pixels)
        patch_tokens = trunk.patch_embed(pixels)
        patch_tokens = patch_tokens + trunk.position_embedding(*patch_tokens.shape[1:3])
    stage_inputs = [patch_tokens] + ours_tokens[:-1]
    block_ranges, start = [], 0
    for end in trunk.stage_ends:
        block_ranges.append(range(start, end + 1))
        start = end + 1

    def run_blocks(blocks, indices, x):
        for index in indices:
            x = blocks[index](x)
        return x

    def ours_input(x):  # as in Hiera.forward_tokens
        x = trunk.patch_embed(x)
        return x + trunk.position_embedding(x.shape[1], x.shape[2])

    def reference_input(x):  # as in the reference Hiera.forward
        x = reference_trunk.patch_embed(x)
        return x + reference_trunk._get_pos_embed(x.shape[1:3])

    reference_features = [tokens.permute(0, 3, 1, 2) for tokens in ours_tokens]
    feature_sizes = [(256, 256), (128, 128), (64, 64)]
    # (name, ours step, reference step): each is a no-argument call returning a tensor or dict.
    steps: list[tuple[str, Callable, Callable]] = [
        ("image -> pixels", lambda: ours.preprocess(transform.to_input_tensor(image)),
         lambda: predictor._transforms(image)[None]),
        ("patch embed + pos", lambda: ours_input(pixels), lambda: reference_input(pixels)),
    ]
    for stage, indices in enumerate(block_ranges):
        steps.append(
            (f"stage {stage + 1}",
             lambda i=indices, x=stage_inputs[stage]: run_blocks(trunk.blocks, i, x),
             lambda i=indices, x=stage_inputs[stage]: run_blocks(reference_trunk.blocks, i, x))
        )
    steps.append(
        ("neck + conv_s0/s1", lambda: ours._encode_fused(ours_tokens),
         lambda: reference_neck(reference, reference_features, feature_sizes))
    )

    samples: dict[tuple[str, str], list[Recorder]] = defaultdict(list)
    totals: dict[tuple[str, str], list[float]] = defaultdict(list)
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):  # the first round is a warm-up
            for name, ours_step, reference_step in steps:
                for side, step, instrument in (
                    ("ours", ours_step, lambda r: ours_instrumentation(r, ours)),
                    ("reference", reference_step, lambda r: reference_instrumentation(r, reference)),
                ):
                    recorder = Recorder(clock)
                    with instrument(recorder):
                        start = clock()
                        step()
                        total = clock() - start
                    if repeat:
                        samples[(name, side)].append(recorder)
                        totals[(name, side)].append(total)

        # The peak again: on a shared machine the first measurement may have been unlucky.
        peak_after, _ = measure_peak(clock, args.repeats)
        if peak_after > peak:
            print(f"fp32 matmul peak re-measured after the runs: {peak_after:.1f} GFLOP/s (used below)")
            peak = peak_after

        # Parity at each stage end, so the table compares like with like.
        stage_differences = []
        for stage, indices in enumerate(block_ranges):
            expected = run_blocks(reference_trunk.blocks, indices, stage_inputs[stage])
            stage_differences.append((ours_tokens[stage] - expected).abs().max().item())

    def median_component(name: str, side: str, component: str) -> tuple[float, float]:
        """(median seconds, GFLOP) of one component; 'other' is the stage total minus the rest."""
        recorders, stage_totals = samples[(name, side)], totals[(name, side)]
        if component == "other":
            seconds = [
                total - sum(v for k, v in r.seconds.items() if k != "other") for r, total in zip(recorders, stage_totals)
            ]
        else:
            seconds = [r.seconds.get(component, 0.0) for r in recorders]
        return statistics.median(seconds), recorders[0].flops.get(component, 0.0) / 1e9

    def percent(gflop: float, seconds: float) -> str:
        return f"{100 * gflop / seconds / peak:5.1f}%" if gflop and seconds > 0 else "     -"

    header = f"  {'':<20}{'ours ms':>9}{'ref ms':>9}{'ratio':>7}{'GFLOP ours/ref':>16}{'%peak ours':>11}{'ref':>7}"
    print("\nPer stage (median of", args.repeats, "runs; %peak = executed GFLOP/s over the measured peak)")
    print(header)
    grand = {"ours": 0.0, "reference": 0.0}
    grand_flops = {"ours": 0.0, "reference": 0.0}
    rows = []
    for name, _, _ in steps:
        ours_s, ref_s = statistics.median(totals[(name, "ours")]), statistics.median(totals[(name, "reference")])
        ours_gf = sum(samples[(name, "ours")][0].flops.values()) / 1e9
        ref_gf = sum(samples[(name, "reference")][0].flops.values()) / 1e9
        grand["ours"] += ours_s
        grand["reference"] += ref_s
        grand_flops["ours"] += ours_gf
        grand_flops["reference"] += ref_gf
        rows.append((name, ours_s, ref_s, ours_gf, ref_gf))
        print(
            f"  {name:<20}{ours_s * 1e3:9.0f}{ref_s * 1e3:9.0f}{ours_s / ref_s:7.3f}"
            f"{ours_gf:8.1f}/{ref_gf:<7.1f}{percent(ours_gf, ours_s):>11}{percent(ref_gf, ref_s):>7}"
        )
    print(
        f"  {'total':<20}{grand['ours'] * 1e3:9.0f}{grand['reference'] * 1e3:9.0f}"
        f"{grand['ours'] / grand['reference']:7.3f}{grand_flops['ours']:8.1f}/{grand_flops['reference']:<7.1f}"
        f"{percent(grand_flops['ours'], grand['ours']):>11}{percent(grand_flops['reference'], grand['reference']):>7}"
    )

    print("\nPer component, summed over each stage's blocks")
    component_totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, indices in zip([f"stage {i + 1}" for i in range(len(block_ranges))], block_ranges):
        print(f"  {name} ({len(indices)} blocks)")
        for component in COMPONENTS:
            ours_s, ours_gf = median_component(name, "ours", component)
            ref_s, ref_gf = median_component(name, "reference", component)
            for side, s, gf in (("ours", ours_s, ours_gf), ("reference", ref_s, ref_gf)):
                component_totals[(component, side)][0] += s
                component_totals[(component, side)][1] += gf
            ratio = f"{ours_s / ref_s:7.3f}" if ref_s > 1e-4 else "      -"
            print(
                f"    {component:<18}{ours_s * 1e3:9.0f}{ref_s * 1e3:9.0f}{ratio}"
                f"{ours_gf:8.1f}/{ref_gf:<7.1f}{percent(ours_gf, ours_s):>11}{percent(ref_gf, ref_s):>7}"
            )
    print("  all trunk stages")
    for component in COMPONENTS:
        ours_s, ours_gf = component_totals[(component, "ours")]
        ref_s, ref_gf = component_totals[(component, "reference")]
        ratio = f"{ours_s / ref_s:7.3f}" if ref_s > 1e-4 else "      -"
        print(
            f"    {component:<18}{ours_s * 1e3:9.0f}{ref_s * 1e3:9.0f}{ratio}"
            f"{ours_gf:8.1f}/{ref_gf:<7.1f}{percent(ours_gf, ours_s):>11}{percent(ref_gf, ref_s):>7}"
        )
    matmul = ("qkv", "sdpa", "proj", "mlp")
    ours_matmul_s = sum(component_totals[(c, "ours")][0] for c in matmul)
    ours_trunk_s = sum(component_totals[(c, "ours")][0] for c in COMPONENTS)
    ours_matmul_gf = sum(component_totals[(c, "ours")][1] for c in matmul)
    print(
        f"\nours: matmul-type work (qkv, SDPA, proj, MLP) is {100 * ours_matmul_s / ours_trunk_s:.0f}% of the "
        f"trunk's time and runs at {100 * ours_matmul_gf / ours_matmul_s / peak:.0f}% of the measured peak; "
        f"everything else is {(ours_trunk_s - ours_matmul_s) * 1e3:.0f} ms."
    )
    products = ("qkv", "proj", "mlp")
    products_s = sum(component_totals[(c, "ours")][0] for c in products)
    products_gf = sum(component_totals[(c, "ours")][1] for c in products)
    bound = grand["ours"] - products_s + products_gf / peak
    print(
        f"bound: with every qkv / proj / MLP product at 100% of the peak ({products_gf:.0f} GFLOP in "
        f"{products_gf / peak:.2f} s instead of {products_s:.2f} s) and the rest as measured (SDPA "
        f"{component_totals[('sdpa', 'ours')][0]:.2f} s), ours would take {bound:.2f} s = "
        f"{bound / grand['reference']:.3f}x the reference"
    )
    print("max |ours - reference| at each stage end: " + ", ".join(f"{d:.1e}" for d in stage_differences))


if __name__ == "__main__":
    main()
