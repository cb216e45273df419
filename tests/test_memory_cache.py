"""Memory cross-attention against an independent computation.

The RoPE cross-attention rotates the keys of several memory frames in place, leaving the
object-pointer tokens at the end unrotated. Here the same attention is written out by hand
(rotation as complex multiplication, softmax attention in float64), and the temporal
encoding's linearity, which a cache of memory projections would rely on, is checked at
several distances.
"""

from __future__ import annotations

import torch

from sam.sam2.memory import RoPEAttention, axial_rope_angles

SIDE, WIDTH, MEM_DIM, HEADS = 4, 16, 8, 2


def hand_rope_attention(attention: RoPEAttention, q, k, v, num_pointers: int) -> torch.Tensor:
    """RoPE attention computed in float64, rotation as complex products."""
    weights = {name: getattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}

    def project(name, x):
        layer = weights[name]
        return x.double() @ layer.weight.double().T + layer.bias.double()

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)

    def rotate(x, rotation):
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * rotation).flatten(-2)

    angles = axial_rope_angles(WIDTH // HEADS, SIDE, SIDE).double()
    rotation = torch.polar(torch.ones_like(angles), angles)
    qh, kh, vh = heads(project("q_proj", q)), heads(project("k_proj", k)), heads(project("v_proj", v))
    qh = rotate(qh, rotation)
    rotated = kh.shape[2] - num_pointers
    frames = rotated // (SIDE * SIDE)
    kh = torch.cat([rotate(kh[:, :, :rotated], rotation.repeat(frames, 1)), kh[:, :, rotated:]], dim=2)
    scores = qh @ kh.transpose(-1, -2) / (qh.shape[-1] ** 0.5)
    out = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], WIDTH)
    return project("out_proj", out)


def test_cross_attention_over_memory_frames_and_pointers_matches_hand_computation():
    torch.manual_seed(0)
    attention = RoPEAttention(WIDTH, HEADS, kv_in_dim=MEM_DIM, rope_k_repeat=True).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.5)  # no zero biases hiding a missing term
    q = torch.randn(2, SIDE * SIDE, WIDTH)
    for frames, pointers in ((1, 0), (3, 4), (7, 8)):
        memory = torch.randn(2, frames * SIDE * SIDE + pointers, MEM_DIM)
        ours = attention(q, memory, memory, num_k_exclude_rope=pointers)
        expected = hand_rope_attention(attention, q, memory, memory, pointers)
        assert ours.std() > 0.1
        torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_temporal_encoding_is_an_exact_correction_of_the_cached_key_projection():
    """k_proj(x + pos + t) = k_proj(x + pos) + W t, and the rotation of a sum is the sum of the
    rotations, at every distance t of the memory bank."""
    torch.manual_seed(1)
    attention = RoPEAttention(WIDTH, 1, kv_in_dim=MEM_DIM, rope_k_repeat=True)
    from sam.sam2.memory import rotate_pairs

    angles = axial_rope_angles(WIDTH, SIDE, SIDE)
    cos, sin = angles.cos(), angles.sin()
    tokens = torch.randn(SIDE * SIDE, MEM_DIM)
    cached = rotate_pairs(attention.k_proj(tokens), cos, sin)
    for distance_encoding in torch.randn(7, MEM_DIM):  # maskmem_tpos_enc, one row per distance
        direct = rotate_pairs(attention.k_proj(tokens + distance_encoding), cos, sin)
        correction = rotate_pairs((attention.k_proj.weight @ distance_encoding).expand(SIDE * SIDE, -1), cos, sin)
        torch.testing.assert_close(cached + correction, direct, atol=1e-5, rtol=1e-5)
        assert (direct - cached).abs().max() > 1e-2  # the distance does change the keys


def test_folded_chunked_attention_equals_sdpa_over_projected_values():
    """Without autograd, cross-attention over narrow memories attends over the raw values and
    projects after (query-chunked softmax); with autograd it is the plain SDPA path. Both agree
    with object-pointer tokens, one or several heads, several memory-frame counts and a query
    count that is not a multiple of the chunk."""
    import sam.sam2.memory as memory_module

    torch.manual_seed(2)
    side, width, mem_dim = 6, 32, 8  # head width 32 or 16: both wider than the 8-wide memory
    for heads in (1, 2):
        attention = RoPEAttention(width, heads, kv_in_dim=mem_dim, rope_k_repeat=True).eval()
        for parameter in attention.parameters():
            torch.nn.init.normal_(parameter, std=0.5)
        q = torch.randn(2, side * side, width)
        for frames, pointers in ((1, 0), (2, 4), (4, 8), (7, 16)):
            keys = torch.randn(2, frames * side * side + pointers, mem_dim)
            values = torch.randn(2, frames * side * side + pointers, mem_dim)
            plain = attention(q, keys, values, num_k_exclude_rope=pointers)  # grad enabled: SDPA
            chunk, memory_module.ATTENTION_QUERY_CHUNK = memory_module.ATTENTION_QUERY_CHUNK, 16
            try:
                assert attention._fold_values(values) is False
                with torch.inference_mode():
                    assert attention._fold_values(values)
                    folded = attention(q, keys, values, num_k_exclude_rope=pointers)
            finally:
                memory_module.ATTENTION_QUERY_CHUNK = chunk
            assert plain.std() > 0.1
            torch.testing.assert_close(folded, plain.detach(), atol=1e-5, rtol=1e-5)
