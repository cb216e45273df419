"""Faster Grounding DINO inference on transformers' model and weights.

:class:`FastGroundingDino` runs a loaded ``GroundingDinoForObjectDetection`` (left unchanged)
with switchable speed-ups (:class:`Speedups`): deformable attention as one weighted gather,
folded image-text fusion, ``scaled_dot_product_attention``, proposal boxes for the kept
queries only, and caches of text-encoder outputs and per-size geometry. Results equal
transformers' forward up to float rounding. ``GroundingDinoDetector(fast=...)`` uses it.
"""

from langsam.gdino_fast.attention import fused_image_text_attention, sdpa_attention
from langsam.gdino_fast.deformable_attention import multi_scale_deformable_attention
from langsam.gdino_fast.runner import FastGroundingDino, GroundingOutputs, Speedups, unsupported_reason

__all__ = [
    "FastGroundingDino",
    "GroundingOutputs",
    "Speedups",
    "fused_image_text_attention",
    "multi_scale_deformable_attention",
    "sdpa_attention",
    "unsupported_reason",
]
