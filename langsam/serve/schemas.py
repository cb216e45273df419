"""Request and response schemas (validation and the OpenAPI docs), and the encoding of a
worker's results as those JSON bodies (masks as COCO RLE, NaN scores as null)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentParams(_Strict):
    """`/v1/segment` settings (the arguments of `LangSAM.segment`)."""

    text: str | list[str] = Field("", description="queries separated by '.', or a list of queries (may be empty "
                                                   "with SAM 3 exemplars)")
    mode: Literal["grounded", "hybrid", "clip"] = "grounded"
    box_threshold: float = Field(0.3, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    clip_threshold: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1000)
    multimask: bool = False
    model: Literal["grounding-dino", "sam3"] | None = Field(
        None, description="the concept model for this request; default: the server's (langsam serve --model)")
    exemplars: list[tuple[tuple[float, float, float, float], bool]] | None = Field(
        None, max_length=64,
        description="model sam3: exemplar boxes [[[x0, y0, x1, y1], positive], ...] in image pixels; as a form "
                    "field also 'x0,y0,x1,y1[:neg]' items separated by ';'")

    @field_validator("exemplars", mode="before")
    @classmethod
    def _exemplars_from_text(cls, value: Any) -> Any:
        """A form field is text: JSON, or the CLI's ``x0,y0,x1,y1[:neg]`` items joined by ';'."""
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            value = ";".join(value)  # the field repeated
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("exemplars is not valid JSON") from None
        items = []
        for part in filter(None, (part.strip() for part in value.split(";"))):
            coords, _, sign = part.partition(":")
            sign = sign.strip().lower() or "pos"
            if sign not in ("pos", "neg"):
                raise ValueError(f"exemplar {part!r}: the suffix must be :pos or :neg")
            items.append((coords.split(","), sign == "pos"))
        return items

    def job_settings(self, queries: list[str]) -> dict[str, Any]:
        """The worker's `segment` parameters: the queries and every setting; `model` and
        `exemplars` only when given, exemplars as tuples (the worker groups requests by settings)."""
        settings = self.model_dump(exclude={"text", "model", "exemplars"})
        if self.model is not None:
            settings["model"] = self.model
        if self.exemplars is not None:
            settings["exemplars"] = tuple((tuple(box), positive) for box, positive in self.exemplars)
        return {"queries": queries, **settings}


class AutoMaskParams(_Strict):
    """`/v1/auto-masks` settings (automatic mask generator parameters; unset ones keep the
    model family's defaults). Bounded so that one request cannot hold the server for long."""

    points_per_side: int | None = Field(None, ge=1, le=64)
    points_per_batch: int | None = Field(None, ge=1, le=256)
    pred_iou_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_offset: float | None = Field(None, ge=0.0, le=10.0)
    box_nms_thresh: float | None = Field(None, ge=0.0, le=1.0)
    crop_n_layers: int | None = Field(None, ge=0, le=2)
    crop_nms_thresh: float | None = Field(None, ge=0.0, le=1.0)
    crop_overlap_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int | None = Field(None, ge=1, le=4)
    min_mask_region_area: int | None = Field(None, ge=0, le=10_000_000)


class PredictParams(_Strict):
    """`/v1/predict`: prompts on an image sent to `/v1/images` (original-image pixels)."""

    image_id: str = Field(min_length=1, max_length=64)
    points: list[tuple[float, float]] | None = Field(None, max_length=64, description="(x, y) clicks")
    labels: list[int] | None = Field(None, max_length=64, description="1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(None, description="x0, y0, x1, y1")
    mask_input: str | None = Field(
        None, description="low-res logits from an earlier answer: base64 of 256x256 float32 little-endian")
    previous_mask: int | None = Field(
        None, ge=0, le=2, description="use candidate k of this image's last /v1/predict answer as mask_input")
    multimask: bool = True
    return_low_res: bool = Field(False, description="also return each candidate's 256x256 logits (base64)")


class ImageJSON(_Strict):
    image: str = Field(description="the image file (PNG, JPEG, WebP, BMP, GIF, TIFF, PPM), base64")


class SegmentJSON(SegmentParams):
    image: str = Field(description="the image file, base64")


class AutoMasksJSON(AutoMaskParams):
    image: str = Field(description="the image file, base64")


class RLE(BaseModel):
    size: list[int] = Field(description="[H, W]")
    counts: str = Field(description="COCO compressed RLE (pycocotools)")


#: Scores are null where the model gives NaN (JSON has no NaN), e.g. the stability of an empty mask.
Score = float | None


class SegmentObject(BaseModel):
    label: str
    score: Score
    mask_score: Score
    clip_score: Score
    box: list[float] = Field(description="x0, y0, x1, y1 in pixels")
    bbox: list[float] = Field(description="COCO x, y, w, h")
    area: float
    segmentation: RLE


class SegmentResponse(BaseModel):
    width: int
    height: int
    mode: str
    objects: list[SegmentObject]


class AutoMask(BaseModel):
    segmentation: RLE
    area: float
    bbox: list[float]
    predicted_iou: Score
    stability_score: Score
    point_coords: list[list[float]]
    crop_box: list[float]


class AutoMasksResponse(BaseModel):
    width: int
    height: int
    masks: list[AutoMask]


class ImageResponse(BaseModel):
    image_id: str
    width: int
    height: int


class PredictResponse(BaseModel):
    image_id: str
    width: int
    height: int
    masks: list[RLE]
    scores: list[Score]
    low_res_masks: list[str] | None = None


class ErrorResponse(BaseModel):
    detail: str


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 503, 504)}

def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def _score(value: Any) -> float | None:
    """A score as JSON, which has no NaN: NaN -> null. (An empty automatic mask has stability
    0 / 0 = NaN, in this generator and in Meta's alike.)"""
    value = float(value)
    return value if math.isfinite(value) else None


def _encode_segmentation(result: Any) -> dict[str, Any]:
    height, width = result.image_size
    objects = []
    for index, annotation in enumerate(result.to_coco()):
        objects.append({
            "label": annotation["label"],
            "score": _score(result.scores[index]),
            "mask_score": _score(result.mask_scores[index]),
            "clip_score": None if result.clip_scores is None else _score(result.clip_scores[index]),
            "box": [float(v) for v in result.boxes[index]],
            "bbox": [float(v) for v in annotation["bbox"]],
            "area": float(annotation["area"]),
            "segmentation": annotation["segmentation"],
        })
    return {"width": int(width), "height": int(height), "mode": result.mode, "objects": objects}


def _encode_auto_masks(payload: dict[str, Any]) -> dict[str, Any]:
    masks = []
    for record in payload["records"]:
        rle = record["segmentation"]
        counts = rle["counts"]
        masks.append({
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "area": float(record["area"]),
            "bbox": [float(v) for v in record["bbox"]],
            "predicted_iou": _score(record["predicted_iou"]),
            "stability_score": _score(record["stability_score"]),
            "point_coords": [[float(v) for v in point] for point in record["point_coords"]],
            "crop_box": [float(v) for v in record["crop_box"]],
        })
    return {"width": int(payload["width"]), "height": int(payload["height"]), "masks": masks}


def _encode_prediction(payload: dict[str, Any]) -> dict[str, Any]:
    body = {
        "image_id": payload["image_id"],
        "width": payload["width"],
        "height": payload["height"],
        "masks": [_rle(mask) for mask in payload["masks"]],
        "scores": [_score(score) for score in payload["scores"]],
    }
    if payload["low_res"] is not None:
        body["low_res_masks"] = [
            base64.b64encode(np.ascontiguousarray(logits, dtype="<f4").tobytes()).decode("ascii")
            for logits in payload["low_res"]
        ]
    return body


_ENCODERS = {
    "segment": _encode_segmentation,
    "auto_masks": _encode_auto_masks,
    "image": lambda payload: payload,
    "predict": _encode_prediction,
    "stats": lambda payload: payload,
}
