"""The SAM 3 image model (Meta's `Sam3Image` detector): config, parts, and the three passes a
predictor calls: `encode_image` (once per image), `encode_text` (once per query) and `decode`
(per prompt, cheap)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .backbone import ViT, VisionBackbone
from .detr import FusionEncoder, QueryDecoder
from .geometry import GeometryEncoder
from .heads import DotProductScoring, SegmentationHead
from .text import TextEncoder


@dataclass
class Sam3Config:
    """Sizes of a SAM 3 image model; the defaults are Meta's released `sam3.pt` (840M parameters)."""

    image_size: int = 1008
    patch_size: int = 14
    pretrain_image_size: int = 336
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_dim: int = 4736
    window_size: int = 24
    global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    vit_eps: float = 1e-5
    rope_theta: float = 10000.0
    scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 32
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_mlp_dim: int = 4096
    text_output_dim: int = 512
    geometry_layers: int = 3
    roi_size: int = 7
    point_projections: bool = True
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200
    pixel_decoder_stages: int = 3
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.global_blocks = tuple(int(i) for i in self.global_blocks)
        self.scale_factors = tuple(float(s) for s in self.scale_factors)
        if not self.global_blocks or max(self.global_blocks) >= self.vit_depth:
            raise ValueError(f"global_blocks {self.global_blocks} must name blocks below vit_depth={self.vit_depth}")

    def to_dict(self) -> dict:
        return asdict(self)


class ImageFeatures(NamedTuple):
    """The cached image pass: backbone levels (B, d, h, w), finest first, and their sine positions."""

    feats: list[torch.Tensor]
    pos: list[torch.Tensor]


class ImageTerms(NamedTuple):
    """The prompt-independent parts of `Sam3Image.decode` for one image (`Sam3Image.image_terms`),
    computed once per image and passed to every decode on it: the pixel decoder's conv(skip)
    halves, the DETR encoder's first self-attention half (1, HW, C), the exemplar encoder's
    output for a prompt without boxes (its cls token attends to the image alone): tokens (1, 1, C)
    and valid (1, 1), and the DETR decoder's first box bias (1, heads, 1 + Q, HW)."""

    skip_terms: list[torch.Tensor]
    first_self: torch.Tensor
    no_box_prompt: tuple[torch.Tensor, torch.Tensor]
    first_bias: torch.Tensor


class Sam3Backbone(nn.Module):
    """Meta's `SAM3VLBackbone`: `vision_backbone` (ViT + neck) and `language_backbone` (text encoder)."""

    def __init__(self, config: Sam3Config) -> None:
        super().__init__()
        c = config
        trunk = ViT(c.image_size, c.patch_size, c.pretrain_image_size, c.vit_dim, c.vit_depth, c.vit_heads,
                    c.vit_mlp_dim, c.window_size, c.global_blocks, c.rope_theta, c.vit_eps)
        self.vision_backbone = VisionBackbone(trunk, c.vit_dim, c.d_model, c.scale_factors)
        self.language_backbone = TextEncoder(c.d_model, c.vocab_size, c.context_length, c.text_width,
                                             c.text_layers, c.text_heads, c.text_mlp_dim, c.text_output_dim)


class Sam3Image(nn.Module):
    """SAM 3's concept detector + segmenter. `state_dict()` keys are Meta's `sam3.pt` keys without
    the `detector.` prefix."""

    def __init__(self, config: Sam3Config) -> None:
        super().__init__()
        c = self.config = config
        self.backbone = Sam3Backbone(c)
        self.geometry_encoder = GeometryEncoder(c.d_model, c.geometry_layers, c.num_heads, c.ffn_dim, c.roi_size, c.point_projections)
        self.transformer = nn.Module()
        self.transformer.encoder = FusionEncoder(c.d_model, c.encoder_layers, c.num_heads, c.ffn_dim)
        self.transformer.decoder = QueryDecoder(c.d_model, c.decoder_layers, c.num_heads, c.ffn_dim, c.num_queries)
        self.dot_prod_scoring = DotProductScoring(c.d_model, c.ffn_dim)
        self.segmentation_head = SegmentationHead(c.d_model, c.num_heads, c.pixel_decoder_stages)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels (B, 3, S, S), S = config.image_size, normalised to [-1, 1]."""
        return ImageFeatures(*self.backbone.vision_backbone(pixels))

    def encode_text(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids (B, L) -> (features (B, L, d), valid (B, L))."""
        return self.backbone.language_backbone(token_ids)

    def decode(
        self,
        image: ImageFeatures,
        text: torch.Tensor,
        text_valid: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_labels: torch.Tensor | None = None,
        box_valid: torch.Tensor | None = None,
        skip_terms: list[torch.Tensor] | None = None,
        exemplar_token: bool = True,
        image_terms: ImageTerms | None = None,
    ) -> dict[str, torch.Tensor]:
        """One prompt per batch row: text (B, L, d) with text_valid (B, L), optional exemplar boxes
        (B, N, 4) cxcywh in [0, 1] with labels (B, N) (1 positive, 0 negative) and box_valid (B, N).
        `skip_terms`: the image's `pixel_skip_terms(image)`, to reuse across prompts; `image_terms`:
        the image's `image_terms(image)` (its skip terms and more), the same values computed once.

        Returns `logits` (B, Q), `presence` (B,) logits, `boxes` (B, Q, 4) cxcywh in [0, 1] and
        `masks` (B, Q, h, w) logits at the finest backbone level. exemplar_token=False: a prompt without
        boxes is the text alone (transformers' `Sam3Model`); by default the exemplar encoder still runs
        and its cls token joins the prompt, as in Meta's model."""
        feats, pos = image
        batch = text.shape[0]
        if feats[0].shape[0] != batch:
            feats = [f.expand(batch, -1, -1, -1) for f in feats]
            pos = [p.expand(batch, -1, -1, -1) for p in pos]
        if boxes is None:
            boxes = text.new_zeros(batch, 0, 4)
            box_labels = torch.zeros(batch, 0, dtype=torch.long, device=text.device)
        if box_valid is None:
            box_valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=text.device)
        first_self = first_bias = None
        if image_terms is not None:
            skip_terms, first_self, first_bias = image_terms.skip_terms, image_terms.first_self, image_terms.first_bias
        if boxes.shape[1] == 0 and not exemplar_token:
            prompt, prompt_valid = text, text_valid
        else:
            if boxes.shape[1] == 0 and image_terms is not None:
                geo, geo_valid = (t.expand(batch, *t.shape[1:]) for t in image_terms.no_box_prompt)
            else:
                geo, geo_valid = self.geometry_encoder(boxes, box_labels, box_valid, feats[-1], pos[-1])
            prompt = torch.cat((text, geo), dim=1)
            prompt_valid = torch.cat((text_valid, geo_valid), dim=1)
        size = feats[-1].shape[-2:]
        memory = feats[-1].flatten(2).transpose(1, 2)
        memory_pos = pos[-1].flatten(2).transpose(1, 2)
        memory = self.transformer.encoder(memory, memory_pos, prompt, prompt_valid, first_self)
        queries, pred_boxes, presence = self.transformer.decoder(memory, memory_pos, size, prompt, prompt_valid, first_bias)
        logits = self.dot_prod_scoring(queries, prompt, prompt_valid)
        masks = self.segmentation_head(queries, feats, memory, prompt, prompt_valid, skip_terms)
        return {"logits": logits, "presence": presence, "boxes": pred_boxes, "masks": masks}

    def pixel_skip_terms(self, image: ImageFeatures) -> list[torch.Tensor]:
        """The prompt-independent half of the mask head's pixel decoder for this image (batch of
        the image pass): computed once, passed to every `decode` on the image."""
        return self.segmentation_head.pixel_decoder.skip_terms(image.feats)

    def image_terms(self, image: ImageFeatures) -> ImageTerms:
        """Everything `decode` computes before it first reads the prompt, for this image (batch 1):
        computed once, passed to every `decode` on the image as `image_terms`."""
        feats, pos = image
        memory = feats[-1].flatten(2).transpose(1, 2)
        memory_pos = pos[-1].flatten(2).transpose(1, 2)
        no_boxes = memory.new_zeros(memory.shape[0], 0, 4)
        no_labels = torch.zeros(memory.shape[0], 0, dtype=torch.long, device=memory.device)
        no_valid = torch.ones(memory.shape[0], 0, dtype=torch.bool, device=memory.device)
        return ImageTerms(
            skip_terms=self.pixel_skip_terms(image),
            first_self=self.transformer.encoder.image_terms(memory, memory_pos),
            no_box_prompt=self.geometry_encoder(no_boxes, no_labels, no_valid, feats[-1], pos[-1]),
            first_bias=self.transformer.decoder.first_bias(*feats[-1].shape[-2:]),
        )
