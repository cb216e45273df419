"""SAM 2 memory modules (used for video): memory attention and the memory encoder.

Memory attention conditions the current frame's stride-16 tokens on the memory bank: a few
pre-norm layers of self-attention, cross-attention to the memories, and an MLP. Both
attentions carry 2-D rotary position encodings (RoPE) over the 64x64 token grid; the object
pointer tokens appended at the end of the memory are left unrotated.

The memory encoder turns a frame's (B, 256, 64, 64) features and its predicted mask into a
(B, 64, 64, 64) memory: the mask is downsampled 16x by strided convs, added to projected
features, mixed by two ConvNeXt blocks and projected to 64 channels.

All token tensors here are batch-first, (B, N, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.common import LayerNorm2d
from .neck import PositionEmbeddingSine


# --------------------------------------------------------------------------- rotary encoding
def axial_rope_angles(head_dim: int, width: int, height: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of a width x height token grid (row-major), (width*height, head_dim/2).

    The first head_dim/4 channel pairs rotate with the x coordinate, the rest with y, each at
    frequencies theta ** (-4k / head_dim).
    """
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs a head width divisible by 4, got {head_dim}")
    frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    index = torch.arange(width * height, dtype=torch.float32)
    x = index % width
    y = torch.div(index, width, rounding_mode="floor")
    return torch.cat([torch.outer(x, frequencies), torch.outer(y, frequencies)], dim=-1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of (..., N, D) by angles whose cos/sin
    are (N, D/2). Computed in float32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# Queries per block of the folded attention: on one CPU thread 256 was fastest (128 and 512
# slower) for 1 to 7 SAM 2.1 memory frames; the block's scores are 256 x Nk floats.
ATTENTION_QUERY_CHUNK = 256


class RoPEAttention(nn.Module):
    """Multi-head attention with axial rotary position encoding of queries and keys.

    Queries form a square grid; keys are either the same grid or (rope_k_repeat) several
    frames of it, followed by `num_k_exclude_rope` tokens that are not rotated.
    Parameter names as in the checkpoints: q_proj, k_proj, v_proj, out_proj.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout_p = dropout
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.feat_sizes = tuple(feat_sizes)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"RoPE attention needs a square grid of query tokens, got {tokens}")
        key = (side, device)
        if key not in self._rope_cache:
            angles = axial_rope_angles(self.internal_dim // self.num_heads, side, side, self.rope_theta)
            self._rope_cache[key] = (angles.cos().to(device), angles.sin().to(device))
        return self._rope_cache[key]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        num_k_exclude_rope: int = 0,
        projected_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: (B, Nq, C) with Nq a square grid; k, v: (B, Nk, kv_in_dim) -> (B, Nq, C).

        projected_keys: (B, heads, Nk, head_dim), keys already through k_proj and RoPE (a
        `MemoryAttention` key cache); k is then not read."""
        q = self._heads(self.q_proj(q))
        cos, sin = self._rope(q.shape[-2], q.device)
        q = rotate_pairs(q, cos, sin)
        k = self.rotated_keys(k, num_k_exclude_rope, q.shape[-2]) if projected_keys is None else projected_keys
        if self._fold_values(v):
            return self._folded_attention(q, k, v)
        v = self._heads(self.v_proj(v))
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        batch, heads, tokens, head_dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))

    def rotated_keys(self, k: torch.Tensor, num_k_exclude_rope: int, num_queries: int) -> torch.Tensor:
        """(B, Nk, kv_in_dim) -> (B, heads, Nk, head_dim): k_proj, then RoPE on all but the
        last num_k_exclude_rope tokens (which must be a whole number of query grids)."""
        k = self._heads(self.k_proj(k))
        rotated = k.shape[-2] - num_k_exclude_rope
        if rotated > 0:
            cos, sin = self._rope(num_queries, k.device)
            if rotated != num_queries:
                if not self.rope_k_repeat or rotated % num_queries:
                    raise ValueError(
                        f"{rotated} rotated keys do not match {num_queries} queries "
                        f"(rope_k_repeat={self.rope_k_repeat})"
                    )
                frames = rotated // num_queries
                cos, sin = cos.repeat(frames, 1), sin.repeat(frames, 1)
            # In place into the fresh projection: no concatenation of the whole key tensor.
            k[:, :, :rotated] = rotate_pairs(k[:, :, :rotated], cos, sin)
        return k

    def _fold_values(self, v: torch.Tensor) -> bool:
        """Attend over the raw values and project afterwards where that is exact and cheaper:
        no autograd (training keeps SDPA and its dropout) and values narrower than a head."""
        return not torch.is_grad_enabled() and self.kv_in_dim < self.internal_dim // self.num_heads \
            and v.shape[-1] == self.kv_in_dim

    def _folded_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax rows sum to one, so softmax(S) (v W_v^T + b_v) = (softmax(S) v) W_v^T + b_v:
        attend over the raw kv_in_dim values (4x fewer multiply-adds for SAM 2's 64-wide
        memories than over projected 256-wide ones), then apply v_proj and out_proj as one
        linear map. SDPA falls off its fast kernel when the value width differs from the key
        width, so the attention is a plain softmax over chunks of queries, which bounds the
        scores held at once to a chunk x Nk block.
        q: (B, heads, Nq, d) rotated; k: (B, heads, Nk, d); v: (B, Nk, kv_in_dim) -> (B, Nq, C)."""
        batch, heads, tokens, head_dim = q.shape
        q = q * head_dim**-0.5
        keys_t = k.transpose(-1, -2)
        values = v[:, None]  # one set of raw values for every head
        attended = v.new_empty(batch, heads, tokens, v.shape[-1])
        for start in range(0, tokens, ATTENTION_QUERY_CHUNK):
            stop = start + ATTENTION_QUERY_CHUNK
            scores = torch.matmul(q[:, :, start:stop], keys_t)
            attended[:, :, start:stop] = torch.matmul(scores.softmax(-1), values)
        # out_proj(concat_h(A_h W_v,h^T + b_v,h)) = sum_h A_h (W_o,h W_v,h)^T + (W_o b_v + b_o)
        value_weight = self.v_proj.weight.reshape(heads, head_dim, self.kv_in_dim)
        out_weight = self.out_proj.weight.reshape(self.embedding_dim, heads, head_dim)
        weight = torch.einsum("chd,hdk->chk", out_weight, value_weight).reshape(self.embedding_dim, -1)
        bias = self.out_proj(self.v_proj.bias)
        return F.linear(attended.transpose(1, 2).reshape(batch, tokens, -1), weight, bias)


# --------------------------------------------------------------------------- memory attention
class MemoryAttentionLayer(nn.Module):
    """Pre-norm: self-attention, cross-attention to the memory, then a ReLU MLP."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        self_attention: RoPEAttention | None = None,
        cross_attention: RoPEAttention | None = None,
        pos_enc_at_attn: bool = False,
        pos_enc_at_cross_attn_keys: bool = True,
        pos_enc_at_cross_attn_queries: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.self_attn = self_attention or RoPEAttention(d_model, 1, dropout=dropout)
        self.cross_attn_image = cross_attention or RoPEAttention(
            d_model, 1, dropout=dropout, kv_in_dim=64, rope_k_repeat=True
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        num_k_exclude_rope: int = 0,
        memory_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tgt: (B, N, C) current-frame tokens; memory: (B, M, kv_dim); pos: (B, M, kv_dim)
        memory position encoding; query_pos: (B, N, C); memory_keys: this layer's
        cross-attention keys already projected and rotated (B, heads, M, head_dim), or None."""
        normed = self.norm1(tgt)
        q = normed + query_pos if self.pos_enc_at_attn else normed
        tgt = tgt + self.dropout1(self.self_attn(q, q, normed))

        normed = self.norm2(tgt)
        attended = self.cross_attn_image(
            normed + query_pos if self.pos_enc_at_cross_attn_queries else normed,
            memory + pos if self.pos_enc_at_cross_attn_keys and memory_keys is None else memory,
            memory,
            num_k_exclude_rope=num_k_exclude_rope,
            projected_keys=memory_keys,
        )
        tgt = tgt + self.dropout2(attended)

        normed = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(normed)))))


class MemoryAttention(nn.Module):
    """A stack of MemoryAttentionLayers and a final LayerNorm (`memory_attention.*`)."""

    def __init__(self, d_model: int, layers: list[MemoryAttentionLayer], pos_enc_at_input: bool = True) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input

    def forward(
        self,
        curr: torch.Tensor,
        memory: torch.Tensor,
        curr_pos: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
        num_obj_ptr_tokens: int = 0,
        memory_keys: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """curr: (B, HW, C) current-frame tokens (row-major 64x64 grid); memory: (B, M, 64)
        spatial memories then `num_obj_ptr_tokens` object-pointer tokens; *_pos alike.
        memory_keys: per layer, the cross-attention keys from `assemble_keys` (memory_pos is
        then not read). Returns the conditioned tokens (B, HW, C)."""
        if curr.shape[0] != memory.shape[0]:
            raise ValueError(f"batch sizes differ: current {curr.shape[0]}, memory {memory.shape[0]}")
        output = curr
        if self.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos
        for index, layer in enumerate(self.layers):
            output = layer(
                output, memory, pos=memory_pos, query_pos=curr_pos, num_k_exclude_rope=num_obj_ptr_tokens,
                memory_keys=None if memory_keys is None else memory_keys[index],
            )
        return self.norm(output)

    def frame_keys(self, memory: torch.Tensor, position: torch.Tensor) -> list[torch.Tensor]:
        """One spatial memory frame's cross-attention keys in every layer, without the temporal
        encoding: RoPE(k_proj(memory + position)), each (B, heads, HW, head_dim).
        memory, position: (B, HW, 64) tokens and their spatial encoding."""
        keys = []
        for layer in self.layers:
            attention = layer.cross_attn_image
            inputs = memory + position if layer.pos_enc_at_cross_attn_keys else memory
            keys.append(attention.rotated_keys(inputs, 0, memory.shape[1]))
        return keys

    def assemble_keys(
        self,
        frame_keys: list[list[torch.Tensor]],
        temporal: list[torch.Tensor],
        pointers: torch.Tensor | None,
        pointer_pos: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """Per layer, the keys of a whole memory bank from cached per-frame keys: the frames'
        keys (`frame_keys`, one list per frame) each plus its temporal encoding's term, then
        the unrotated pointer keys. The temporal encoding t is added before k_proj, and k_proj
        and RoPE are linear, so RoPE(k_proj(x + t)) = RoPE(k_proj(x)) + RoPE(W_k t) exactly.
        temporal: (64,) per frame (pass one tensor object per distance: frames sharing it
        share its term); pointers, pointer_pos: (B, P, 64) or None.
        Returns (B, heads, M, head_dim) per layer, M = frames * HW + P."""
        keys = []
        for index, layer in enumerate(self.layers):
            attention = layer.cross_attn_image
            first = frame_keys[0][index]
            batch, heads, tokens, head_dim = first.shape
            num_pointers = 0 if pointers is None else pointers.shape[1]
            layer_keys = first.new_empty(batch, heads, len(frame_keys) * tokens + num_pointers, head_dim)
            cos, sin = attention._rope(tokens, first.device)
            terms: dict[int, torch.Tensor] = {}  # frames at the same distance share a term
            for frame, (cached, encoding) in enumerate(zip(frame_keys, temporal)):
                target = layer_keys[:, :, frame * tokens:(frame + 1) * tokens]
                if not layer.pos_enc_at_cross_attn_keys:
                    target.copy_(cached[index])
                    continue
                if id(encoding) not in terms:
                    projected = (attention.k_proj.weight @ encoding).reshape(heads, 1, head_dim)
                    terms[id(encoding)] = rotate_pairs(projected.expand(heads, tokens, head_dim), cos, sin)
                if target.is_contiguous():
                    torch.add(cached[index], terms[id(encoding)], out=target)
                else:
                    target.copy_(cached[index] + terms[id(encoding)])
            if num_pointers:
                inputs = pointers + pointer_pos if layer.pos_enc_at_cross_attn_keys else pointers
                layer_keys[:, :, len(frame_keys) * tokens:] = attention._heads(attention.k_proj(inputs))
            keys.append(layer_keys)
        return keys


class MemoryKeyCache:
    """One spatial memory frame's keys from `MemoryAttention.frame_keys` (4 layers x HW x 256
    floats, 16 MB per SAM 2.1 frame and object), for reuse while the frame ages in the bank.
    The keys belong to the very tensors they came from: `lookup` checks the memory and
    position by identity, so a rewritten memory (a new click on that frame) never reads them."""

    __slots__ = ("memory", "position", "keys")

    def __init__(self) -> None:
        self.memory: torch.Tensor | None = None
        self.position: torch.Tensor | None = None
        self.keys: list[torch.Tensor] | None = None

    def lookup(self, memory: torch.Tensor, position: torch.Tensor) -> list[torch.Tensor] | None:
        if self.keys is not None and self.memory is memory and self.position is position:
            return self.keys
        return None

    def store(self, memory: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor]) -> None:
        self.memory, self.position, self.keys = memory, position, keys


# --------------------------------------------------------------------------- memory encoder
class MaskDownSampler(nn.Module):
    """(B, 1, H, W) mask -> (B, embed_dim, H/16, W/16): strided conv + LayerNorm2d + GELU
    stages (each multiplying channels by stride**2), then a 1x1 conv (`encoder.i`).

    mask_size: first resize the mask to mask_size x mask_size (bilinear, antialiased) when it
    has another size; SAM 3's tracker does (1008-px masks -> 1152 = 16 x its 72 grid)."""

    def __init__(
        self, embed_dim: int = 256, kernel_size: int = 3, stride: int = 2, padding: int = 1, total_stride: int = 16,
        mask_size: int | None = None,
    ) -> None:
        super().__init__()
        self.mask_size = mask_size
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride**num_layers != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(num_layers):
            out_channels = channels * stride**2
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding),
                LayerNorm2d(out_channels),
                nn.GELU(),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.mask_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x.float(), (size, size), mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, LayerNorm, 4x MLP (as Linear layers), layer scale."""

    def __init__(self, dim: int, kernel_size: int = 7, padding: int = 3, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A few CXBlocks (`fuser.layers.i`)."""

    def __init__(self, dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Frame features + mask -> memory features and their sine position encoding."""

    def __init__(self, out_dim: int = 64, in_dim: int = 256, fuser_layers: int = 2, mask_size: int | None = None) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(embed_dim=in_dim, mask_size=mask_size)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, fuser_layers)
        self.position_encoding = PositionEmbeddingSine(out_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pix_feat: (B, in_dim, 64, 64) frame features; masks: (B, 1, 1024, 1024) logits (or
        probabilities with skip_mask_sigmoid). Returns memory features and their position
        encoding, both (B, out_dim, 64, 64)."""
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        return x, self.position_encoding(x).to(x.dtype)
