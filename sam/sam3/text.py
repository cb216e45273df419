"""SAM 3's text encoder (a CLIP text transformer) and its tokenizer.

Names follow Meta's `sam3.pt` under `detector.backbone.language_backbone.`: `encoder.token_embedding`,
`encoder.positional_embedding` (context, width), `encoder.transformer.resblocks.N.{ln_1, attn.in_proj_*,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `encoder.ln_final`, `encoder.text_projection` (width, out;
kept for loading, SAM 3 does not use the pooled output) and `resizer` (width -> d_model).
The tokenizer is CLIP's BPE from open_clip (`bpe_simple_vocab_16e6.txt.gz` ships in its wheel).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from .layers import FusedAttention


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = FusedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, mlp_dim)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_dim, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, causal=True)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class TextTransformer(nn.Module):
    """Causal CLIP text transformer: token ids (B, L) -> token features (B, L, width)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, mlp_dim: int, output_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads, mlp_dim)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        length = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]
        return self.ln_final(self.transformer(x))


class TextEncoder(nn.Module):
    """Meta's `VETextEncoder`: token ids (B, L), 0 for padding -> (features (B, L, d_model),
    valid (B, L) bool). Causal attention means padding never reaches a real token."""

    def __init__(self, d_model: int, vocab_size: int, context_length: int, width: int, layers: int, heads: int, mlp_dim: int, output_dim: int):
        super().__init__()
        self.context_length = context_length
        self.encoder = TextTransformer(vocab_size, context_length, width, layers, heads, mlp_dim, output_dim)
        self.resizer = nn.Linear(width, d_model)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resizer(self.encoder(token_ids)), token_ids != 0


@lru_cache(maxsize=1)
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: Sequence[str], context_length: int = 32) -> torch.Tensor:
    """CLIP BPE ids (len(texts), context_length): start token, words, end token, zero padding;
    long phrases are cut so the end token stays (as Meta's tokenizer does)."""
    return _clip_bpe()(list(texts), context_length=context_length)
