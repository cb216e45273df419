"""Memory cross-attention against an independent computation.

The RoPE cross-attention rotates the keys of several memory frames in place, leaving the
object-pointer tokens at the end unrotated. Here the same attention is written out by hand
(rotation as complex multiplication, softmax attention in float64), and the temporal
encoding's linearity, on which the cache of memory projections relies, is checked at
several distances, and so is the cache itself (`MemoryKeyCache`, `cache_memory_keys=True`).
"""

from __future__ import annotations

import pytest
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


def _features_and_memories(model, frames: int, seed: int):
    """A frame's features, `frames` memories (random features, the shared position encoding)
    and four object pointers, in the shapes the video predictor passes."""
    generator = torch.Generator().manual_seed(seed)
    features = model.encode_frame(torch.rand(1, 3, model.image_size, model.image_size, generator=generator))
    grid = features.vision_feats.shape[-1]
    position = torch.randn(1, model.mem_dim, grid, grid, generator=generator)
    memories = [torch.randn(1, model.mem_dim, grid, grid, generator=generator).bfloat16() for _ in range(frames)]
    pointers = [(offset, torch.randn(1, model.hidden_dim, generator=generator)) for offset in (1, 2, 3, 5)]
    return features, position, memories, pointers


@pytest.mark.usefixtures("one_torch_thread")
def test_cached_memory_keys_equal_uncached_at_every_distance():
    """Keys cached once per memory frame and corrected for its temporal distance give the
    memory attention of keys projected afresh, as the frames age through t_pos 0..6
    (conditioning frames at t_pos 0, two of them sharing a distance), with pointers."""
    from video_support import make_video_sam2

    from sam.sam2.memory import MemoryKeyCache

    model = make_video_sam2().eval()
    num_maskmem = model.tracking.num_maskmem
    features, position, memories, pointers = _features_and_memories(model, num_maskmem + 1, seed=3)
    caches = [MemoryKeyCache() for _ in memories]
    with torch.inference_mode():
        first_keys = None
        for shift in range(num_maskmem):  # each step, every recent frame is one frame older
            t_positions = [0, 0] + [(t + shift) % num_maskmem for t in range(1, num_maskmem)]
            bank = [(t_pos, memory, position) for t_pos, memory in zip(t_positions, memories)]
            plain = model.condition_on_memory(features, bank, pointers, 6)
            cached = model.condition_on_memory(features, bank, pointers, 6, key_caches=caches)
            assert plain.std() > 0.1
            torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
            if first_keys is None:
                first_keys = [cache.keys for cache in caches]
            assert all(cache.keys is keys for cache, keys in zip(caches, first_keys))  # reused, not redone
        with pytest.raises(ValueError, match="key caches"):
            model.condition_on_memory(features, bank, pointers, 6, key_caches=caches[:-1])


@pytest.mark.usefixtures("one_torch_thread")
def test_a_rewritten_memory_never_reads_its_old_cached_keys():
    """A cache belongs to the memory tensor it came from: a new memory for the same frame (a
    new click there) is projected afresh, both directly and through the video predictor, where
    a correction mid-clip tracks exactly as without the cache."""
    from video_support import make_clip, make_video_sam2

    from sam.sam2.memory import MemoryKeyCache
    from sam.video import SamVideoPredictor

    model = make_video_sam2().eval()
    features, position, memories, pointers = _features_and_memories(model, 3, seed=4)
    cache = MemoryKeyCache()
    with torch.inference_mode():
        bank = [(0, memories[0], position), (6, memories[1], position)]
        model.condition_on_memory(features, bank, pointers, 6, key_caches=[MemoryKeyCache(), cache])
        old_keys = cache.keys
        bank[1] = (6, memories[2], position)  # the frame's memory rewritten
        assert cache.lookup(memories[2], position) is None
        cached = model.condition_on_memory(features, bank, pointers, 6, key_caches=[MemoryKeyCache(), cache])
        plain = model.condition_on_memory(features, bank, pointers, 6)
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
        assert cache.keys is not old_keys and cache.memory is memories[2]

    clip = make_clip(6, 64, 80)
    new_mask = torch.zeros(64, 80, dtype=torch.bool)
    new_mask[5:30, 10:50] = True
    results = []
    for cache_memory_keys in (False, True):
        # With add_all_frames_to_correct_as_cond a new prompt on frame 0 replaces its memory
        # (without it the first prompt's conditioning output stays, as in the reference).
        predictor = SamVideoPredictor(model, cache_memory_keys=cache_memory_keys, add_all_frames_to_correct_as_cond=True)
        state = predictor.init_state(clip)
        predictor.add_new_points_or_box(state, 0, 1, points=[[40, 30]], labels=[1])
        masks = [m for _, _, m in predictor.propagate_in_video(state)]
        predictor.add_new_mask(state, 0, 1, new_mask)  # frame 0's memory rewritten; every frame re-reads it
        masks += [m for _, _, m in predictor.propagate_in_video(state)]
        assert (masks[0] - masks[6]).abs().max() > 1.0
        if predictor.cache_memory_keys:
            track = state.objects[1]
            assert track.key_caches and len(track.key_caches) <= model.tracking.num_maskmem
            for frame, key_cache in track.key_caches.items():  # every cache is of its frame's current memory
                memory = track.cond.get(frame) or track.tracked.get(frame)
                assert key_cache.keys is None or key_cache.memory is memory.maskmem_features
        results.append(torch.stack(masks))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)
