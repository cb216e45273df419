"""The Sam2 model: every module and parameter of the official SAM 2 / 2.1 checkpoints, under
their official names, and the image path (`encode_image`, `decode`, `postprocess_masks`).

The memory modules and tracking parameters (`memory_attention`, `memory_encoder`,
`maskmem_tpos_enc`, `no_mem_pos_enc`, `no_obj_ptr`, `obj_ptr_proj`, ...) are held so that the
official files load strictly; single images only use `no_mem_embed`, added to the stride-16
features as the reference image predictor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.common import MLP
from .hiera import linear_weights
from .memory import MemoryAttention, MemoryEncoder, MemoryKeyCache
from .neck import Sam2ImageEncoder
from .decoder import BOX_BOTTOM_RIGHT_LABEL, BOX_TOP_LEFT_LABEL, Sam2MaskDecoder, Sam2PromptEncoder

# ImageNet statistics for images scaled to [0, 1] (SAM 2's normalisation).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sam2TrackingConfig:
    """The video-tracking settings of the official configs (unused on single images).

    SAM 2.1 differs from SAM 2.0 in the object-pointer temporal encoding (the three
    `*tpos*` flags) and in `no_obj_embed_spatial`.
    """

    num_maskmem: int = 7
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    use_mask_input_as_output_without_sam: bool = True
    directly_add_no_mem_embed: bool = True
    multimask_output_in_sam: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    use_obj_ptrs_in_encoder: bool = True
    max_obj_ptrs_in_encoder: int = 16
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    only_obj_ptrs_in_the_past_for_eval: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    use_mlp_for_obj_ptr_proj: bool = True
    no_obj_embed_spatial: bool = True
    memory_temporal_stride_for_eval: int = 1
    max_cond_frames_in_attn: int = -1
    non_overlap_masks_for_mem_enc: bool = False

    @classmethod
    def for_version(cls, version: str) -> "Sam2TrackingConfig":
        """The official settings of SAM "2.0" or "2.1"."""
        if version == "2.1":
            return cls()
        if version == "2.0":
            return cls(
                add_tpos_enc_to_obj_ptrs=False,
                proj_tpos_enc_in_obj_ptrs=False,
                use_signed_tpos_enc_to_obj_ptrs=False,
                no_obj_embed_spatial=False,
            )
        raise ValueError(f"unknown SAM 2 version {version!r}; expected '2.0' or '2.1'")


class Sam2(nn.Module):
    """SAM 2 / 2.1. Shares with `Sam` the small interface the predictor uses: `encode_image`,
    `decode` and `postprocess_masks`, all in the 1024x1024 model-input frame."""

    family: str = "sam2"
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: Sam2ImageEncoder,
        memory_attention: MemoryAttention,
        memory_encoder: MemoryEncoder,
        sam_prompt_encoder: Sam2PromptEncoder,
        sam_mask_decoder: Sam2MaskDecoder,
        *,
        version: str = "2.1",
        image_size: int = 1024,
        backbone_stride: int = 16,
        tracking: Sam2TrackingConfig | None = None,
    ) -> None:
        super().__init__()
        self.version = version
        self.tracking = tracking or Sam2TrackingConfig.for_version(version)
        self.image_size = image_size
        self.backbone_stride = backbone_stride
        self.model_type: str | None = None  # the registry name, set by build_sam
        hidden_dim = sam_prompt_encoder.embed_dim  # the neck's d_model
        self.hidden_dim = hidden_dim
        mem_dim = memory_encoder.out_proj.weight.shape[0] if hasattr(memory_encoder.out_proj, "weight") else hidden_dim
        self.mem_dim = mem_dim
        options = self.tracking

        # Registered in the reference's order, so the state dict comes out in the official order.
        self.image_encoder = image_encoder
        if options.use_obj_ptrs_in_encoder:
            # Brings a full-resolution mask prompt down to the 256x256 low-res mask logits.
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(options.num_maskmem, 1, 1, mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        if options.pred_obj_scores and options.use_obj_ptrs_in_encoder:
            self.no_obj_ptr = nn.Parameter(torch.zeros(1, hidden_dim))
        self.no_obj_embed_spatial = (
            nn.Parameter(torch.zeros(1, mem_dim)) if options.no_obj_embed_spatial else None
        )
        for token in (self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc,
                      getattr(self, "no_obj_ptr", None), self.no_obj_embed_spatial):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)  # the reference's initialisation
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder
        if options.use_obj_ptrs_in_encoder:
            self.obj_ptr_proj = (
                MLP(hidden_dim, hidden_dim, hidden_dim, 3)
                if options.use_mlp_for_obj_ptr_proj
                else nn.Linear(hidden_dim, hidden_dim)
            )
        else:
            self.obj_ptr_proj = nn.Identity()
        self.obj_ptr_tpos_proj = (
            nn.Linear(hidden_dim, mem_dim) if options.proj_tpos_enc_in_obj_ptrs else nn.Identity()
        )
        # Not part of the official checkpoints, hence non-persistent.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    fused_kernels = True

    def set_fused_kernels(self, enabled: bool) -> None:
        """Image encoding with in-place epilogues and cache-sized pieces at inference (default),
        or the plain eager path, the parity reference. Same numbers up to float rounding."""
        self.fused_kernels = enabled
        self.image_encoder.trunk.set_fused_kernels(enabled)

    # ----------------------------------------------------------------------- image encoding
    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1024, 1024) RGB in [0, 1] -> normalised with the ImageNet mean and std."""
        return (pixels - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixels: torch.Tensor) -> dict:
        """pixels: (B, 3, 1024, 1024) float RGB in [0, 1] (`ResizeSquare.to_input_tensor`).

        Returns {"image_embed": (B, 256, 64, 64), the stride-16 features with `no_mem_embed`
        added (single-image mode), "high_res_feats": [(B, 32, 256, 256), (B, 64, 128, 128)],
        the stride-4 and stride-8 features already through the decoder's conv_s0 / conv_s1}.
        The same values as the reference's `SAM2ImagePredictor.set_image` features.
        """
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        dtype = self.no_mem_embed.dtype
        x = self.preprocess(pixels.to(self.pixel_mean.dtype)).to(dtype)
        if self._can_fuse_high_res():
            return self._encode_fused(self.image_encoder.trunk.forward_tokens(x), add_no_mem_embed=True)
        # General path (non-standard neck layouts): the neck as the reference runs it.
        levels = self.image_encoder(x, with_position=False)["backbone_fpn"]
        decoder = self.sam_mask_decoder
        return {
            "image_embed": levels[-1] + self._single_image_embed().view(1, -1, 1, 1),
            "high_res_feats": [decoder.conv_s0(levels[0]), decoder.conv_s1(levels[1])],
        }

    def _single_image_embed(self) -> torch.Tensor:
        """What single-image mode adds to every stride-16 token: `no_mem_embed` (C,)."""
        if self.tracking.directly_add_no_mem_embed:
            return self.no_mem_embed.flatten()
        return torch.zeros_like(self.no_mem_embed.flatten())

    def _can_fuse_high_res(self) -> bool:
        """True for the official layout: 4 trunk levels, scalp 1, 1x1 neck convs, the two fine
        levels purely lateral and the decoder using high-res features."""
        neck, encoder = self.image_encoder.neck, self.image_encoder
        return (
            self.sam_mask_decoder.use_high_res_features
            and encoder.scalp == 1
            and len(neck.convs) == 4
            and 0 not in neck.fpn_top_down_levels
            and 1 not in neck.fpn_top_down_levels
            and 2 in neck.fpn_top_down_levels
            and neck.fuse_type == "sum"
            and all(conv.conv.kernel_size == (1, 1) and conv.conv.stride == (1, 1) for conv in neck.convs)
        )

    def _encode_fused(self, tokens: list[torch.Tensor], add_no_mem_embed: bool = True) -> dict:
        """The neck and conv_s0/conv_s1 on channels-last trunk maps, with each fine level's two
        1x1 convs (neck lateral, then conv_s0 or conv_s1) folded into one: the same linear map
        (up to float rounding) at a small fraction of the work. The stride-32 level only feeds
        the stride-16 one (its own output is dropped by scalp), and no position encodings are
        computed: single images do not use them. Video frames (add_no_mem_embed=False) get
        the raw stride-16 features, which memory attention conditions instead."""
        neck, decoder = self.image_encoder.neck, self.sam_mask_decoder

        fused = self.fused_kernels

        def linear(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
            return linear_weights(x, conv.weight[:, :, 0, 0], conv.bias, fused=fused)

        def folded(x: torch.Tensor, first: nn.Conv2d, second: nn.Conv2d) -> torch.Tensor:
            w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
            return linear_weights(x, w2 @ w1, w2 @ first.bias + second.bias, fused=fused)

        coarse = linear(tokens[3], neck.lateral(3))  # (B, 32, 32, 256)
        if neck.fpn_interp_model == "nearest":
            batch, height, width, channels = coarse.shape
            upsampled = coarse[:, :, None, :, None, :].expand(batch, height, 2, width, 2, channels)
            upsampled = upsampled.reshape(batch, 2 * height, 2 * width, channels)
        else:
            upsampled = neck.upsample(coarse.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        embed = linear(tokens[2], neck.lateral(2)) + upsampled
        if add_no_mem_embed:
            embed = embed + self._single_image_embed().view(1, 1, 1, -1)
        feat_s1 = folded(tokens[1], neck.lateral(1), decoder.conv_s1)
        feat_s0 = folded(tokens[0], neck.lateral(0), decoder.conv_s0)

        def channels_first(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 3, 1, 2).contiguous()

        return {
            "image_embed": channels_first(embed),
            "high_res_feats": [channels_first(feat_s0), channels_first(feat_s1)],
        }

    # ----------------------------------------------------------------------- prompts -> masks
    def decode(
        self,
        features: dict,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's features (batch 1, from `encode_image`) against B prompt sets, all in the
        1024x1024 model-input frame: points ((B, N, 2) xy, (B, N) labels 1/0/-1), boxes (B, 4)
        xyxy, mask_input (B, 1, 256, 256) logits.

        Returns low-res logits (B, C, 256, 256) (not clamped), IoU predictions (B, C) and
        object-score logits (B, 1); C = 3 if multimask_output else 1 (then, where the single
        mask is unstable, the best of the three).
        """
        image_embed = features["image_embed"]
        if image_embed.shape[0] != 1:
            raise ValueError(f"decode takes one image's features (batch 1), got batch {image_embed.shape[0]}")
        sparse, dense = self.embed_prompts(points, boxes, mask_input)
        low_res_logits, iou_predictions, _, object_score_logits = self.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=features["high_res_feats"],
        )
        return low_res_logits, iou_predictions, object_score_logits

    def embed_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompt sets as `decode` takes them -> sparse (B, N, 256) and dense (B, 256, 64, 64)
        prompt embeddings."""
        if boxes is not None:
            # SAM 2 takes a box as its two corners, labelled 2 and 3, placed before any clicks.
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor(
                [[BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL]], dtype=torch.int, device=boxes.device
            ).expand(corners.shape[0], 2)
            if points is not None:
                points = (torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
            else:
                points = (corners, corner_labels)
        return self.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)

    def decode_each(
        self,
        features: dict,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_outputs: Sequence[bool],
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """B prompt sets, each on its own image, in one decoder call: features as `encode_image`
        gives them for B images (image_embed (B, 256, 64, 64), high_res_feats
        [(B, 32, 256, 256), (B, 64, 128, 128)]), one image per set; sparse (B, N, 256) and
        dense (B, 256, 64, 64) from `embed_prompts` (the same N for all: a padding token
        would change the masks); multimask_outputs: one flag per set.

        Returns, per set, what `decode` returns for it alone, bit for bit on CPU: low-res
        logits (1, C, 256, 256), IoU predictions (1, C) and object-score logits (1, 1).
        """
        outputs = self.sam_mask_decoder.predict_masks(
            features["image_embed"], self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
            high_res_features=features["high_res_feats"], batch_invariant=True,
        )
        results = []
        for row, multimask_output in enumerate(multimask_outputs):
            low_res_logits, iou_predictions, _, object_score_logits = self.sam_mask_decoder.select_outputs(
                tuple(output[row : row + 1] for output in outputs), multimask_output
            )
            results.append((low_res_logits, iou_predictions, object_score_logits))
        return results

    def postprocess_masks(
        self, low_res_logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, C, 256, 256) logits -> (B, C, H, W) logits in the original frame: bilinear
        resize of the whole square (SAM 2 stretches the image to the square, so `input_size`
        is always the full 1024x1024 and is not needed)."""
        del input_size
        return F.interpolate(low_res_logits.float(), tuple(original_size), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------- video tracking
    # One method per model step of a tracked frame; which memories a frame attends to is the
    # video predictor's business (sam/video), these only compute. Tokens of the stride-16
    # grid are row-major, (B, g*g, C), g = image_size / 16.

    def encode_frame(self, pixels: torch.Tensor) -> "FrameFeatures":
        """pixels: (1, 3, S, S) float RGB in [0, 1], S = image_size (the whole frame stretched
        to the square, as the reference video predictor does). Returns the raw stride-16
        features (no `no_mem_embed`: memory attention conditions them), their sine position
        encoding, and the stride-4/8 features through conv_s0/conv_s1."""
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        x = self.preprocess(pixels.to(self.pixel_mean.dtype)).to(self.no_mem_embed.dtype)
        if self._can_fuse_high_res():
            out = self._encode_fused(self.image_encoder.trunk.forward_tokens(x), add_no_mem_embed=False)
            embed, high_res = out["image_embed"], out["high_res_feats"]
        else:
            levels = self.image_encoder(x, with_position=False)["backbone_fpn"]
            decoder = self.sam_mask_decoder
            embed, high_res = levels[-1], [decoder.conv_s0(levels[0]), decoder.conv_s1(levels[1])]
        position = self.image_encoder.neck.position_encoding(embed).to(embed.dtype)
        return FrameFeatures(embed, position, high_res)

    def use_multimask(self, is_init_cond_frame: bool, num_points: int) -> bool:
        """Whether the decoder gives 3 candidates (the best is kept): one click (or none, when
        tracking) yields an ambiguous prompt; a box counts as two points."""
        options = self.tracking
        return (
            options.multimask_output_in_sam
            and (is_init_cond_frame or options.multimask_output_for_tracking)
            and options.multimask_min_pt_num <= num_points <= options.multimask_max_pt_num
        )

    def _pointer_from_token(self, token: torch.Tensor, appearing: torch.Tensor) -> torch.Tensor:
        """Object pointer (B, C) from a decoder output token; `no_obj_ptr` where the object is
        absent (appearing: (B, 1) float 0/1)."""
        pointer = self.obj_ptr_proj(token)
        if self.tracking.pred_obj_scores:
            if self.tracking.fixed_no_obj_ptr:
                pointer = appearing * pointer
            pointer = pointer + (1 - appearing) * self.no_obj_ptr
        return pointer

    def track_heads(
        self,
        pix_feat: torch.Tensor,
        high_res_feats: list[torch.Tensor],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        high_res: bool = True,
        batch_invariant: bool = False,
    ) -> "TrackOutput":
        """The prompt encoder and mask decoder on one frame for B objects.

        pix_feat: (B, C, g, g) memory-conditioned features; point_coords (B, N, 2) xy in the
        S x S model-input frame with point_labels (B, N) (box corners labelled 2/3 first), or
        None; mask_input: (B, 1, 4g, 4g) low-res logits (resized if another size) or None.
        Masks of frames where the object score says "absent" are set to -1024.
        high_res=False: skip the S x S upsampling (`high_res_masks` is then None) where no memory
        is encoded from it; batch_invariant: each object's numbers bit for bit as in a batch of
        one (objects with their own pix_feat batched together, see `MaskDecoder.predict_masks`).
        """
        batch = pix_feat.shape[0]
        if point_coords is None:
            # The reference always feeds at least one (padding) point.
            point_coords = torch.zeros(batch, 1, 2, device=pix_feat.device)
            point_labels = -torch.ones(batch, 1, dtype=torch.int32, device=pix_feat.device)
        prompt_encoder = self.sam_prompt_encoder
        if mask_input is not None and tuple(mask_input.shape[-2:]) != tuple(prompt_encoder.mask_input_size):
            mask_input = F.interpolate(
                mask_input.float(), prompt_encoder.mask_input_size, mode="bilinear", align_corners=False, antialias=True
            )
        sparse, dense = prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=mask_input)
        decoder = self.sam_mask_decoder
        low_res, ious, tokens, object_score_logits = decoder.select_outputs(decoder.predict_masks(
            pix_feat, prompt_encoder.get_dense_pe(), sparse, dense, high_res_features=high_res_feats,
            batch_invariant=batch_invariant,
        ), multimask_output)
        appearing = (object_score_logits > 0).float()
        if self.tracking.pred_obj_scores:
            low_res = torch.where(appearing[:, :, None, None] > 0, low_res, NO_OBJECT_LOGIT)
        low_res = low_res.float()
        token = tokens[:, 0]
        if multimask_output:
            best = torch.argmax(ious, dim=-1)
            rows = torch.arange(batch, device=low_res.device)
            low_res = low_res[rows, best].unsqueeze(1)
            if tokens.shape[1] > 1:
                token = tokens[rows, best]
        if high_res:
            high_res = F.interpolate(low_res, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        else:
            high_res = None
        if batch_invariant and batch > 1:  # a (1, C) token is a matrix-vector product, (B, C) a matrix one
            pointer = torch.cat([self._pointer_from_token(token[row : row + 1], appearing[row : row + 1])
                                 for row in range(batch)])
        else:
            pointer = self._pointer_from_token(token, appearing)
        return TrackOutput(low_res, high_res, pointer, object_score_logits)

    def mask_as_output(
        self, pix_feat: torch.Tensor, high_res_feats: list[torch.Tensor], mask: torch.Tensor
    ) -> "TrackOutput":
        """A mask prompt taken as the answer (SAM is not asked): (B, 1, S, S) 0/1 -> logits
        -10/+10, its low-res version, an object score of +-10 by whether it is empty, and a
        pointer from decoding the downsampled mask. pix_feat: raw (B, C, g, g) features."""
        mask = mask.float()
        high_res = mask * 20.0 - 10.0  # sigmoid(-10) ~ 4.5e-5
        low_res = F.interpolate(  # 4x the embedding grid (S/4 for SAM 2, S/14*4 for SAM 3)
            high_res, self.sam_prompt_encoder.mask_input_size, mode="bilinear", align_corners=False, antialias=True,
        )
        decoded = self.track_heads(pix_feat, high_res_feats, None, None, self.mask_downsample(mask), False)
        appearing = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()
        pointer = decoded.obj_ptr
        if self.tracking.pred_obj_scores:
            if self.tracking.fixed_no_obj_ptr:
                pointer = appearing * pointer
            pointer = pointer + (1 - appearing) * self.no_obj_ptr
        return TrackOutput(low_res, high_res, pointer, appearing * 20.0 - 10.0)

    def condition_on_memory(
        self,
        features: "FrameFeatures",
        memories: list[tuple[int, torch.Tensor, torch.Tensor]],
        pointers: list[tuple[int, torch.Tensor]],
        max_pointer_offset: int,
        key_caches: Sequence[MemoryKeyCache] | None = None,
    ) -> torch.Tensor:
        """Memory attention of the current frame's stride-16 features on the memory bank.

        memories: (t_pos, features (B, 64, g, g), position encoding (B, 64, g, g)) with t_pos
        0 for conditioning frames and 1..num_maskmem-1 for recent frames (num_maskmem-1 =
        the previous one); pointers: (signed frame offset, pointer (B, C)); max_pointer_offset
        normalises the offsets (the largest pointer window minus one).
        key_caches: one `MemoryKeyCache` per memory (kept by the caller with that memory):
        each frame's projected keys are computed once and then corrected for its distance.
        Returns the conditioned features (B, C, g, g).
        """
        embed, position = features.vision_feats, features.vision_pos
        batch, channels, height, width = embed.shape
        num_maskmem = self.tracking.num_maskmem
        if key_caches is not None and len(key_caches) != len(memories):
            raise ValueError(f"{len(key_caches)} key caches for {len(memories)} memories")
        if not memories:
            key_caches = None  # pointers only: nothing to cache
        memory_tokens, memory_pos, spatial_pos, temporal = [], [], [], []
        for t_pos, memory, memory_position in memories:
            memory_tokens.append(memory.to(embed.device).flatten(2).transpose(1, 2))
            encoding = memory_position.to(embed.device).flatten(2).transpose(1, 2)
            spatial_pos.append(encoding)
            temporal.append(self.maskmem_tpos_enc[num_maskmem - t_pos - 1].view(-1))
            if key_caches is None:
                memory_pos.append(encoding + temporal[-1].view(1, 1, -1))
        num_pointer_tokens = 0
        pointer_tokens = pointer_position = None
        if pointers:
            offsets = torch.tensor([offset for offset, _ in pointers], dtype=torch.float32, device=embed.device)
            stacked = torch.stack([pointer.to(embed.device) for _, pointer in pointers], dim=1)  # (B, P, C)
            if self.tracking.add_tpos_enc_to_obj_ptrs:
                sine_dim = channels if self.tracking.proj_tpos_enc_in_obj_ptrs else self.mem_dim
                pointer_pos = self.obj_ptr_tpos_proj(sine_encoding_1d(offsets / max_pointer_offset, sine_dim))
                pointer_pos = pointer_pos[None].expand(batch, -1, self.mem_dim)
            else:
                pointer_pos = stacked.new_zeros(batch, len(pointers), self.mem_dim)
            if self.mem_dim < channels:
                # A C-wide pointer enters the 64-wide memory as C/64 consecutive tokens.
                split = channels // self.mem_dim
                stacked = stacked.reshape(batch, len(pointers) * split, self.mem_dim)
                pointer_pos = pointer_pos.repeat_interleave(split, dim=1)
            memory_tokens.append(stacked)
            memory_pos.append(pointer_pos)
            pointer_tokens, pointer_position = stacked, pointer_pos
            num_pointer_tokens = stacked.shape[1]
        memory = torch.cat(memory_tokens, dim=1).to(embed.dtype)
        memory_keys = memory_position = None
        if key_caches is None:
            memory_position = torch.cat(memory_pos, dim=1).to(embed.dtype)
        else:
            memory_keys = self._cached_memory_keys(
                key_caches, memories, memory_tokens, spatial_pos, temporal, pointer_tokens, pointer_position,
                embed.dtype,
            )
        conditioned = self.memory_attention(
            embed.flatten(2).transpose(1, 2),
            memory,
            position.flatten(2).transpose(1, 2),
            memory_position,
            num_obj_ptr_tokens=num_pointer_tokens,
            memory_keys=memory_keys,
        )
        return conditioned.transpose(1, 2).reshape(batch, channels, height, width)

    def _cached_memory_keys(
        self,
        key_caches: Sequence[MemoryKeyCache],
        memories: list[tuple[int, torch.Tensor, torch.Tensor]],
        memory_tokens: list[torch.Tensor],
        spatial_pos: list[torch.Tensor],
        temporal: list[torch.Tensor],
        pointer_tokens: torch.Tensor | None,
        pointer_position: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        """Per layer, the memory bank's cross-attention keys, each spatial frame's from its
        cache (filled here on first use) plus its distance's temporal term."""
        frame_keys = []
        for cache, (_, memory, memory_position), tokens, encoding in zip(
            key_caches, memories, memory_tokens, spatial_pos
        ):
            keys = cache.lookup(memory, memory_position)
            if keys is None:
                keys = self.memory_attention.frame_keys(tokens.to(dtype), encoding.to(dtype))
                cache.store(memory, memory_position, keys)
            frame_keys.append(keys)
        by_distance: dict[int, torch.Tensor] = {}  # one tensor per distance: its term is shared
        temporal = [
            by_distance.setdefault(t_pos, encoding.to(dtype)) for (t_pos, _, _), encoding in zip(memories, temporal)
        ]
        if pointer_tokens is not None:
            pointer_tokens, pointer_position = pointer_tokens.to(dtype), pointer_position.to(dtype)
        return self.memory_attention.assemble_keys(frame_keys, temporal, pointer_tokens, pointer_position)

    def first_frame_features(self, features: "FrameFeatures") -> torch.Tensor:
        """An object's first conditioning frame has no memory: `no_mem_embed` is added to its
        stride-16 features instead (B, C, g, g)."""
        if not self.tracking.directly_add_no_mem_embed:
            raise NotImplementedError("only checkpoints with directly_add_no_mem_embed are supported")
        return features.vision_feats + self.no_mem_embed.view(1, -1, 1, 1)

    def encode_memory(
        self,
        features: "FrameFeatures",
        high_res_masks: torch.Tensor,
        object_score_logits: torch.Tensor,
        binarize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame's memory from its raw features and (B, 1, S, S) mask logits: the mask
        (0/1 if `binarize`, else its sigmoid) scaled to +-10, through the memory encoder,
        plus `no_obj_embed_spatial` where the object is absent. Returns (B, 64, g, g)
        features and position encoding."""
        if binarize:
            mask = (high_res_masks > 0).float()
        else:
            mask = torch.sigmoid(high_res_masks)
        options = self.tracking
        if options.sigmoid_scale_for_mem_enc != 1.0:
            mask = mask * options.sigmoid_scale_for_mem_enc
        if options.sigmoid_bias_for_mem_enc != 0.0:
            mask = mask + options.sigmoid_bias_for_mem_enc
        pix_feat = features.vision_feats.expand(mask.shape[0], -1, -1, -1)
        memory, position = self.memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)
        if self.no_obj_embed_spatial is not None:
            absent = 1.0 - (object_score_logits > 0).float()
            memory = memory + absent[:, :, None, None] * self.no_obj_embed_spatial.view(1, -1, 1, 1)
        return memory, position


# Mask logit of frames where the object is judged absent (the reference's NO_OBJ_SCORE).
NO_OBJECT_LOGIT = -1024.0


@dataclass
class FrameFeatures:
    """One video frame through the image encoder (batch 1, or B objects by expansion)."""

    vision_feats: torch.Tensor  # (1, C, g, g) stride-16 features, without no_mem_embed
    vision_pos: torch.Tensor  # (1, C, g, g) their sine position encoding
    high_res_feats: list[torch.Tensor]  # [(1, C/8, 4g, 4g), (1, C/4, 2g, 2g)] through conv_s0/s1


@dataclass
class TrackOutput:
    """What the heads give for B objects on one frame (before any memory is encoded)."""

    low_res_masks: torch.Tensor  # (B, 1, 4g, 4g) logits, -1024 where absent
    high_res_masks: torch.Tensor | None  # (B, 1, S, S) logits, bilinear from low_res_masks
    obj_ptr: torch.Tensor  # (B, C)
    object_score_logits: torch.Tensor  # (B, 1); > 0 means the object is present


def sine_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(N,) positions -> (N, dim): sines then cosines at temperature ** (2 * (k // 2) / (dim / 2))."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=positions.device)
    scales = temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / half)
    angles = positions[:, None] / scales
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
