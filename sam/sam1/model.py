"""The Sam model: image encoder + prompt encoder + mask decoder, with its fixed pre/post-processing."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from ..modeling.mask_decoder import MaskDecoder
from ..modeling.prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM 1. Shares with `Sam2` the small interface the predictor uses: `encode_image`,
    `decode` and `postprocess_masks`."""

    family: str = "sam1"
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not part of the official checkpoints, hence non-persistent.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    def encode_image(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, 3, h, w) RGB in [0, 255], longest side 1024 (model-input frame, before padding),
        or a list of (1, 3, h_i, w_i) of different sizes -> image embeddings (B, 256, 64, 64)."""
        if isinstance(pixels, torch.Tensor):
            return self.image_encoder(self.preprocess(pixels))
        return self.image_encoder(torch.cat([self.preprocess(image) for image in pixels]))

    def decode(
        self,
        features: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """One image's (1, 256, 64, 64) embedding against B prompt sets in the model-input frame:
        points ((B, N, 2) xy, (B, N) labels), boxes (B, 4) xyxy, mask_input (B, 1, 256, 256).

        Returns low-res logits (B, C, 256, 256), IoU predictions (B, C) and None (SAM 1 has no
        object score), C = 3 if multimask_output else 1.
        """
        sparse, dense = self.embed_prompts(points, boxes, mask_input)
        low_res_logits, iou_predictions = self.mask_decoder(
            image_embeddings=features,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return low_res_logits, iou_predictions, None

    def embed_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompt sets as `decode` takes them -> sparse (B, N, 256) and dense (B, 256, 64, 64)
        prompt embeddings."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)

    def decode_each(
        self,
        features: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_outputs: Sequence[bool],
    ) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
        """B prompt sets, each on its own image, in one decoder call: features (B, 256, 64, 64),
        one embedding per set; sparse (B, N, 256) and dense (B, 256, 64, 64) from
        `embed_prompts` (the same N for all: a padding token would change the masks);
        multimask_outputs: one flag per set.

        Returns, per set, what `decode` returns for it alone, bit for bit on CPU: low-res
        logits (1, C, 256, 256), IoU predictions (1, C) and None.
        """
        outputs = self.mask_decoder.predict_masks(
            features, self.prompt_encoder.get_dense_pe(), sparse, dense, batch_invariant=True
        )
        results = []
        for row, multimask_output in enumerate(multimask_outputs):
            low_res_logits, iou_predictions = self.mask_decoder.select_outputs(
                tuple(output[row : row + 1] for output in outputs), multimask_output
            )
            results.append((low_res_logits, iou_predictions, None))
        return results

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) float RGB in [0, 255], longest side 1024 -> normalised and zero-padded to 1024x1024."""
        x = (x - self.pixel_mean) / self.pixel_std
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """(B, M, 256, 256) low-res logits -> (B, M, H, W) logits in the original-image frame.

        Upsample to the padded model input, crop the padding away, then resize to the original size.
        """
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction for already-resized images (the official batched interface).

        Each input dict holds `image` (3, h, w) in the model-input frame and `original_size`, and
        optionally `point_coords` (B, N, 2), `point_labels` (B, N), `boxes` (B, 4), `mask_inputs`
        (B, 1, 256, 256), all in the model-input frame.
        """
        images = torch.stack([self.preprocess(record["image"][None])[0] for record in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            low_res_logits, iou_predictions, _ = self.decode(
                embedding[None], points, record.get("boxes"), record.get("mask_inputs"), multimask_output
            )
            masks = self.postprocess_masks(
                low_res_logits, tuple(record["image"].shape[-2:]), record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou_predictions,
                    "low_res_logits": low_res_logits,
                }
            )
        return outputs
