"""Two-way transformer of the SAM mask decoder: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally to a smaller inner width."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fold: bool = True) -> torch.Tensor:
        """q: (Bq, Nq, C), k and v: (Bk, Nk, C) -> (B, Nq, C), where a batch of 1 broadcasts.

        Inputs shared by every prompt (the image tokens of the first layer) arrive with batch 1
        and are projected once, not once per prompt. When a handful of prompt tokens attend to
        thousands of per-prompt image tokens, the key and value projections are folded into the
        few queries instead (`_few_queries`): the same sums in another order, about half the work.
        `fold_projections = False` keeps the plain path, the parity reference; `fold=False` does
        so for one call (a batch of prompt sets each on its own image then computes every set
        exactly as it is computed alone, where a batch of 1 never folds).
        """
        head_dim = self.internal_dim // self.num_heads
        if fold and self.fold_projections and q.shape[0] == k.shape[0] > 1 and q.shape[1] < head_dim <= k.shape[1]:
            return self._few_queries(q, k, v)
        return self._standard(q, k, v)

    fold_projections = True

    def _standard(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        batch = max(q.shape[0], k.shape[0])
        if q.shape[0] != batch:
            q = q.expand(batch, -1, -1, -1)
        if k.shape[0] != batch:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        batch, heads, tokens, head_dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))

    def _per_head(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's weight as (heads, head_dim, C_in) and bias as (heads, head_dim)."""
        heads = self.num_heads
        return (
            linear.weight.view(heads, -1, linear.weight.shape[1]),
            linear.bias.view(heads, -1),
        )

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries (prompt tokens) over many keys (image tokens), e.g. 7 over 4096.

        q.(W_k x + b_k) = (W_k^T q).x + q.b_k, and the last term is constant along the softmax
        axis, so it drops out. With softmax weights p summing to 1, sum_j p_j (W_v x_j + b_v) =
        W_v (sum_j p_j x_j) + b_v. No image token is ever projected.
        """
        batch, num_queries, _ = q.shape
        heads = self.num_heads
        query_heads = self._heads(self.q_proj(q))  # (B, H, Nq, d)
        w_k, _ = self._per_head(self.k_proj)
        w_v, b_v = self._per_head(self.v_proj)
        scale = query_heads.shape[-1] ** -0.5
        folded = torch.einsum("bhid,hdc->bhic", query_heads * scale, w_k)  # (B, H, Nq, C)
        logits = folded.reshape(batch, heads * num_queries, -1) @ k.transpose(1, 2)  # (B, H*Nq, Nk)
        context = logits.softmax(dim=-1) @ v  # (B, H*Nq, C)
        context = context.view(batch, heads, num_queries, -1)
        out = torch.einsum("bhic,hdc->bihd", context, w_v) + b_v  # (B, Nq, H, d)
        return self.out_proj(out.reshape(batch, num_queries, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Self-attention on tokens, token->image cross-attention, MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
        fold: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            # The first layer replaces the tokens outright: they are still the raw prompt embeddings.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        # The image tokens do not change until the end of the block, so their positional sum
        # serves both cross-attentions.
        keys_with_pe = keys + key_pe
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, keys_with_pe, keys, fold))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys_with_pe, q, queries, fold))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=index == 0,
            )
            for index in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
        fold_projections: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: (B, C, h, w); point_embedding: (B, N, C).
        Returns the processed tokens (B, N, C) and image tokens (B, h*w, C).
        fold_projections=False: never fold key/value projections (see `Attention.forward`)."""
        # Tokens-last and contiguous once here, so no projection below copies them again.
        # image_embedding may have batch 1 (shared by all prompts) and image_pe always does.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, fold_projections)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys, fold_projections))
        return queries, keys
