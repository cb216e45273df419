"""ViT image encoder of SAM: patch embedding, windowed/global blocks with relative position, neck."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.common import LayerNorm2d, MLPBlock


class PatchEmbed(nn.Module):
    """(B, 3, H, W) image -> (B, H/16, W/16, C) tokens, channels last."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Look up the learned relative-position embedding for every (query, key) pair along one axis.

    rel_pos: (L, head_dim) learned table. Returns (q_size, k_size, head_dim).
    """
    span = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != span:
        # A table trained for another resolution is stretched linearly to the needed span.
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=span, mode="linear"
        ).reshape(-1, span).permute(1, 0)
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_pos = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_pos = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offset = (q_pos - k_pos) + (k_size - 1) * k_scale
    return rel_pos[offset.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_hw: tuple[int, int],
    k_hw: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias from decomposed relative positions (MViTv2).

    q: (B, q_h * q_w, head_dim) unscaled queries. Returns (B, q_h * q_w, k_h * k_w).
    """
    q_h, q_w = q_hw
    k_h, k_w = k_hw
    table_h = relative_position_table(q_h, k_h, rel_pos_h)  # (q_h, k_h, d)
    table_w = relative_position_table(q_w, k_w, rel_pos_w)  # (q_w, k_w, d)
    batch, _, dim = q.shape
    grid_q = q.reshape(batch, q_h, q_w, dim)
    # einsum hands back permuted views; made contiguous, the broadcast sum below is written
    # straight in (q, k) order and the final reshape is free instead of a full-size copy.
    bias_h = torch.einsum("bhwc,hkc->bhwk", grid_q, table_h).contiguous()  # (B, q_h, q_w, k_h)
    bias_w = torch.einsum("bhwc,wkc->bhwk", grid_q, table_w).contiguous()  # (B, q_h, q_w, k_w)
    bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
    return bias.view(batch, q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid with relative position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        # Eager attention is kept as the parity reference; SDPA is the default fast path.
        self.use_sdpa = True
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(
                q.reshape(batch * self.num_heads, tokens, self.head_dim),
                self.rel_pos_h,
                self.rel_pos_w,
                (height, width),
                (height, width),
            ).view(batch, self.num_heads, tokens, tokens)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            out = logits.softmax(dim=-1) @ v
        out = out.permute(0, 2, 1, 3).reshape(batch, height, width, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * num_windows, ws, ws, C), zero-padding H and W up to multiples of ws."""
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window_size, window_size, padded_w // window_size, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`, dropping the padding."""
    padded_h, padded_w = padded_hw
    height, width = hw
    batch = windows.shape[0] // ((padded_h // window_size) * (padded_w // window_size))
    x = windows.view(
        batch, padded_h // window_size, padded_w // window_size, window_size, window_size, -1
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    if padded_h > height or padded_w > width:
        x = x[:, :height, :width, :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block; window_size 0 means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """(B, 3, 1024, 1024) normalised, padded image -> (B, 256, 64, 64) image embedding."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if index in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for index in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def set_attention_backend(self, use_sdpa: bool) -> None:
        """Switch every block between fused SDPA (default) and the eager reference attention."""
        for block in self.blocks:
            block.attn.use_sdpa = use_sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


