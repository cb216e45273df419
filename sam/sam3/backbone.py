"""SAM 3's image backbone: the Perception Encoder ViT (`trunk`) and its FPN neck (`convs`).

Names follow Meta's `sam3.pt` under `detector.backbone.vision_backbone.`: `trunk.patch_embed.proj`,
`trunk.pos_embed` (1, 1 + P*P, C, with the unused cls slot first), `trunk.ln_pre`,
`trunk.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` and
`convs.N.{dconv_2x2_0, dconv_2x2_1, dconv_2x2, maxpool_2x2, conv_1x1, conv_3x3}`.
The RoPE tables (`attn.freqs_cis`, complex64) are recomputed, not stored: Meta's checkpoint holds
them as buffers and `sam.sam3.build` checks them against ours on load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import sine_grid


def axial_rope(head_dim: int, grid: int, scale: float, theta: float = 10000.0) -> torch.Tensor:
    """Meta's 2D axial RoPE table for a (grid, grid) token square: complex (grid*grid, head_dim/2),
    x frequencies then y frequencies; positions are multiplied by `scale` (RoPE interpolation)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    index = torch.arange(grid * grid, dtype=torch.float32)
    t_x = (index % grid) * scale
    t_y = torch.div(index, grid, rounding_mode="floor") * scale
    angles = torch.cat((torch.outer(t_x, freqs), torch.outer(t_y, freqs)), dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, heads, N, D) by freqs (N, D/2) complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


class RopeAttention(nn.Module):
    """ViT self-attention over a (B, H, W, C) token map with 2D RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int, grid: int, rope_scale: float, theta: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("freqs_cis", axial_rope(dim // num_heads, grid, rope_scale, theta), persistent=False)

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C). `window` > 0 attends within non-overlapping windows of
        that side (the map zero-padded up to multiples, as `window_partition`): the windows are cut
        out of the qkv projection and put back into the output's layout by one permute each, so the
        token map itself is never partitioned or unpartitioned."""
        batch, height, width, dim = x.shape
        if not window:
            qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            out = self._attend(qkv)
            return self.proj(out.transpose(1, 2).reshape(batch, height, width, dim))
        pad_h, pad_w = (-height) % window, (-width) % window
        if pad_h or pad_w:  # padded tokens are zeros before the projection, as in window_partition
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // window, (width + pad_w) // window
        qkv = self.qkv(x).view(batch, rows, window, cols, window, 3, self.num_heads, -1)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, batch * rows * cols, self.num_heads, window * window, -1)
        out = self._attend(qkv)  # (B * windows, heads, window * window, head_dim)
        out = out.view(batch, rows, cols, self.num_heads, window, window, -1).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(batch, rows * window, cols * window, dim)
        if pad_h or pad_w:
            out = out[:, :height, :width]
        return self.proj(out)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        q, k = apply_rope(q, self.freqs_cis), apply_rope(k, self.freqs_cis)
        return F.scaled_dot_product_attention(q, k, v)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C), zero-padding H and W up to multiples."""
    batch, height, width, dim = x.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window, window, wp // window, window, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, dim), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]):
    hp, wp = padded
    batch = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(batch, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, -1)[:, : size[0], : size[1]]


class Block(nn.Module):
    """Pre-norm ViT block; windowed attention when `window` > 0, else global."""

    def __init__(self, dim, num_heads, mlp_dim, window, grid, rope_window, theta, eps) -> None:
        super().__init__()
        self.window = window
        side = window if window else grid
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = RopeAttention(dim, num_heads, side, rope_window / side, theta)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = shortcut + self.attn(self.norm1(x), self.window)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ViT(nn.Module):
    """The Perception Encoder trunk: (B, 3, S, S) -> (B, C, S/patch, S/patch), taken at the last
    global-attention block (as Meta does; later blocks, if any, are not run)."""

    def __init__(
        self,
        image_size: int = 1008,
        patch_size: int = 14,
        pretrain_image_size: int = 336,
        dim: int = 1024,
        depth: int = 32,
        num_heads: int = 16,
        mlp_dim: int = 4736,
        window_size: int = 24,
        global_blocks: Sequence[int] = (7, 15, 23, 31),
        rope_theta: float = 10000.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        pretrain_grid = pretrain_image_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.ln_pre = nn.LayerNorm(dim, eps=eps)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, 0 if i in global_blocks else window_size, grid, window_size, rope_theta, eps)
            for i in range(depth)
        )
        self.last_block = max(global_blocks)

    def tiled_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The pretraining position grid without its cls slot, tiled over (height, width): (1, H, W, C)."""
        pos = self.pos_embed[:, 1:]
        side = int(pos.shape[1] ** 0.5)
        pos = pos.reshape(1, side, side, -1)
        reps = (-(-height // side), -(-width // side))
        return pos.repeat(1, reps[0], reps[1], 1)[:, :height, :width]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = self.ln_pre(x + self.tiled_pos_embed(x.shape[1], x.shape[2]))
        for block in self.blocks[: self.last_block + 1]:
            x = block(x)
        return x.permute(0, 3, 1, 2)


def _scale_layers(dim: int, scale: float) -> list[tuple[str, nn.Module]]:
    if scale == 4.0:
        return [
            ("dconv_2x2_0", nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)),
            ("gelu", nn.GELU()),
            ("dconv_2x2_1", nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)),
        ]
    if scale == 2.0:
        return [("dconv_2x2", nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))]
    if scale == 1.0:
        return []
    if scale == 0.5:
        return [("maxpool_2x2", nn.MaxPool2d(2, 2))]
    raise ValueError(f"unsupported FPN scale factor {scale}; SAM 3 uses 4, 2, 1 and 0.5")


class NeckBranch(nn.Sequential):
    """One FPN branch (`dconv_2x2*`, `gelu` / `maxpool_2x2`, `conv_1x1`, `conv_3x3`; Meta's names).

    In inference the 1x1 conv (and an optional 1x1 `project` after the branch, such as the mask
    decoder's conv_s0 / conv_s1) is folded into the 3x3 one: all three are linear, so
    conv_3x3(conv_1x1(x)) is one 3x3 conv from the narrower input, e.g. 64 -> 256 channels at the
    4x level instead of 64 -> 256 -> 256 (a quarter of the multiply-adds), and with `project`
    64 -> 32. The biases are not a constant then (the 3x3 conv zero-pads conv_1x1's output, bias
    included), so the border rows and columns get their own bias terms. The same sums in another
    order: values agree to float rounding. Training, autograd on, tracing and exports run the modules
    as written."""

    def forward(self, x: torch.Tensor, project: nn.Conv2d | None = None) -> torch.Tensor:
        if (self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling()):  # exports keep the checkpoint's weights as they are
            x = super().forward(x)
            return x if project is None else project(x)
        for module in list(self.children())[:-2]:
            x = module(x)
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            return self[-1](self[-2](x)) if project is None else project(self[-1](self[-2](x)))
        weight, bias, edges = self._folded(project)
        out = F.conv2d(x, weight, bias, padding=1)
        top, bottom, left, right, corners = edges
        out[..., 0, :] += top
        out[..., -1, :] += bottom
        out[..., :, 0] += left
        out[..., :, -1] += right
        out[..., 0, 0] += corners[0]
        out[..., 0, -1] += corners[1]
        out[..., -1, 0] += corners[2]
        out[..., -1, -1] += corners[3]
        return out

    def _folded(self, project: nn.Conv2d | None):
        first, second = self[-2], self[-1]
        parts = [first, second] + ([] if project is None else [project])
        key = tuple((p.weight.data_ptr(), p.weight._version, p.bias.data_ptr(), p.bias._version) for p in parts)
        cache = self.__dict__.setdefault("_fold_cache", {})
        slot = None if project is None else id(project)
        if cache.get(slot, (None,))[0] != key:
            w1, w3 = first.weight[:, :, 0, 0], second.weight  # (m, c), (d, m, 3, 3)
            weight = torch.einsum("dmhw,mc->dchw", w3, w1)
            # The bias map on a 3 x 3 image holds every case: rows top / inner / bottom x columns alike.
            ones = first.bias.view(1, -1, 1, 1).expand(1, -1, 3, 3)
            bias_map = F.conv2d(ones, w3, second.bias, padding=1)[0]
            if project is not None:
                w2 = project.weight[:, :, 0, 0]
                weight = torch.einsum("ed,dchw->echw", w2, weight)
                bias_map = torch.einsum("ed,dhw->ehw", w2, bias_map) + project.bias.view(-1, 1, 1)
            inner = bias_map[:, 1, 1]
            top, bottom = bias_map[:, 0, 1] - inner, bias_map[:, 2, 1] - inner
            left, right = bias_map[:, 1, 0] - inner, bias_map[:, 1, 2] - inner
            corners = (bias_map[:, 0, 0] - inner - top - left, bias_map[:, 0, 2] - inner - top - right,
                       bias_map[:, 2, 0] - inner - bottom - left, bias_map[:, 2, 2] - inner - bottom - right)
            edges = (top[:, None], bottom[:, None], left[:, None], right[:, None], corners)
            cache[slot] = (key, (weight.contiguous(), inner.contiguous(), edges))  # replaces stale weights
        return cache[slot][1]


class VisionBackbone(nn.Module):
    """Meta's `Sam3DualViTDetNeck` without the tracker's SAM 2 neck: the ViT trunk and one conv branch
    per scale factor. Returns the feature maps (B, d, h*s, w*s) and their sine positions for the first
    `len(scale_factors) - scalp` scales (SAM 3's image model drops the last, 0.5x, level)."""

    def __init__(self, trunk: ViT, vit_dim: int, d_model: int, scale_factors: Sequence[float], scalp: int = 1):
        super().__init__()
        self.trunk = trunk
        self.convs = nn.ModuleList()
        for scale in scale_factors:
            layers = _scale_layers(vit_dim, scale)
            out_dim = {4.0: vit_dim // 4, 2.0: vit_dim // 2}.get(scale, vit_dim)
            layers += [
                ("conv_1x1", nn.Conv2d(out_dim, d_model, kernel_size=1)),
                ("conv_3x3", nn.Conv2d(d_model, d_model, kernel_size=3, padding=1)),
            ]
            self.convs.append(NeckBranch(OrderedDict(layers)))
        self.used_levels = len(scale_factors) - scalp
        self.d_model = d_model

    def forward(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """pixels (B, 3, S, S) normalised to [-1, 1] -> (features, positions), each a list of
        (B, d_model, h, w) maps from the finest level to the coarsest used one."""
        return self.neck(self.trunk(pixels))

    def neck(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The conv branches on a trunk output x (B, vit_dim, g, g): what `forward` returns (the video
        concept predictor runs the trunk once for this neck and the tracker's)."""
        feats, pos = [], []
        for conv in self.convs[: self.used_levels]:
            feat = conv(x)
            feats.append(feat)
            grid = sine_grid(feat.shape[-2], feat.shape[-1], self.d_model, feat.device, feat.dtype)
            pos.append(grid[None].expand(feat.shape[0], -1, -1, -1))
        return feats, pos
