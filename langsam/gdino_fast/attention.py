"""Grounding DINO's dense attentions, computed from the weights of transformers' modules.

* :func:`fused_image_text_attention`: the encoder's image-text fusion
  (``GroundingDinoBiMultiHeadAttention``). The caption has a few dozen tokens and the image
  ~20k, so the vision-side projections (query, value and output, each 256 <-> 1024 wide) are
  folded into the text side: per head, ``(v Wq^T) k^T = v (Wq^T k^T)`` and
  ``(P vt) Wo^T = P (vt Wo^T)``, and the text side's ``P^T (v Wv^T + b) = (P^T v) Wv^T +
  (P^T 1) b``. Three ``(20k x 256) @ (256 x 1024)`` products become ``(20k x 256) @ (256 x
  heads * tokens)`` ones. The softmax steps (global shift, clamp, masks) are transformers'.
* :func:`sdpa_attention`: ``GroundingDinoMultiheadAttention`` (text self-attention, decoder
  self- and text cross-attention) through ``scaled_dot_product_attention``.

Both equal transformers' modules up to float rounding; the tests compare them on random weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fused_image_text_attention", "sdpa_attention", "additive_mask"]

# transformers clamps the fusion logits to this range ("data type half has quite limited range").
_FUSION_CLAMP = 50000.0


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask (True = may attend) -> additive float mask, 0 or the dtype's minimum, as
    transformers builds it for ``GroundingDinoMultiheadAttention``."""
    return (~allowed).to(dtype) * torch.finfo(dtype).min


def sdpa_attention(module: nn.Module, queries: Tensor, keys: Tensor, values: Tensor,
                   mask: Tensor | None = None) -> Tensor:
    """``GroundingDinoMultiheadAttention.forward`` through ``scaled_dot_product_attention``.

    Args:
        module: the transformers module (its ``query``/``key``/``value``/``out_proj`` weights).
        queries: ``(B, Tq, C)``; keys, values: ``(B, Tk, C)``.
        mask: additive float mask broadcastable to ``(B, heads, Tq, Tk)`` (see
            :func:`additive_mask`), or None.

    Returns:
        ``(B, Tq, C)``, the module's first output (its attention probabilities are not formed).
    """
    batch, length, _ = queries.shape
    heads, head_dim = module.num_attention_heads, module.attention_head_size

    def split(states: Tensor) -> Tensor:
        return states.view(batch, -1, heads, head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(split(module.query(queries)), split(module.key(keys)),
                                             split(module.value(values)), attn_mask=mask)
    return module.out_proj(context.transpose(1, 2).reshape(batch, length, heads * head_dim))


def fused_image_text_attention(module: nn.Module, vision: Tensor, text: Tensor, vision_padding: Tensor | None,
                               text_padding: Tensor | None) -> tuple[Tensor, Tensor]:
    """``GroundingDinoBiMultiHeadAttention.forward`` with the vision-side projections folded.

    Args:
        module: the transformers module (weights only are read).
        vision: ``(B, N, Cv)`` image tokens (all levels); text: ``(B, T, Ct)`` caption tokens.
        vision_padding: ``(B, N)`` True at padding pixels, or None; text_padding: ``(B, T)``
            True at padding tokens, or None.

    Returns:
        ``(vision_delta (B, N, Cv), text_delta (B, T, Ct))``: the module's two attention
        outputs (after ``out_vision_proj`` / ``out_text_proj``).
    """
    batch, pixels, vision_dim = vision.shape
    tokens = text.shape[1]
    heads, head_dim = module.num_heads, module.head_dim

    # Logits per (pixel, head, token): v . (scale Wq_h^T k_ht) + scale bq_h . k_ht.
    keys = module.text_proj(text).view(batch, tokens, heads, head_dim)
    query_weight = module.vision_proj.weight.view(heads, head_dim, vision_dim)
    folded_query = torch.einsum("hev,bthe->bvht", query_weight, keys) * module.scale  # (B, Cv, h, T)
    logits = torch.matmul(vision, folded_query.reshape(batch, vision_dim, heads * tokens))
    logits = logits.view(batch, pixels, heads, tokens)
    if module.vision_proj.bias is not None:
        query_bias = module.vision_proj.bias.view(heads, head_dim)
        logits = logits + (torch.einsum("he,bthe->bht", query_bias, keys) * module.scale)[:, None]

    # transformers' numerics: one global shift, a clamp, then for the text side a shift per
    # (head, token) over pixels and another clamp, before the masks.
    logits = (logits - logits.max()).clamp_(-_FUSION_CLAMP, _FUSION_CLAMP)
    text_logits = (logits - logits.amax(dim=1, keepdim=True)).clamp_(-_FUSION_CLAMP, _FUSION_CLAMP)
    if vision_padding is not None:
        text_logits = text_logits.masked_fill(vision_padding[:, :, None, None], float("-inf"))
    text_probs = text_logits.softmax(dim=1)  # over pixels, (B, N, h, T)
    if text_padding is not None:
        logits = logits.masked_fill(text_padding[:, None, None, :], float("-inf"))
    vision_probs = logits.softmax(dim=-1)  # over tokens, (B, N, h, T)

    # Image side: P_h (vt_h Wo_h^T), summed over heads, + bo.
    text_values = module.values_text_proj(text).view(batch, tokens, heads, head_dim)
    out_weight = module.out_vision_proj.weight.view(vision_dim, heads, head_dim)
    folded_out = torch.einsum("bthe,vhe->bhtv", text_values, out_weight).reshape(batch, heads * tokens, vision_dim)
    vision_delta = torch.matmul(vision_probs.view(batch, pixels, heads * tokens), folded_out)
    if module.out_vision_proj.bias is not None:
        vision_delta = vision_delta + module.out_vision_proj.bias

    # Text side: (P_h^T v) Wv_h^T + (P_h^T 1) bv_h, then out_text_proj.
    flat_probs = text_probs.view(batch, pixels, heads * tokens)
    pooled = torch.matmul(flat_probs.transpose(1, 2), vision).view(batch, heads, tokens, vision_dim)
    value_weight = module.values_vision_proj.weight.view(heads, head_dim, vision_dim)
    text_heads = torch.einsum("bhtv,hev->bthe", pooled, value_weight)
    if module.values_vision_proj.bias is not None:
        mass = flat_probs.sum(dim=1).view(batch, heads, tokens).transpose(1, 2)  # (B, T, h), ~1
        text_heads = text_heads + mass[..., None] * module.values_vision_proj.bias.view(heads, head_dim)
    text_delta = module.out_text_proj(text_heads.reshape(batch, tokens, heads * head_dim))
    return vision_delta, text_delta
