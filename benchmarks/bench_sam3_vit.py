"""Where SAM 3's ViT spends its time on this CPU, against the machine's measured matmul peak.

    python benchmarks/bench_sam3_vit.py [--threads 1] [--repeats 3] [--grid 72]

The released Perception Encoder trunk (1024 wide, 16 heads, MLP 4736, 32 blocks: 28 in 24 x 24
windows, 4 global over the 72 x 72 token map of a 1008 px image), random weights. It measures:

* the fp32 matmul peak: `torch.mm` of 4096 x 4096 matrices, GFLOP/s, at the same thread count;
* one windowed and one global block of `sam.sam3.backbone`, whole and op by op (norms, qkv,
  RoPE, attention, proj, MLP), each op's FLOPs counted by hand and its rate as % of that peak;
* the whole trunk as 28 windowed + 4 global blocks, and what it would cost at 100% of the peak.

A ViT that is matmul-bound near the peak cannot get much faster in fp32 however it is written:
the lower bound below is the FLOPs at the measured peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(function, repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def matmul_peak(repeats: int) -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / timed(lambda: torch.mm(a, b), repeats) / 1e9


def profile_block(block, grid: int, repeats: int, peak: float) -> tuple[float, float, list]:
    from sam.sam3.backbone import apply_rope

    attn, window = block.attn, block.window
    dim, heads = attn.qkv.in_features, attn.num_heads
    hidden = block.mlp.fc1.out_features
    x = torch.randn(1, grid, grid, dim)
    tokens = grid * grid
    side = window or grid
    windows = tokens // (side * side)
    per_window = side * side
    head_dim = dim // heads
    qkv_out = attn.qkv(block.norm1(x))
    qkv = qkv_out.view(windows, per_window, 3, heads, head_dim).permute(2, 0, 3, 1, 4) if window else \
        qkv_out.reshape(1, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = (t.contiguous() for t in qkv.unbind(0))
    attended = F.scaled_dot_product_attention(q, k, v)
    merged = attended.transpose(1, 2).reshape(1, grid, grid, dim)
    h = block.mlp.fc1(x)
    ops = [
        ("layer norms (2)", lambda: (block.norm1(x), block.norm2(x)), 0.0),
        ("qkv linear", lambda: attn.qkv(x), 2 * tokens * dim * 3 * dim),
        ("qkv -> heads (+ windows)", lambda: qkv_out.view(windows, per_window, 3, heads, head_dim)
         .permute(2, 0, 3, 1, 4).contiguous(), 0.0),
        ("RoPE on q and k", lambda: (apply_rope(q, attn.freqs_cis), apply_rope(k, attn.freqs_cis)), 0.0),
        ("attention (SDPA)", lambda: F.scaled_dot_product_attention(q, k, v), 4 * windows * heads * per_window**2 * head_dim),
        ("heads -> map", lambda: attended.transpose(1, 2).reshape(1, grid, grid, dim), 0.0),
        ("proj linear", lambda: attn.proj(merged), 2 * tokens * dim * dim),
        ("MLP fc1", lambda: block.mlp.fc1(x), 2 * tokens * dim * hidden),
        ("GELU", lambda: block.mlp.act(h), 0.0),
        ("MLP fc2", lambda: block.mlp.fc2(h), 2 * tokens * hidden * dim),
    ]
    rows = [(name, timed(fn, repeats), flops) for name, fn, flops in ops]
    whole = timed(lambda: block(x), repeats)
    flops = sum(f for _, _, f in rows)
    return whole, flops, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", type=int, default=72, help="tokens per side (1008 px / 14)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sam.sam3.backbone import Block

    torch.manual_seed(0)
    with torch.inference_mode():
        peak = matmul_peak(args.repeats)
        print(f"{args.threads} thread(s); fp32 matmul peak (4096^3 mm): {peak:.1f} GFLOP/s")
        totals = {}
        for kind, window in (("windowed", 24), ("global", 0)):
            block = Block(1024, 16, 4736, window, args.grid, 24, 10000.0, 1e-5).eval()
            whole, flops, rows = profile_block(block, args.grid, args.repeats, peak)
            totals[kind] = (whole, flops)
            print(f"\n{kind} block: {whole * 1e3:.0f} ms, {flops / 1e9:.1f} GFLOP, "
                  f"{flops / whole / 1e9 / peak:.0%} of peak")
            print(f"  {'op':<26}{'ms':>9}{'share':>8}{'GFLOP':>8}{'% peak':>8}")
            for name, seconds, op_flops in rows:
                rate = f"{op_flops / seconds / 1e9 / peak:.0%}" if op_flops else ""
                print(f"  {name:<26}{seconds * 1e3:9.1f}{seconds / whole:8.0%}{op_flops / 1e9:8.1f}{rate:>8}")
        seconds = 28 * totals["windowed"][0] + 4 * totals["global"][0]
        flops = 28 * totals["windowed"][1] + 4 * totals["global"][1]
        print(f"\ntrunk (28 windowed + 4 global blocks): {seconds:.1f} s, {flops / 1e9:.0f} GFLOP, "
              f"{flops / seconds / 1e9 / peak:.0%} of peak; at 100% of peak it would take {flops / peak / 1e9:.1f} s")


if __name__ == "__main__":
    main()
