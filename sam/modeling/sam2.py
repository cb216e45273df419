"""The Sam2 model: every module and parameter of the official SAM 2 / 2.1 checkpoints, under
their official names, and the image path (`encode_image`, `decode`, `postprocess_masks`).

The memory modules and tracking parameters (`memory_attention`, `memory_encoder`,
`maskmem_tpos_enc`, `no_mem_pos_enc`, `no_obj_ptr`, `obj_ptr_proj`, ...) are held so that the
official files load strictly; single images only use `no_mem_embed`, added to the stride-16
features as the reference image predictor does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP
from .hiera import linear_weights
from .memory import MemoryAttention, MemoryEncoder
from .neck import Sam2ImageEncoder
from .sam2_decoder import BOX_BOTTOM_RIGHT_LABEL, BOX_TOP_LEFT_LABEL, Sam2MaskDecoder, Sam2PromptEncoder

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
        hidden_dim = image_encoder.neck.d_model
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
        """Image encoding with oneDNN fused linears on CPU float32 inference (default), or the
        plain eager path, the parity reference. Same numbers up to float rounding."""
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
            return self._encode_fused(self.image_encoder.trunk.forward_tokens(x))
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

    def _encode_fused(self, tokens: list[torch.Tensor]) -> dict:
        """The neck and conv_s0/conv_s1 on channels-last trunk maps, with each fine level's two
        1x1 convs (neck lateral, then conv_s0 or conv_s1) folded into one: the same linear map
        (up to float rounding) at a small fraction of the work. The stride-32 level only feeds
        the stride-16 one (its own output is dropped by scalp), and no position encodings are
        computed: single images do not use them."""
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
        embed = linear(tokens[2], neck.lateral(2)) + upsampled + self._single_image_embed().view(1, 1, 1, -1)
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
        high_res = features["high_res_feats"]
        if image_embed.shape[0] != 1:
            raise ValueError(f"decode takes one image's features (batch 1), got batch {image_embed.shape[0]}")
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
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        low_res_logits, iou_predictions, _, object_score_logits = self.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=high_res,
        )
        return low_res_logits, iou_predictions, object_score_logits

    def postprocess_masks(
        self, low_res_logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, C, 256, 256) logits -> (B, C, H, W) logits in the original frame: bilinear
        resize of the whole square (SAM 2 stretches the image to the square, so `input_size`
        is always the full 1024x1024 and is not needed)."""
        del input_size
        return F.interpolate(low_res_logits.float(), tuple(original_size), mode="bilinear", align_corners=False)
