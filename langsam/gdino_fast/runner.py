"""A faster forward pass for transformers' ``GroundingDinoForObjectDetection``, same weights.

:class:`FastGroundingDino` wraps a loaded model without changing it (no method is replaced, the
module tree and state dict stay transformers'), and runs the detection forward pass itself,
module by module, with these optional speed-ups (:class:`Speedups`; each can be switched off,
and with all off the result is transformers' own forward, bit for bit):

* ``deformable_attention``: multi-scale deformable attention as one weighted gather
  (:mod:`langsam.gdino_fast.deformable_attention`) instead of one ``grid_sample`` per level.
* ``fused_fusion``: the image-text fusion with its vision-side projections folded into the text
  side (:func:`~langsam.gdino_fast.attention.fused_image_text_attention`).
* ``sdpa``: text self-attention and the decoder's self- and text cross-attention through
  ``scaled_dot_product_attention``.
* ``proposals_first``: the first-stage box head runs on the ``num_queries`` kept proposals
  only, not on every pixel of every level.
* ``text_cache``: the text encoder (BERT + projection) output of recent captions, so a caption
  sent with many images is encoded once.
* ``geometry_cache``: what depends only on the input size (masks, sine position embeddings,
  reference points, first-stage proposal boxes) for recent sizes.

Only the detection outputs are computed (``logits`` and ``pred_boxes`` of the last decoder
layer); transformers' intermediate and auxiliary outputs are not. Inference only.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from langsam.gdino_fast.attention import additive_mask, fused_image_text_attention, sdpa_attention
from langsam.gdino_fast.deformable_attention import deformable_attention_pixels

logger = logging.getLogger(__name__)

__all__ = ["FastGroundingDino", "GroundingOutputs", "Speedups", "TextEncoding", "unsupported_reason"]

# [CLS], [SEP], "." and "?" in bert-base-uncased: the tokens that close a phrase.
_PHRASE_END_TOKENS = (101, 102, 1012, 1029)


@dataclass(frozen=True)
class Speedups:
    """Which speed-ups :class:`FastGroundingDino` uses (all on by default).

    ``text_cache`` and ``geometry_cache`` are entry counts (0 turns the cache off).
    """

    deformable_attention: bool = True
    fused_fusion: bool = True
    sdpa: bool = True
    proposals_first: bool = True
    text_cache: int = 32
    geometry_cache: int = 8

    @classmethod
    def none(cls) -> "Speedups":
        """Everything off: transformers' computation, step by step."""
        return cls(deformable_attention=False, fused_fusion=False, sdpa=False, proposals_first=False,
                   text_cache=0, geometry_cache=0)

    def but(self, **changes: Any) -> "Speedups":
        """A copy with some switches changed: ``Speedups().but(sdpa=False)``."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown speed-up(s) {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return Speedups(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


class GroundingOutputs(NamedTuple):
    """What transformers' post-processing reads from a forward pass.

    logits: ``(B, num_queries, max_text_len)`` token logits (``-inf`` past the caption);
    pred_boxes: ``(B, num_queries, 4)`` boxes as normalised ``(cx, cy, w, h)`` of the unpadded image.
    """

    logits: Tensor
    pred_boxes: Tensor


class TextEncoding(NamedTuple):
    """Captions after the text encoder (what :meth:`FastGroundingDino.encode_captions` returns)."""

    features: Tensor  # (B, T, d_model) text_projection(BERT(...))
    token_mask: Tensor  # (B, T) bool, True for real tokens
    self_mask: Tensor  # (B, T, T) bool, True where token i may attend to token j
    position_embedding: Tensor  # (B, T, d_model) sine embedding of the phrase positions


class _Geometry(NamedTuple):
    """Everything that depends on the input size and padding only."""

    spatial_shapes: list[tuple[int, int]]
    padding: Tensor | None  # (B, S) True at padding positions, None when there is none
    position_embedding: list[Tensor]  # per level (B, h*w, d_model), without the level embedding
    valid_ratios: Tensor  # (B, L, 2)
    reference_points: Tensor  # (B, S, L, 2) encoder reference points
    proposals: Tensor  # (B, S, 4) first-stage proposal boxes (inverse sigmoid; inf where unusable)
    proposal_valid: Tensor  # (B, S, 1) bool


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`FastGroundingDino` cannot run ``model`` (None when it can)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or not hasattr(inner, "encoder") or not hasattr(inner, "decoder"):
        return "not a transformers GroundingDinoForObjectDetection"
    if not getattr(config, "two_stage", False):
        return "only two-stage Grounding DINO (as released) is supported"
    if getattr(config, "query_dim", 4) != 4:
        return "only 4-D (box) queries are supported"
    needed = ["backbone", "input_proj_vision", "level_embed", "text_backbone", "text_projection", "enc_output",
              "enc_output_norm", "encoder_output_bbox_embed", "encoder_output_class_embed"]
    if getattr(config, "embedding_init_target", True):
        needed.append("query_position_embeddings")
    missing = [name for name in needed if not hasattr(inner, name)]
    if missing:
        return f"this transformers version's GroundingDinoModel lacks {missing}"
    return None


class FastGroundingDino:
    """Runs a transformers ``GroundingDinoForObjectDetection`` faster, with the same weights.

    Args:
        model: the loaded model (eval mode; it is read, never modified).
        speedups: which speed-ups to use (:class:`Speedups`; default all).

    Call it like the model, on tensors the processor made (it runs under
    ``torch.inference_mode()``; the outputs are inference tensors)::

        fast = FastGroundingDino(model)
        outputs = fast(pixel_values, input_ids, attention_mask=..., pixel_mask=...)
        processor.post_process_grounded_object_detection(outputs, input_ids, ...)

    The caches hold tensors computed from the weights (text features): call
    :meth:`clear_cache` after changing the model's weights.
    """

    def __init__(self, model: nn.Module, speedups: Speedups | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastGroundingDino cannot run this model: {reason}")
        self.model = model
        self.speedups = speedups if speedups is not None else Speedups()
        self._text_cache: OrderedDict[tuple, TextEncoding] = OrderedDict()
        self._geometry_cache: OrderedDict[tuple, _Geometry] = OrderedDict()
        self._lock = threading.Lock()
        self.text_encodings = 0  # how many times the text encoder ran (tests read it)
        self._mask_rank = 0  # 4 or 3 once known: how this transformers version's BERT takes the mask

    def clear_cache(self) -> None:
        with self._lock:
            self._text_cache.clear()
            self._geometry_cache.clear()

    # ------------------------------------------------------------------ public
    def __call__(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, pixel_mask: Tensor | None = None) -> GroundingOutputs:
        """Detection forward pass.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images (the processor's output).
            input_ids, attention_mask, token_type_ids: ``(B, T)`` the tokenized captions.
            pixel_mask: ``(B, H, W)`` 1 on image pixels, 0 on padding (None: no padding).

        Returns:
            :class:`GroundingOutputs` (``logits``, ``pred_boxes``) of the last decoder layer.
        """
        if self.model.training:
            raise ValueError("FastGroundingDino is for inference: call model.eval() first")
        if pixel_values.dim() != 4 or input_ids.dim() != 2:
            raise ValueError(f"expected pixel_values (B, 3, H, W) and input_ids (B, T), got shapes "
                             f"{tuple(pixel_values.shape)} and {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        with torch.inference_mode():
            text = self._encode_text(input_ids, attention_mask, token_type_ids)
            return self._forward_from_text(pixel_values, pixel_mask, text)

    def encode_captions(self, input_ids_list: list[Tensor],
                        token_type_ids_list: list[Tensor] | None = None) -> TextEncoding:
        """Text encoder outputs for several unpadded captions ``(1, T_i)``, padded to one batch.

        Each caption is encoded alone (and cached), so a caption gives the same features in any
        batch; padding tokens never reach a real token's result (they are masked everywhere).
        """
        if token_type_ids_list is None:
            token_type_ids_list = [torch.zeros_like(ids) for ids in input_ids_list]
        with torch.inference_mode():
            parts = [self._encode_text(ids, torch.ones_like(ids), types)
                     for ids, types in zip(input_ids_list, token_type_ids_list)]
            return _pad_texts(parts)

    def forward_batch(self, pixel_values: Tensor, text: TextEncoding,
                      pixel_mask: Tensor | None = None) -> GroundingOutputs:
        """Forward pass for a batch whose captions come from :meth:`encode_captions`."""
        if self.model.training:
            raise ValueError("FastGroundingDino is for inference: call model.eval() first")
        with torch.inference_mode():
            return self._forward_from_text(pixel_values, pixel_mask, text)

    # ------------------------------------------------------------------ text
    def _encode_text(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> TextEncoding:
        key = None
        if self.speedups.text_cache > 0:
            key = (input_ids.shape, tuple(input_ids.flatten().tolist()), tuple(attention_mask.flatten().tolist()),
                   tuple(token_type_ids.flatten().tolist()), str(input_ids.device), self._dtype)
            with self._lock:
                cached = self._text_cache.get(key)
                if cached is not None:
                    self._text_cache.move_to_end(key)
                    return cached
        inner = self.model.model
        max_text_len = self.model.config.max_text_len
        special = getattr(inner, "special_tokens", None)
        if special is None:
            special = torch.tensor(_PHRASE_END_TOKENS, device=input_ids.device)
        self_mask, position_ids = phrase_attention(input_ids, special.to(input_ids.device))
        input_ids, token_type_ids = input_ids[:, :max_text_len], token_type_ids[:, :max_text_len]
        token_mask = attention_mask[:, :max_text_len].bool()
        self_mask, position_ids = self_mask[:, :max_text_len, :max_text_len], position_ids[:, :max_text_len]
        features = inner.text_projection(self._text_backbone(input_ids, self_mask, token_type_ids, position_ids))
        position_embedding = sine_embedding(position_ids[..., None].to(features.dtype), self.model.config.d_model)
        text = TextEncoding(features, token_mask, self_mask, position_embedding)
        self.text_encodings += 1
        if key is not None:
            with self._lock:
                self._text_cache[key] = text
                while len(self._text_cache) > self.speedups.text_cache:
                    self._text_cache.popitem(last=False)
        return text

    def _text_backbone(self, input_ids: Tensor, self_mask: Tensor, token_type_ids: Tensor,
                       position_ids: Tensor) -> Tensor:
        """BERT with the phrase mask, given as the installed transformers' Grounding DINO gives it:
        ``(B, 1, T, T)`` in transformers 5, ``(B, T, T)`` in 4.x (whose BERT rejects 4-D masks)."""
        backbone = self.model.model.text_backbone
        arguments = {"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids,
                     "return_dict": True}
        if self._mask_rank != 3:
            try:
                encoded = backbone(attention_mask=self_mask[:, None], **arguments)
                self._mask_rank = 4
                return encoded.last_hidden_state
            except ValueError:
                if self._mask_rank == 4:
                    raise
                self._mask_rank = 3
        return backbone(attention_mask=self_mask, **arguments).last_hidden_state

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.model.text_projection.weight.dtype

    # ------------------------------------------------------------------ image
    def _forward_from_text(self, pixel_values: Tensor, pixel_mask: Tensor | None,
                           text: TextEncoding) -> GroundingOutputs:
        inner = self.model.model
        config = self.model.config
        batch, _, height, width = pixel_values.shape
        if text.features.shape[0] != batch:
            if text.features.shape[0] != 1:
                raise ValueError(f"{text.features.shape[0]} captions for {batch} images")
            text = TextEncoding(*(part.expand(batch, *part.shape[1:]) for part in text))
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)

        # Backbone (Swin) feature maps, projected to d_model; extra levels by strided convs.
        backbone_maps = inner.backbone.conv_encoder(pixel_values, pixel_mask)
        maps = [projection(feature_map) for projection, (feature_map, _) in zip(inner.input_proj_vision, backbone_maps)]
        for level in range(len(maps), config.num_feature_levels):
            source = backbone_maps[-1][0] if level == len(backbone_maps) else maps[-1]
            maps.append(inner.input_proj_vision[level](source))
        geometry = self._geometry(pixel_mask, [m.shape[-2:] for m in maps], maps[0].dtype)

        vision = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # (B, S, d)
        position = torch.cat([pos + inner.level_embed[level].view(1, 1, -1)
                              for level, pos in enumerate(geometry.position_embedding)], 1)
        vision, text_features = self._encode(vision, position, geometry, text)
        return self._decode(vision, text_features, geometry, text)

    def _geometry(self, pixel_mask: Tensor, level_shapes: list, dtype: torch.dtype) -> _Geometry:
        shapes = [(int(h), int(w)) for h, w in level_shapes]
        batch = pixel_mask.shape[0]
        if not bool(pixel_mask.all()):
            return _compute_geometry(self.model.model, pixel_mask, shapes, dtype, padded=True)
        # Without padding every image of the batch has the same geometry: compute it for one.
        key = (tuple(pixel_mask.shape[1:]), tuple(shapes), str(pixel_mask.device), dtype)
        with self._lock:
            geometry = self._geometry_cache.get(key)
            if geometry is not None:
                self._geometry_cache.move_to_end(key)
        if geometry is None:
            geometry = _compute_geometry(self.model.model, pixel_mask[:1], shapes, dtype, padded=False)
            if self.speedups.geometry_cache > 0:
                with self._lock:
                    self._geometry_cache[key] = geometry
                    while len(self._geometry_cache) > self.speedups.geometry_cache:
                        self._geometry_cache.popitem(last=False)
        if batch == 1:
            return geometry
        return geometry._replace(
            position_embedding=[pos.expand(batch, -1, -1) for pos in geometry.position_embedding],
            valid_ratios=geometry.valid_ratios.expand(batch, -1, -1),
            reference_points=geometry.reference_points.expand(batch, -1, -1, -1),
            proposals=geometry.proposals.expand(batch, -1, -1),
            proposal_valid=geometry.proposal_valid.expand(batch, -1, -1),
        )

    # ------------------------------------------------------------------ encoder
    def _encode(self, vision: Tensor, position: Tensor, geometry: _Geometry,
                text: TextEncoding) -> tuple[Tensor, Tensor]:
        fast = self.speedups
        text_features = text.features
        text_padding = ~text.token_mask
        text_mask = additive_mask(text.self_mask[:, None], text_features.dtype)  # (B, 1, T, T)
        scratch = None  # the feed-forward hidden state's buffer, shared by the layers
        for layer in self.model.model.encoder.layers:
            fusion = layer.fusion_layer
            if fast.fused_fusion:
                vision_normed = fusion.layer_norm_vision(vision)
                text_normed = fusion.layer_norm_text(text_features)
                vision_delta, text_delta = fused_image_text_attention(
                    fusion.attn, vision_normed, text_normed, geometry.padding, text_padding)
                vision = vision_normed + fusion.vision_param * vision_delta
                text_features = text_normed + fusion.text_param * text_delta
            else:
                padding = geometry.padding if geometry.padding is not None else torch.zeros(
                    vision.shape[:2], dtype=torch.bool, device=vision.device)
                (vision, _), (text_features, _) = fusion(
                    vision_features=vision, text_features=text_features, attention_mask_vision=padding,
                    attention_mask_text=text_padding)

            enhancer = layer.text_enhancer_layer
            if fast.sdpa:
                with_position = text_features + text.position_embedding
                attended = sdpa_attention(enhancer.self_attn, with_position, with_position, text_features, text_mask)
                text_features = enhancer.layer_norm_before(text_features + attended)
                hidden = enhancer.fc2(enhancer.activation(enhancer.fc1(text_features)))
                text_features = enhancer.layer_norm_after(text_features + hidden)
            else:
                text_features, _ = enhancer(hidden_states=text_features, attention_masks=text.self_mask,
                                            position_embeddings=text.position_embedding)

            deformable = layer.deformable_layer
            attended = self._deformable_attention(deformable.self_attn, vision + position, vision,
                                                  geometry.reference_points, geometry)
            vision = deformable.self_attn_layer_norm(vision + attended)
            hidden, scratch = _feed_forward(deformable, vision, scratch)
            vision = deformable.final_layer_norm(vision + hidden)
        return vision, text_features

    def _deformable_attention(self, module: nn.Module, queries: Tensor, memory: Tensor, reference_points: Tensor,
                              geometry: _Geometry) -> Tensor:
        """``GroundingDinoMultiscaleDeformableAttention.forward`` (position already added to queries).

        reference_points: ``(B, Q, L, 2)`` points or ``(B, Q, L, 4)`` boxes, normalised.
        """
        batch, num_queries, _ = queries.shape
        length = memory.shape[1]
        heads, levels, points = module.n_heads, module.n_levels, module.n_points
        value = module.value_proj(memory)
        if geometry.padding is not None:
            value = value.masked_fill(geometry.padding[..., None], 0.0)
        value = value.view(batch, length, heads, module.d_model // heads)
        if not self.speedups.deformable_attention:
            weights = module.attention_weights(queries).view(batch, num_queries, heads, levels * points)
            weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
            offsets = module.sampling_offsets(queries).view(batch, num_queries, heads, levels, points, 2)
            if reference_points.shape[-1] == 2:
                normalizer = torch.tensor([[w, h] for h, w in geometry.spatial_shapes], dtype=offsets.dtype,
                                          device=offsets.device)
                locations = (reference_points[:, :, None, :, None, :]
                             + offsets / normalizer[None, None, None, :, None, :])
            else:
                locations = (reference_points[:, :, None, :, None, :2]
                             + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
            shapes = torch.tensor(geometry.spatial_shapes, dtype=torch.long, device=value.device)
            starts = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
            sampled = module.attn(value, shapes, geometry.spatial_shapes, starts, locations, weights,
                                  module.im2col_step)
            return module.output_proj(sampled)

        # One product for the sampling offsets and the attention weights; the offset rows are
        # reordered from (h, l, p, xy) to (xy, h, l, p) so that x and y come out as contiguous
        # blocks, ready to become pixel coordinates (loc * size - 0.5).
        count = heads * levels * points
        offset_layer, weight_layer = module.sampling_offsets, module.attention_weights
        weight = torch.cat([offset_layer.weight.view(count, 2, -1).transpose(0, 1).reshape(2 * count, -1),
                            weight_layer.weight])
        bias = torch.cat([offset_layer.bias.view(count, 2).t().reshape(-1), weight_layer.bias])
        projected = F.linear(queries, weight, bias)
        weights = projected[..., 2 * count:].reshape(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Pixel coordinates in at least float32, whatever the model's dtype.
        coordinate_dtype = torch.promote_types(projected.dtype, torch.float32)
        offsets = projected[..., :2 * count].view(batch, num_queries, 2, heads, levels, points).to(coordinate_dtype)
        reference_points = reference_points.to(coordinate_dtype)
        sizes = torch.tensor(geometry.spatial_shapes, dtype=coordinate_dtype, device=offsets.device)  # (L, 2): h, w
        size_xy = sizes.flip(-1)  # (L, 2): w, h
        if reference_points.shape[-1] == 2:  # points: loc = ref + offset / size
            anchor = reference_points * size_xy - 0.5  # (B, Q, L, 2)
            pixel = [offsets[:, :, axis] + anchor[:, :, None, :, None, axis] for axis in (0, 1)]
        else:  # boxes: loc = centre + offset / points * box size / 2
            anchor = reference_points[..., :2] * size_xy - 0.5
            step = reference_points[..., 2:] * (0.5 / points) * size_xy
            pixel = [torch.addcmul(anchor[:, :, None, :, None, axis], offsets[:, :, axis],
                                   step[:, :, None, :, None, axis]) for axis in (0, 1)]
        sampled = deformable_attention_pixels(value, geometry.spatial_shapes, pixel[0], pixel[1], weights)
        return module.output_proj(sampled)

    # ------------------------------------------------------------------ decoder
    def _decode(self, memory: Tensor, text_features: Tensor, geometry: _Geometry,
                text: TextEncoding) -> GroundingOutputs:
        model, inner, config = self.model, self.model.model, self.model.config
        fast = self.speedups
        batch = memory.shape[0]

        # First stage: every pixel scores the caption; the best num_queries become the queries.
        object_query = memory
        if geometry.padding is not None:
            object_query = object_query.masked_fill(geometry.padding[..., None], 0.0)
        object_query = object_query.masked_fill(~geometry.proposal_valid, 0.0)
        object_query = inner.enc_output_norm(inner.enc_output(object_query))
        class_logits = inner.encoder_output_class_embed(object_query, text_features, text.token_mask)
        top = torch.topk(class_logits.max(-1)[0], config.num_queries, dim=1)[1]  # (B, num_queries)
        if fast.proposals_first:
            picked = torch.gather(object_query, 1, top[..., None].expand(-1, -1, object_query.shape[-1]))
            picked_proposals = torch.gather(geometry.proposals, 1, top[..., None].expand(-1, -1, 4))
            box_logits = inner.encoder_output_bbox_embed(picked) + picked_proposals
        else:
            all_boxes = inner.encoder_output_bbox_embed(object_query) + geometry.proposals
            box_logits = torch.gather(all_boxes, 1, top[..., None].expand(-1, -1, 4))
        reference_points = box_logits.sigmoid()
        if config.embedding_init_target:
            hidden = inner.query_position_embeddings.weight[None].expand(batch, -1, -1)
        else:
            hidden = torch.gather(object_query, 1, top[..., None].expand(-1, -1, config.d_model))

        decoder = inner.decoder
        text_padding_mask = additive_mask(text.token_mask[:, None, None, :], text_features.dtype)  # (B, 1, 1, T)
        ratios = torch.cat([geometry.valid_ratios, geometry.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        last = len(decoder.layers) - 1
        for index, layer in enumerate(decoder.layers):
            layer_reference = reference_points[:, :, None] * ratios  # (B, Q, L, 4)
            query_position = decoder.reference_points_head(
                sine_embedding(layer_reference[:, :, 0, :], config.d_model // 2))
            hidden = self._decoder_layer(layer, hidden, query_position, layer_reference, memory, text_features,
                                         text_padding_mask, geometry)
            if index == last:
                break
            refined = decoder.bbox_embed[index](hidden) + torch.special.logit(reference_points, eps=1e-5)
            reference_points = refined.sigmoid()

        # Detection head on the last layer only (the only one the outputs use).
        hidden = decoder.layer_norm(hidden)
        logits = model.class_embed[last](hidden, text_features, text.token_mask)
        boxes = model.bbox_embed[last](hidden) + torch.special.logit(reference_points, eps=1e-5)
        return GroundingOutputs(logits, boxes.sigmoid())

    def _decoder_layer(self, layer: nn.Module, hidden: Tensor, query_position: Tensor, reference_points: Tensor,
                       memory: Tensor, text_features: Tensor, text_padding_mask: Tensor, geometry: _Geometry) -> Tensor:
        if self.speedups.sdpa:
            queries = hidden + query_position
            attended = sdpa_attention(layer.self_attn, queries, queries, hidden)
            hidden = layer.self_attn_layer_norm(hidden + attended)
            attended = sdpa_attention(layer.encoder_attn_text, hidden + query_position, text_features, text_features,
                                      text_padding_mask)
            hidden = layer.encoder_attn_text_layer_norm(hidden + attended)
        else:
            queries = hidden + query_position
            attended = layer.self_attn(queries=queries, keys=queries, values=hidden, output_attentions=True)[0]
            hidden = layer.self_attn_layer_norm(hidden + attended)
            mask = text_padding_mask.expand(-1, layer.encoder_attn_text.num_attention_heads, hidden.shape[1], -1)
            attended = layer.encoder_attn_text(queries=hidden + query_position, keys=text_features,
                                               values=text_features, attention_mask=mask, output_attentions=True)[0]
            hidden = layer.encoder_attn_text_layer_norm(hidden + attended)
        attended = self._deformable_attention(layer.encoder_attn, hidden + query_position, memory, reference_points,
                                              geometry)
        hidden = layer.encoder_attn_layer_norm(hidden + attended)
        feed_forward = layer.fc2(_activate(layer.activation_fn, layer.fc1(hidden)))
        return layer.final_layer_norm(hidden + feed_forward)


# ---------------------------------------------------------------------- helpers
def _compute_geometry(inner: nn.Module, pixel_mask: Tensor, shapes: list[tuple[int, int]], dtype: torch.dtype,
                      padded: bool) -> _Geometry:
    """Masks, position embeddings, reference points and proposals for ``(B, H, W)`` pixel masks."""
    batch = pixel_mask.shape[0]
    masks = [F.interpolate(pixel_mask[None].float(), size=shape).to(torch.bool)[0] for shape in shapes]
    position_embedding = []
    for mask in masks:
        # The sine embedding reads only the mask (and the map's device); no need for the map.
        anchor = torch.empty((batch, 1, *mask.shape[1:]), dtype=dtype, device=mask.device)
        position = inner.backbone.position_embedding(anchor, mask).to(dtype)
        position_embedding.append(position.flatten(2).transpose(1, 2))
    valid_ratios = torch.stack([_valid_ratio(mask, dtype) for mask in masks], 1)
    flat_valid = torch.cat([mask.flatten(1) for mask in masks], 1)
    reference_points = _encoder_reference_points(shapes, valid_ratios)
    proposals, proposal_valid = _proposals(~flat_valid, shapes, dtype)
    return _Geometry(shapes, ~flat_valid if padded else None, position_embedding, valid_ratios, reference_points,
                     proposals, proposal_valid)


def _feed_forward(layer: nn.Module, hidden: Tensor, scratch: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``fc2(activation(fc1(hidden)))`` of an encoder layer, and the buffer to pass to the next.

    The encoder's hidden state is 20k x 2048 floats (160 MB): with ReLU (the released models')
    it is written into one buffer reused by every layer and activated in place, instead of two
    fresh allocations per layer (each ~40k page faults).
    """
    fc1, fc2 = layer.fc1, layer.fc2
    if not isinstance(layer.activation_fn, nn.ReLU) or fc1.bias is None:
        return fc2(layer.activation_fn(fc1(hidden))), None
    flat = hidden.reshape(-1, hidden.shape[-1])
    if scratch is None or scratch.shape != (flat.shape[0], fc1.out_features) or scratch.dtype != flat.dtype:
        scratch = flat.new_empty(flat.shape[0], fc1.out_features)
    torch.addmm(fc1.bias, flat, fc1.weight.t(), out=scratch)
    return fc2(torch.relu_(scratch)).view(*hidden.shape[:-1], -1), scratch


def _activate(activation: nn.Module, hidden: Tensor) -> Tensor:
    """``activation(hidden)``, in place for ReLU (the released models'): the encoder's feed-forward
    hidden state is 20k x 2048 floats, and a fresh 160 MB buffer costs ~40k page faults."""
    if isinstance(activation, nn.ReLU):
        return torch.relu_(hidden)
    return activation(hidden)


def _valid_ratio(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, h, w)`` valid-pixel mask -> ``(B, 2)`` valid fraction of the width and height."""
    _, height, width = mask.shape
    valid_height = torch.sum(mask[:, :, 0], 1, dtype=dtype)
    valid_width = torch.sum(mask[:, 0, :], 1, dtype=dtype)
    return torch.stack([valid_width / width, valid_height / height], -1)


def phrase_attention(input_ids: Tensor, phrase_end_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Grounding DINO's text self-attention mask and position ids.

    A phrase is the run of tokens up to and including the next ``[CLS]``/``[SEP]``/``.``/``?``;
    tokens attend within their phrase (and always to themselves), and positions count from 0
    inside each phrase. Phrases closed by the first or the last token, or by none, are not
    phrases: their tokens attend only to themselves, at position 0.

    Args:
        input_ids: ``(B, T)``; phrase_end_tokens: ``(K,)`` token ids.

    Returns:
        ``(B, T, T)`` bool (True = may attend) and ``(B, T)`` int64 positions.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    ends = torch.isin(input_ids, phrase_end_tokens)
    positions = torch.arange(length, device=device).expand(batch, length)
    # Index of the token closing each token's phrase: the first end at or after it (T if none).
    closing = torch.where(ends, positions, torch.full_like(positions, length))
    closing = closing.flip(1).cummin(1).values.flip(1)
    # Index of the end before each token (-1 if none).
    before = torch.where(ends, positions, torch.full_like(positions, -1)).cummax(1).values
    before = torch.cat([before.new_full((batch, 1), -1), before[:, :-1]], 1)
    in_phrase = (closing != 0) & (closing != length - 1) & (closing != length)
    same = (closing[:, :, None] == closing[:, None, :]) & in_phrase[:, None, :]
    mask = same | torch.eye(length, dtype=torch.bool, device=device)
    position_ids = torch.where(in_phrase, positions - before - 1, torch.zeros_like(positions)).clamp(min=0)
    return mask, position_ids


def sine_embedding(coordinates: Tensor, features_per_coordinate: int, temperature: float = 10000.0) -> Tensor:
    """DETR-style sine embedding of normalised coordinates ``(..., K)`` -> ``(..., K * F)``.

    Each coordinate gives ``F`` values, sin and cos interleaved at frequencies
    ``temperature ** (2 * (i // 2) / F)``; with two or more coordinates the first two swap
    places (``y, x, ...``), as in Grounding DINO.
    """
    steps = torch.arange(features_per_coordinate, dtype=torch.float32, device=coordinates.device)
    frequencies = temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / features_per_coordinate)
    embeddings = []
    for coordinate in coordinates.unbind(-1):
        angles = coordinate[..., None] * (2 * math.pi) / frequencies
        embeddings.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-2))
    if len(embeddings) >= 2:
        embeddings[0], embeddings[1] = embeddings[1], embeddings[0]
    return torch.cat(embeddings, -1).to(coordinates.dtype)


def _encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid extent -> ``(B, S, L, 2)``."""
    device, dtype = valid_ratios.device, valid_ratios.dtype
    points = []
    for level, (height, width) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.linspace(0.5, height - 0.5, height, dtype=dtype, device=device),
                                torch.linspace(0.5, width - 0.5, width, dtype=dtype, device=device), indexing="ij")
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def _proposals(padding: Tensor, shapes: list[tuple[int, int]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """First-stage proposal boxes: one per pixel, centred on it, 0.05 * 2**level wide, in
    inverse-sigmoid space; ``inf`` at padding and where the box is not inside (0.01, 0.99).

    padding: ``(B, S)`` True at padding. Returns ``(B, S, 4)`` and the ``(B, S, 1)`` valid mask.
    """
    batch, device = padding.shape[0], padding.device
    boxes, start = [], 0
    for level, (height, width) in enumerate(shapes):
        level_padding = padding[:, start:start + height * width].view(batch, height, width)
        valid_height = (~level_padding[:, :, 0]).sum(1)
        valid_width = (~level_padding[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.linspace(0, height - 1, height, dtype=dtype, device=device),
                                torch.linspace(0, width - 1, width, dtype=dtype, device=device), indexing="ij")
        grid = torch.stack([xs, ys], -1)
        scale = torch.stack([valid_width, valid_height], 1).view(batch, 1, 1, 2)
        centres = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
        sizes = torch.ones_like(centres) * 0.05 * (2.0 ** level)
        boxes.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
        start += height * width
    boxes = torch.cat(boxes, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    boxes = torch.log(boxes / (1 - boxes))
    boxes = boxes.masked_fill(padding[..., None], float("inf")).masked_fill(~valid, float("inf"))
    return boxes, valid


def _pad_texts(parts: list[TextEncoding]) -> TextEncoding:
    """Stack single-caption encodings, padding to the longest: pad tokens are masked out and
    attend only to themselves."""
    if len(parts) == 1:
        return parts[0]
    length = max(part.features.shape[1] for part in parts)

    def pad(part: TextEncoding) -> TextEncoding:
        extra = length - part.features.shape[1]
        if extra == 0:
            return part
        self_mask = F.pad(part.self_mask, (0, extra, 0, extra), value=False)
        self_mask |= torch.eye(length, dtype=torch.bool, device=self_mask.device)
        return TextEncoding(F.pad(part.features, (0, 0, 0, extra)), F.pad(part.token_mask, (0, extra), value=False),
                     self_mask, F.pad(part.position_embedding, (0, 0, 0, extra)))

    padded = [pad(part) for part in parts]
    return TextEncoding(*(torch.cat(items, 0) for items in zip(*padded)))
