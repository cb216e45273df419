"""Hiera trunk of the SAM 2 image encoder (hierarchical ViT with query pooling).

Four stages at strides 4, 8, 16 and 32 of the input. The first block of each later stage halves
the token grid by max-pooling its attention queries (and its shortcut) and doubles the width
and the head count. Blocks attend inside non-overlapping windows, except the few global ones
listed in `global_att_blocks`. Position: a coarse learned embedding bicubically stretched to
the token grid, plus a window-sized one tiled over it (arXiv 2311.05613).

Tokens stay channels-last, (B, H, W, C), from the patch embedding to the last block; `forward`
hands back one feature map per stage.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nh * nw, window, window, C), zero-padding H and W up to multiples
    of `window`. Returns the windows and the padded (Hp, Wp)."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window, -width % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    grid = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = grid.transpose(2, 3).reshape(-1, window, window, channels)
    return windows, (padded_h, padded_w)


def max_pool_tokens(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """2-D max pooling (kernel = stride, floor mode) of a channels-last (N, H, W, C) grid.

    Runs max_pool2d on the channels-first view, which for channels-last memory is the fast
    vectorised kernel and hands back channels-last memory again: no layout copies.
    """
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) image -> (B, H/4, W/4, C) tokens: one 7x7 convolution at stride 4."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last input makes the convolution write channels-last tokens directly.
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


def _epilogue_in_place(y: torch.Tensor) -> bool:
    """True where the GELU or the residual sum may overwrite the product: nothing records it
    for autograd, and no tracer (ONNX export) is watching."""
    if torch.is_grad_enabled() and y.requires_grad:
        return False
    return not torch.jit.is_tracing()


def _run_in_pieces(x: torch.Tensor) -> bool:
    """Cache-sized pieces (`GeluMLP` chunks, `MultiScaleBlock` bands) only on CPU, one thread.

    With several threads every op is a parallel region that ends when its slowest thread does;
    on a machine shared with other work a descheduled thread stretches each such wait to a
    scheduler time slice, and pieces multiply the regions (hiera tiny at 2 threads with one of
    2 cores busy elsewhere: 10.7 s in pieces, 6.3 s whole). One thread has no such waits, and
    there the pieces save 15-20% of the stage-1 and stage-2 MLP time.
    """
    return x.device.type == "cpu" and torch.get_num_threads() == 1


def linear(
    x: torch.Tensor,
    layer: nn.Linear,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    fused: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """layer(x), optionally followed by GELU (exact, erf) or by `+ residual`."""
    return linear_weights(x, layer.weight, layer.bias, gelu=gelu, residual=residual, fused=fused, out=out)


def linear_weights(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    fused: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias), optionally followed by GELU (exact, erf) or by `+ residual`.

    With `fused` (inference), the GELU and the sum run in place on the product: the same
    operations as the eager path, so the same bits, without allocating (and first touching)
    a second output. `out`: a contiguous (M, N) buffer to write the product into (2-D x).
    The product is always `F.linear` / `addmm` (MKL on CPU). The oneDNN kernels with the GELU
    or the sum fused in, used here before, were slower than MKL plus a separate pass from 448
    input features up on the 2-core AMD EPYC (AVX2) dev machine, the GELU one by up to 50%,
    and running the small-width stages in cache-sized pieces (`GeluMLP`, `MultiScaleBlock`)
    saves the memory traffic that fusing saved.
    """
    if out is not None and bias is not None and x.dim() == 2:
        y = torch.addmm(bias, x, weight.t(), out=out)  # what F.linear computes for 2-D inputs
    else:
        y = F.linear(x, weight, bias)
        if out is not None:
            y = out.copy_(y)
    in_place = fused and _epilogue_in_place(y)
    if gelu:
        y = torch.ops.aten.gelu_(y) if in_place else F.gelu(y)
    if residual is not None:
        if in_place and residual.shape == y.shape and residual.dtype == y.dtype:
            y = y.add_(residual)  # y + residual is residual + y, bit for bit
        else:
            y = residual + y
    return y


class GeluMLP(nn.Module):
    """Linear -> GELU -> ... -> Linear (`layers.i` as in the SAM 2 checkpoints)."""

    # With `fused` and one thread, grids of more than twice this many tokens run the MLP this many
    # tokens at a time: the 4x-wide hidden activations of a chunk stay in cache between the two
    # products instead of a round trip through memory (base+ stage 1: 117 MB).
    chunk_tokens = 2048

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = True
    ) -> torch.Tensor:
        """MLP(x), plus `residual` if given (summed in place where possible)."""
        tokens = x.numel() // x.shape[-1]
        large = tokens > 2 * self.chunk_tokens and x.is_contiguous()
        if fused and large and _epilogue_in_place(x) and _run_in_pieces(x):
            return self._forward_chunked(x, residual)
        for layer in self.layers[:-1]:
            x = linear(x, layer, gelu=True, fused=fused)
        return linear(x, self.layers[-1], residual=residual, fused=fused)

    def _forward_chunked(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The same per-token arithmetic, `chunk_tokens` rows at a time, into one output."""
        last = self.layers[-1]
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty(rows.shape[0], last.out_features, dtype=x.dtype, device=x.device)
        if residual is not None:
            residual = residual.expand(*x.shape[:-1], last.out_features).reshape(out.shape)
        for start in range(0, rows.shape[0], self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            hidden = rows[chunk]
            for layer in self.layers[:-1]:
                hidden = linear(hidden, layer, gelu=True)
            linear(hidden, last, residual=None if residual is None else residual[chunk], out=out[chunk])
        return out.view(*x.shape[:-1], last.out_features)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over (N, h, w, C) windows, queries optionally max-pooled."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None = None) -> None:
        super().__init__()
        if dim_out % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim_out})")
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def attend(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """(N, h, w, dim) -> per-head attention output (N, heads, h', w', head_dim), before the
        output projection; (h', w') = (h, w) / q_stride when pooling."""
        batch, height, width, _ = x.shape
        heads, head_dim = self.num_heads, self.dim_out // self.num_heads
        qkv = linear(x, self.qkv, fused=fused).view(batch, height * width, 3, heads, head_dim)
        q, k, v = qkv.unbind(2)  # (N, L, heads, head_dim) each
        if self.q_stride is not None:
            q = max_pool_tokens(q.reshape(batch, height, width, self.dim_out), self.q_stride)
            height, width = q.shape[1:3]
            q = q.reshape(batch, height * width, heads, head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.view(batch, heads, height, width, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, h, w, dim) -> (N, h', w', dim_out)."""
        out = self.attend(x)
        batch, heads, height, width, head_dim = out.shape
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, heads * head_dim))


def merge_heads(out: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Per-window, per-head attention output (B * nh * nw, heads, window, window, d) -> the
    token grid (B, H, W, heads * d), in one copy (window = 0: out is already the whole grid)."""
    windows, heads, height, width, head_dim = out.shape
    if window == 0:
        return out.permute(0, 2, 3, 1, 4).reshape(windows, height, width, heads * head_dim)
    padded_h, padded_w = padded_hw
    rows, cols = padded_h // window, padded_w // window
    batch = windows // (rows * cols)
    grid = out.view(batch, rows, cols, heads, window, window, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
    grid = grid.reshape(batch, padded_h, padded_w, heads * head_dim)
    if (padded_h, padded_w) != tuple(hw):
        grid = grid[:, : hw[0], : hw[1]]
    return grid


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block; at a stage change it also pools (q_stride) and widens."""

    fused = True  # in-place epilogues and cache-sized MLP chunks at inference; False: plain eager path
    band_tokens = 2048  # with fused and one thread: windowed blocks on larger grids run in bands of this many tokens

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size  # 0: global attention
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride=q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = GeluMLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H', W', dim_out)."""
        batch, height, width, _ = x.shape
        window = self.window_size
        if (
            self.fused
            and window > 0
            and height % window == 0
            and width % window == 0
            and batch * height * width > 2 * self.band_tokens
            and _epilogue_in_place(x)
            and _run_in_pieces(x)
        ):
            return self._forward_in_bands(x)
        return self._forward(x)

    def _forward_in_bands(self, x: torch.Tensor) -> torch.Tensor:
        """A windowed block on a large grid, one band of window rows at a time.

        Windowed attention, the norms, the MLP and the pooled shortcut all stay inside a row
        of windows, so each band is a complete block on its own: the same arithmetic, with
        every intermediate (qkv, attention output, MLP hidden) cache-sized.
        """
        batch, height, width, _ = x.shape
        window = self.window_size
        row_stride = self.q_stride[0] if self.q_stride is not None else 1
        band_rows = max(1, self.band_tokens // (batch * width * window)) * window
        out = None
        for top in range(0, height, band_rows):
            band = self._forward(x[:, top : top + band_rows])
            if out is None:
                out = band.new_empty(batch, height // row_stride, band.shape[2], band.shape[3])
            out[:, top // row_stride : top // row_stride + band.shape[1]] = band
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            # The shortcut is widened from the normalised tokens, and pooled like the queries.
            shortcut = linear(x, self.proj, fused=fused)
            if self.q_stride is not None:
                shortcut = max_pool_tokens(shortcut, self.q_stride)

        window = self.window_size
        padded_hw = x.shape[1:3]
        if window > 0:
            x, padded_hw = window_partition(x, window)
        out = self.attn.attend(x, fused=fused)
        if window > 0 and self.q_stride is not None:
            # Each window was pooled with its queries: same window grid, smaller windows.
            rows, cols = padded_hw[0] // window, padded_hw[1] // window
            window = window // self.q_stride[0]
            padded_hw = (rows * window, cols * window)
        # The output projection acts token by token, so it runs after the windows are put back
        # in place, where it also takes the residual sum.
        x = merge_heads(out, window, padded_hw, shortcut.shape[1:3])
        x = linear(x, self.attn.proj, residual=shortcut.contiguous(), fused=fused)
        return self.mlp(self.norm2(x), residual=x, fused=fused)


class Hiera(nn.Module):
    """The multi-scale trunk. Parameter names follow the official checkpoints
    (`image_encoder.trunk.*`)."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] = (12, 16, 20),
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {tuple(stages)} and window_spec {tuple(window_spec)} differ in length")
        self.stages = tuple(stages)
        self.window_spec = tuple(window_spec)
        self.global_att_blocks = tuple(global_att_blocks)
        self.window_pos_embed_bkg_spatial_size = tuple(window_pos_embed_bkg_spatial_size)
        # Index of the last block of each stage.
        self.stage_ends = [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]
        if not 0 <= q_pool <= len(self.stage_ends) - 1:
            raise ValueError(f"q_pool must be between 0 and {len(self.stage_ends) - 1}")
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]

        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(
            torch.zeros(1, embed_dim, self.window_spec[0], self.window_spec[0])
        )

        self.blocks = nn.ModuleList()
        stage = 0
        dim = embed_dim
        for index in range(sum(self.stages)):
            # The window size lags by one block: a stage's first block still uses the window of
            # the stage before it (and its queries are pooled down to the new stage's grid).
            window = 0 if index in self.global_att_blocks else self.window_spec[stage]
            dim_out = dim
            if index - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    q_stride=tuple(q_stride) if index in self.q_pool_blocks else None,
                    window_size=window,
                )
            )
            dim = dim_out
        # Widths of the stage outputs, lowest resolution first (the neck's order).
        self.channel_list = [self.blocks[end].dim_out for end in self.stage_ends[::-1]]
        self._pos_cache: tuple[tuple, torch.Tensor] | None = None

    def set_fused_kernels(self, enabled: bool) -> None:
        """Run inference with in-place epilogues and cache-sized MLP chunks (default) or the
        plain eager path (the parity reference). Same numbers up to float rounding either way."""
        for block in self.blocks:
            block.fused = enabled

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The absolute position embedding for an (height, width) token grid, (1, H, W, C).

        Without gradients it is computed once and reused until the parameters change (load,
        in-place update, move or cast), since it depends on nothing else.
        """
        background, window = self.pos_embed, self.pos_embed_window
        # Inference tensors (parameters made under torch.inference_mode) keep no version
        # counter, so their changes could not be seen: those are never cached.
        cacheable = not (torch.is_grad_enabled() and (background.requires_grad or window.requires_grad)) and not (
            background.is_inference() or window.is_inference()
        )
        key = None
        if cacheable:
            key = (
                height, width, background.device, background.dtype,
                background.data_ptr(), background._version, window.data_ptr(), window._version,
            )
        if cacheable and self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        embedding = F.interpolate(background, size=(height, width), mode="bicubic")
        reps = (height // window.shape[2], width // window.shape[3])
        embedding = (embedding + window.tile(1, 1, *reps)).permute(0, 2, 3, 1).contiguous()
        if cacheable:
            self._pos_cache = (key, embedding)
        return embedding

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised image -> one channels-last (B, H_i, W_i, C_i) map per stage,
        highest resolution first."""
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        outputs = []
        stage_ends = set(self.stage_ends)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in stage_ends:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised image -> [(B, C_i, H_i, W_i)] per stage, highest resolution
        first (channels-first views of channels-last memory)."""
        return [tokens.permute(0, 3, 1, 2) for tokens in self.forward_tokens(x)]


def hiera_blocks_summary(trunk: Hiera) -> str:
    """One line describing the layout, for logs and error messages."""
    return (
        f"embed_dim={trunk.patch_embed.proj.out_channels}, stages={trunk.stages}, "
        f"global blocks={trunk.global_att_blocks}, window_spec={trunk.window_spec}, "
        f"heads={trunk.blocks[0].attn.num_heads}, "
        f"pos_embed={trunk.window_pos_embed_bkg_spatial_size}"
    )


__all__ = ["Hiera", "MultiScaleAttention", "MultiScaleBlock", "PatchEmbed", "hiera_blocks_summary"]
