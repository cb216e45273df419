"""SAM 3 LiteText (EfficientSAM3): SAM 3 with a MobileCLIP "MCT" text encoder in place of the 24-layer
CLIP one, as transformers' `Sam3LiteTextModel`. Only the text encoder differs; the image model,
heads and checkpoint names are SAM 3's.

The encoder is bidirectional (padding keys masked out), its first and last layers are RepMixer blocks
(depthwise convolutions along the sequence with batch norm and layer scale), the others pre-norm
transformer layers. Its position table (77 slots) is resized bilinearly to the 32-token prompt, as
transformers does. Parameter names are transformers' (`text_encoder.*`): no Meta checkpoint of this
model exists (Meta's sam3 has none), so there is no other layout to follow.

`LiteTextEncoder` has the interface of `sam.sam3.text.TextEncoder`: token ids (B, L), 0 for
padding -> (features (B, L, d_model), valid (B, L)); `encoder.*` is the MCT model, `resizer` the
width -> d_model projection (transformers' `text_projection`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _batch_norm(width: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(width)


class PositionEmbedding(nn.Module):
    def __init__(self, max_positions: int, width: int) -> None:
        super().__init__()
        self.position_embedding = nn.Parameter(torch.randn(1, 1, max_positions, width) * width**-0.5)

    def forward(self, length: int) -> torch.Tensor:
        table = self.position_embedding
        if length != table.shape[2]:
            table = F.interpolate(table, size=(length, table.shape[-1]), mode="bilinear", align_corners=False)
        return table.reshape(1, length, -1)


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = PositionEmbedding(max_positions, width)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.token_embedding(token_ids)
        return tokens + self.position_embedding(token_ids.shape[1]).to(tokens.dtype)


class MobileOneBlock(nn.Module):
    """Depthwise (1, k) convolution with batch norm, plus a batch-normed skip."""

    def __init__(self, width: int, kernel_size: int) -> None:
        super().__init__()
        self.batchnorm_skip = _batch_norm(width)
        self.conv = nn.Conv2d(width, width, (1, kernel_size), padding=(0, kernel_size // 2), groups=width, bias=False)
        self.batchnorm_conv = _batch_norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.batchnorm_conv(self.conv(x)) + self.batchnorm_skip(x)


class RepMixer(nn.Module):
    def __init__(self, width: int, kernel_size: int, layer_scale: float) -> None:
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((width, 1, 1), layer_scale))
        self.reference_batchnorm = _batch_norm(width)
        self.mixer = MobileOneBlock(width, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.reference_batchnorm(x))


class ConvMlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(width, mlp_dim, kernel_size=1)
        self.fc2 = nn.Conv2d(mlp_dim, width, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvFeedForward(nn.Module):
    def __init__(self, width: int, mlp_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise_conv = nn.Conv2d(width, width, (1, kernel_size), padding=(0, kernel_size // 2), groups=width, bias=False)
        self.depthwise_batchnorm = _batch_norm(width)
        self.mlp = ConvMlp(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.depthwise_batchnorm(self.depthwise_conv(x)))


class RepMixerBlock(nn.Module):
    """Token mixing by convolution along the sequence (it sees padding tokens too, as the reference
    does), then a convolutional feed-forward, each with a layer-scaled residual."""

    def __init__(self, width: int, mlp_dim: int, kernel_size: int, layer_scale: float) -> None:
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((width, 1, 1), layer_scale))
        self.token_mixer = RepMixer(width, kernel_size, layer_scale)
        self.conv_feed_forward = ConvFeedForward(width, mlp_dim, kernel_size)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, L)
        x = self.token_mixer(x)
        x = x + self.layer_scale * self.conv_feed_forward(x)
        return x.squeeze(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             attn_mask=valid[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer, bidirectional over the valid tokens."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), valid)
        return x + self.mlp(self.layer_norm2(x))


class MobileClipText(nn.Module):
    """The MCT text transformer: token ids (B, L) -> token features (B, L, width)."""

    def __init__(self, vocab_size: int, max_positions: int, width: int, layers: int, heads: int, mlp_dim: int,
                 output_dim: int, repmixer_blocks: bool = True, kernel_size: int = 11, layer_scale: float = 1e-5,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab_size, max_positions, width)
        mixers = {0, layers - 1} if repmixer_blocks else set()
        self.layers = nn.ModuleList(
            RepMixerBlock(width, mlp_dim, kernel_size, layer_scale) if i in mixers else EncoderLayer(width, heads, mlp_dim, eps)
            for i in range(layers)
        )
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)
        # The pooled projection; kept so checkpoints load strictly (SAM 3 uses the token features).
        self.projection = nn.Linear(width, output_dim, bias=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        valid = token_ids != 0
        x = self.embeddings(token_ids)
        for layer in self.layers:
            x = layer(x, valid)
        return self.final_layer_norm(x)


class LiteTextEncoder(nn.Module):
    """Drop-in for `TextEncoder` (`Sam3Image.backbone.language_backbone`)."""

    def __init__(self, d_model: int, context_length: int, **text) -> None:
        super().__init__()
        self.context_length = context_length
        self.encoder = MobileClipText(**text)
        self.resizer = nn.Linear(text["width"], d_model)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resizer(self.encoder(token_ids)), token_ids != 0


def lite_text_options(text_config: dict) -> dict:
    """A transformers `Sam3LiteTextTextConfig` dict -> MobileClipText's arguments."""
    if text_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"SAM 3 LiteText's text encoder uses exact GELU; this config says {text_config['hidden_act']!r}")
    return dict(
        vocab_size=text_config.get("vocab_size", 49408), max_positions=text_config.get("max_position_embeddings", 77),
        width=text_config.get("hidden_size", 512), layers=text_config.get("num_hidden_layers", 12),
        heads=text_config.get("num_attention_heads", 8), mlp_dim=text_config.get("intermediate_size", 2048),
        output_dim=text_config.get("projection_dim", 512), repmixer_blocks=text_config.get("use_repmixer_blocks", True),
        kernel_size=text_config.get("repmixer_kernel_size", 11), layer_scale=text_config.get("layer_scale_init_value", 1e-5),
        eps=text_config.get("layer_norm_eps", 1e-5),
    )
