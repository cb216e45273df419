"""`Sam3Predictor`: concept segmentation on one image at a time, SAM-predictor style.

`set_image(image)` runs the image pass once; `predict(text=..., exemplars=...)` runs the text
encoder (cached per query string) and the DETR heads. Pre- and post-processing follow Meta's
`Sam3Processor`: the image is resized (antialiased) to a square of `config.image_size` and scaled to
[-1, 1]; mask logits are resized bilinearly to the image, then cut at 0 (sigmoid > 0.5), i.e.
resize-then-sigmoid (transformers applies the sigmoid before resizing, which differs on the edges).
Scores are presence x query probability; the default threshold is Meta's 0.5.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..image import to_rgb_uint8
from .layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .model import ImageFeatures, ImageTerms, Sam3Image
from .text import tokenize

logger = logging.getLogger(__name__)

# Meta's processor prompts an exemplar-only query with this placeholder text.
EXEMPLAR_ONLY_TEXT = "visual"


@dataclass
class Sam3Prediction:
    """Every instance found for one query: masks bool (N, H, W) at image resolution, boxes float
    (N, 4) xyxy in image pixels, scores (N,) = presence x query probability, labels (N,) the query."""

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    presence: float

    def __len__(self) -> int:
        return len(self.scores)


class Sam3Predictor:
    def __init__(self, model: Sam3Image, text_cache_size: int = 256) -> None:
        self.model = model.eval()
        self.image_size = model.config.image_size
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._features: ImageFeatures | None = None
        self._image_terms: ImageTerms | None = None  # decode's prompt-free parts, on the first query
        self._hw: tuple[int, int] | None = None
        self.image_passes = 0  # how many times the image encoder ran (the cache's test hook)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) RGB -> (1, 3, S, S) in [-1, 1], as Meta's processor does."""
        from torchvision.transforms.v2 import functional as TF

        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only arrays
            image = image.copy()
        tensor = torch.from_numpy(image).permute(2, 0, 1).to(self.device)
        tensor = TF.resize(tensor, [self.image_size, self.image_size], antialias=True)
        return ((tensor.float() / 255.0 - 0.5) / 0.5)[None]

    @torch.inference_mode()
    def set_image(self, image) -> None:
        """image: (H, W, 3) RGB uint8 array (other layouts are converted by `sam.image.to_rgb_uint8`,
        with a warning) or a PIL image. Runs the image encoder once."""
        array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else to_rgb_uint8(image)
        self._features = self.model.encode_image(self.preprocess(array))
        self._image_terms = None
        self._hw = array.shape[:2]
        self.image_passes += 1

    def _text(self, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        if query in self._text_cache:
            self._text_cache.move_to_end(query)
            return self._text_cache[query]
        ids = tokenize([query], self.model.config.context_length).to(self.device)
        encoded = self.model.encode_text(ids)
        self._text_cache[query] = encoded
        if len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return encoded

    def _exemplars(self, exemplars: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self._hw
        boxes, labels = [], []
        for item in exemplars:
            try:
                box, positive = item
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError) as error:
                raise ValueError(f"an exemplar is (box xyxy in pixels, positive: bool); got {item!r}") from error
            if not (np.isfinite([x0, y0, x1, y1]).all() and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise ValueError(
                    f"exemplar box {[x0, y0, x1, y1]} is not a non-empty xyxy box inside the {width}x{height} image"
                )
            boxes.append([x0 / width, y0 / height, x1 / width, y1 / height])
            labels.append(1 if positive else 0)
        xyxy = torch.tensor([boxes], dtype=torch.float32, device=self.device)
        return box_xyxy_to_cxcywh(xyxy), torch.tensor([labels], device=self.device)

    def _check_ready(self) -> None:
        if self._features is None:
            raise RuntimeError("call set_image(image) before predict()")

    def _decode(self, tokens, valid, boxes=None, labels=None) -> dict[str, torch.Tensor]:
        if self._image_terms is None:  # computed with the first query, so a click-only image never pays
            self._image_terms = self.model.image_terms(self._features)
        return self.model.decode(self._features, tokens, valid, boxes, labels, image_terms=self._image_terms)

    @staticmethod
    def _query(text) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty phrase; got {text!r}")
        return text.strip()

    @torch.inference_mode()
    def predict_many(self, texts: Sequence[str], threshold: float = 0.5) -> list[Sam3Prediction]:
        """Several text queries on the set image in one batched pass of the DETR heads (the image pass
        is shared); the same results as calling predict once per query."""
        self._check_ready()
        queries = [self._query(text) for text in texts]
        if not queries:
            return []
        encoded = [self._text(query) for query in queries]
        tokens = torch.cat([t for t, _ in encoded])
        valid = torch.cat([v for _, v in encoded])
        out = self._decode(tokens, valid)
        return [self.postprocess({k: v[i : i + 1] for k, v in out.items()}, threshold, text) for i, text in enumerate(texts)]

    @torch.inference_mode()
    def predict(self, text: str | None = None, exemplars: Sequence | None = None, threshold: float = 0.5) -> Sam3Prediction:
        """Find every instance of a concept given by a noun phrase, by exemplar boxes
        `[(xyxy_pixels, positive), ...]`, or both. Returns the instances scoring above `threshold`."""
        self._check_ready()
        if text is None and not exemplars:
            raise ValueError("give a text query, exemplar boxes, or both")
        query = self._query(text) if text is not None else EXEMPLAR_ONLY_TEXT
        tokens, valid = self._text(query)
        boxes = labels = None
        if exemplars:
            boxes, labels = self._exemplars(exemplars)
        out = self._decode(tokens, valid, boxes, labels)
        return self.postprocess(out, threshold, text if text is not None else "")

    def postprocess(self, out: dict[str, torch.Tensor], threshold: float, label: str) -> Sam3Prediction:
        """Decoder outputs (batch 1) -> a Sam3Prediction at image resolution."""
        height, width = self._hw
        presence = out["presence"][0].sigmoid()
        scores = out["logits"][0].sigmoid() * presence
        keep = scores > threshold
        boxes = box_cxcywh_to_xyxy(out["boxes"][0][keep]) * torch.tensor([width, height, width, height], device=scores.device)
        masks = out["masks"][0][keep]
        if len(masks):
            masks = F.interpolate(masks[None], size=(height, width), mode="bilinear", align_corners=False)[0] > 0
        else:
            masks = torch.zeros(0, height, width, dtype=torch.bool)
        return Sam3Prediction(
            masks=masks.cpu().numpy(),
            boxes=boxes.float().cpu().numpy(),
            scores=scores[keep].float().cpu().numpy(),
            labels=[label] * int(keep.sum()),
            presence=float(presence),
        )
