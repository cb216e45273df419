"""SAM 3's interactive (SAM-1-style point / box / mask) predictor, on the image model's backbone.

Meta's `Sam3Image.predict_inst` and transformers' `Sam3TrackerModel`: the Perception Encoder ViT
output goes through a second FPN neck (`sam2_convs`, the same layout as the detector's `convs`),
whose three finest levels (strides 14/4, 14/2, 14) feed SAM 2.1's prompt encoder and mask decoder
(the tracker's `sam_prompt_encoder` / `sam_mask_decoder`, with `no_mem_embed` added to the
coarsest level as on a single image). At 1008 px the decoder sees a 72x72 embedding and returns
288x288 low-res logits.

- `Sam3Interactive` is a model with the small interface `SamPredictor` drives (`family = "sam2"`,
  `encode_image`, `decode`, `postprocess_masks`): `SamPredictor(Sam3Interactive(...))` works on
  its own, as Meta's `SAM3InteractiveImagePredictor` (pixels in [0, 1] stretched to the square,
  then scaled to [-1, 1]).
- `Sam3InteractivePredictor` shares one image pass with a concept `Sam3Predictor`: its
  `set_image` runs the concept predictor's `set_image` (one ViT pass, counted in
  `concept.image_passes`) and feeds the same ViT output to the second neck; then text queries
  (`predictor.concept.predict(text=...)`) and clicks (`predictor.predict(point_coords=...)`) both
  use it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ..image import to_rgb_uint8
from ..modeling.transformer import TwoWayTransformer
from ..predictor import SamPredictor
from ..sam2.decoder import Sam2MaskDecoder, Sam2PromptEncoder
from ..sam2.model import Sam2
from .backbone import ViT, VisionBackbone
from .predictor import Sam3Predictor

logger = logging.getLogger(__name__)


def neck_convs(vit_dim: int, d_model: int, scale_factors) -> nn.ModuleList:
    """One FPN branch per scale factor, laid out as the detector's neck (Meta deep-copies it)."""
    return VisionBackbone(nn.Identity(), vit_dim, d_model, scale_factors).convs


class Sam3Interactive(nn.Module):
    """The ViT trunk (usually shared with a `Sam3Image`), the second neck and the SAM 2.1 heads.

    `state_dict()` keys: `trunk.*` (Meta: `detector.backbone.vision_backbone.trunk.*`),
    `sam2_convs.*` (`detector.backbone.vision_backbone.sam2_convs.*`), `no_mem_embed`,
    `sam_prompt_encoder.*`, `sam_mask_decoder.*` (`tracker.*`)."""

    family: str = "sam2"  # SamPredictor: SAM 2 prompts (box corners as points), square input
    mask_threshold: float = 0.0
    image_format: str = "RGB"
    used_levels: int = 3  # the 0.5x level exists in the checkpoint but is dropped (scalp 1)
    # Meta's SAM3InteractiveImagePredictor fills holes of up to 256 low-res pixels before upscaling
    # (SAM 2's image predictor does not, by default); 0 switches it off.
    max_hole_area: float = 256.0

    def __init__(
        self,
        trunk: ViT,
        *,
        image_size: int,
        patch_size: int,
        vit_dim: int,
        d_model: int = 256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_heads: int = 8,
        mlp_dim: int = 2048,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.trunk = trunk
        self.sam2_convs = neck_convs(vit_dim, d_model, scale_factors)
        grid = image_size // patch_size
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.sam_prompt_encoder = Sam2PromptEncoder(
            embed_dim=d_model, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
        )
        # Meta's tracker uses SAM 1's two-way transformer (MLP `lin1`/`lin2`) under SAM 2.1's decoder.
        self.sam_mask_decoder = Sam2MaskDecoder(
            transformer_dim=d_model,
            transformer=TwoWayTransformer(depth=2, embedding_dim=d_model, num_heads=num_heads, mlp_dim=mlp_dim),
            iou_head_hidden_dim=iou_head_hidden_dim,
        )

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    def features_from_trunk(self, trunk_map: torch.Tensor) -> dict:
        """The ViT output (B, vit_dim, g, g) -> SamPredictor features: {"image_embed": (B, d, g, g)
        with no_mem_embed added, "high_res_feats": [(B, d/8, 4g, 4g), (B, d/4, 2g, 2g)] already
        through the decoder's conv_s0 / conv_s1}."""
        convs, decoder = self.sam2_convs, self.sam_mask_decoder  # conv_s0 / conv_s1 folded in (NeckBranch)
        return {
            "image_embed": convs[2](trunk_map) + self.no_mem_embed.view(1, -1, 1, 1),
            "high_res_feats": [convs[0](trunk_map, decoder.conv_s0), convs[1](trunk_map, decoder.conv_s1)],
        }

    def encode_image(self, pixels: torch.Tensor) -> dict:
        """pixels (B, 3, S, S) RGB in [0, 1] (`ResizeSquare.to_input_tensor`); SAM 3 normalises
        with mean = std = 0.5."""
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        return self.features_from_trunk(self.trunk((pixels - 0.5) / 0.5))

    # The prompt -> mask path is SAM 2.1's, unchanged (box corners before clicks, labels 2 and 3),
    # fused decoding of several images' prompt sets (SamPredictor.predict_fused) included.
    decode = Sam2.decode
    embed_prompts = Sam2.embed_prompts
    decode_each = Sam2.decode_each

    def postprocess_masks(
        self, low_res_logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, C, 4g, 4g) logits -> (B, C, H, W) logits in the original frame: holes filled (see
        fill_holes; the returned low-res logits stay raw, as Meta's), then SAM 2's bilinear resize."""
        if self.max_hole_area > 0:
            low_res_logits = fill_holes(low_res_logits, self.max_hole_area, self.mask_threshold)
        return Sam2.postprocess_masks(self, low_res_logits, input_size, original_size)


def fill_holes(logits: torch.Tensor, max_area: float, threshold: float = 0.0) -> torch.Tensor:
    """Meta's hole filling: in each (..., h, w) logit map, every background region (logit <=
    threshold, 8-connected, touching the border or not) of at most `max_area` pixels is set to
    threshold + 10, i.e. made foreground."""
    from scipy import ndimage

    background = (logits <= threshold).cpu().numpy()
    flat = background.reshape(-1, *background.shape[-2:])
    holes = np.zeros_like(flat)
    eight_connected = np.ones((3, 3), dtype=bool)
    for index, plane in enumerate(flat):
        labels, count = ndimage.label(plane, structure=eight_connected)
        if count:
            small = np.bincount(labels.ravel()) <= max_area
            small[0] = False  # label 0 is the foreground
            holes[index] = small[labels]
    holes = torch.from_numpy(holes.reshape(background.shape)).to(logits.device)
    return torch.where(holes, torch.full_like(logits, threshold + 10.0), logits)


class Sam3InteractivePredictor(SamPredictor):
    """`SamPredictor` for SAM 3 clicks and boxes, sharing one image pass with `concept`.

    `set_image(image)` sets the image on `concept` too, so afterwards both
    `predictor.concept.predict(text="a dog")` and `predictor.predict(point_coords=..., ...)` run
    without another ViT pass. Prompts are in original-image pixels; `predict` returns masks
    (C, H, W), IoU predictions (C,) and low-res logits (C, 4g, 4g) (288x288 at 1008 px)."""

    def __init__(self, concept: Sam3Predictor, interactive: Sam3Interactive) -> None:
        if interactive.trunk is not concept.model.backbone.vision_backbone.trunk:
            raise ValueError("the interactive model must share the concept model's ViT trunk "
                             "(load both with sam.sam3.build.load_sam3_interactive_predictor)")
        super().__init__(interactive)
        self.concept = concept

    @torch.no_grad()
    def set_image(self, image, image_format: str = "RGB") -> None:
        """image: (H, W, 3) RGB uint8 (as SamPredictor) or a PIL image. One ViT pass for both
        predictors, preprocessed as the concept predictor does (Meta's `Sam3Processor`)."""
        self.reset_image()
        image = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else to_rgb_uint8(image, image_format)
        caught: list[torch.Tensor] = []
        # The trunk's output feeds both necks: catch it during the concept pass instead of rerunning it.
        handle = self.model.trunk.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            self.concept.set_image(image)
        finally:
            handle.remove()
        height, width = image.shape[:2]
        features = self.model.features_from_trunk(caught[-1].to(self.dtype))
        self._set(features, (height, width), (self.model.image_size, self.model.image_size))

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        raise NotImplementedError("Sam3InteractivePredictor takes images through set_image (shared with the "
                                  "concept predictor); use SamPredictor(Sam3Interactive) for set_torch_image")

    def set_image_batch(self, images, image_format: str = "RGB") -> None:
        raise NotImplementedError("Sam3InteractivePredictor sets one image at a time (the concept predictor "
                                  "caches one image); use SamPredictor(Sam3Interactive) for set_image_batch")

