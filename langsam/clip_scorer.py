"""CLIP scoring of masks: which of SAM's masks does the text name?

Text goes through prompt templates into CLIP's text tower; every mask becomes a square crop that goes
through CLIP's image tower. Both are L2-normalised, compared by cosine similarity, scaled by the model's
trained temperature and turned into a softmax over the user's queries plus one background prompt.

The crop of a mask (``mask_crop``), in the original image's pixels:

1. the mask's tight bounding box ``[y0, y1) x [x0, x1)``;
2. grown on every side by ``margin = round(context_margin * max(y1 - y0, x1 - x0))`` pixels (halves
   round up), clipped to the image;
3. every pixel of that box outside the mask set to the fill colour, a neutral gray equal to the model's
   normalisation mean times 255, rounded (so it becomes ~0 after normalisation);
4. padded with the fill colour to a square, the crop centred (``offset = (side - size) // 2``);
5. preprocessed with open_clip's own inference transform (resize, centre crop, normalise).

Masks with fewer than ``min_mask_area`` pixels are too small to judge and are skipped.

``ClipMaskIndex`` holds the automatic masks of one image and their crop embeddings, so that every further
query on that image costs one text encoding and one matrix product.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_CLIP_THRESHOLD = 0.5
DEFAULT_CONTEXT_MARGIN = 0.1
DEFAULT_MIN_MASK_AREA = 100
DEFAULT_BATCH_SIZE = 32
# Averaging the text embedding over a few phrasings is the usual CLIP zero-shot recipe; the templates
# carry no article so that queries such as "the red car" read naturally. Four keep a further query's
# text pass at a few percent of an image's crop embedding (benchmarks/bench_clip.py).
DEFAULT_TEMPLATES = (
    "a photo of {}.",
    "a cropped photo of {}.",
    "a close-up photo of {}.",
    "a photo of a small {}.",
)
DEFAULT_BACKGROUND_PROMPTS = ("background",)
_TEXT_CACHE_SIZE = 1024
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


# ----------------------------------------------------------------------------------------------------
# input checks (public boundary)


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"image must be an HxWx3 uint8 RGB numpy array (use langsam.io.load_image), got {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an HxWx3 uint8 RGB array, got shape {image.shape} and dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    return image


def _check_masks(masks: Any, image_size: tuple[int, int]) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2 and masks.shape == tuple(image_size):
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != tuple(image_size):
        raise ValueError(
            f"masks must have shape (N, {image_size[0]}, {image_size[1]}) to match the image, got {masks.shape}"
        )
    if masks.dtype != bool:
        is_binary = np.issubdtype(masks.dtype, np.integer) and (masks.size == 0 or (masks.min() >= 0 and masks.max() <= 1))
        if not is_binary:
            raise ValueError(f"masks must be boolean (or 0/1 integers), got dtype {masks.dtype}")
        masks = masks.astype(bool)
    return masks


def _check_queries(queries: str | Iterable[str]) -> list[str]:
    if isinstance(queries, str):
        queries = [queries]
    try:
        queries = list(queries)
    except TypeError:
        raise ValueError(f"queries must be a string or a list of strings, got {type(queries).__name__}") from None
    if not queries:
        raise ValueError("queries is empty: give at least one text query")
    cleaned = []
    for query in queries:
        if not isinstance(query, str):
            raise ValueError(f"every query must be a string, got {query!r}")
        if not query.strip():
            raise ValueError(f"query {query!r} is empty")
        cleaned.append(query.strip())
    if len(set(cleaned)) != len(cleaned):
        duplicates = sorted({q for q in cleaned if cleaned.count(q) > 1})
        raise ValueError(f"queries contain duplicates: {duplicates}")
    return cleaned


def _check_threshold(clip_threshold: float | None) -> float | None:
    if clip_threshold is None:
        return None
    try:
        value = float(clip_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"clip_threshold must be a number in [0, 1] or None, got {clip_threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"clip_threshold must be in [0, 1] (it is a softmax probability), got {clip_threshold}")
    return value


def _check_top_k(top_k: int | None) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    return int(top_k)


# ----------------------------------------------------------------------------------------------------
# crops


def mask_crop(
    image: np.ndarray,
    mask: np.ndarray,
    context_margin: float = DEFAULT_CONTEXT_MARGIN,
    fill: tuple[int, int, int] = (123, 117, 104),
) -> Image.Image:
    """The square crop CLIP sees for one mask (rule in the module docstring).

    image: (H, W, 3) uint8 RGB; mask: (H, W) bool with at least one pixel set.
    Returns a square RGB PIL image of side max(crop height, crop width), before CLIP's preprocessing.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: it has no pixel to crop")
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    margin = int(context_margin * max(y1 - y0, x1 - x0) + 0.5)
    height, width = mask.shape
    top, bottom = max(0, y0 - margin), min(height, y1 + margin)
    left, right = max(0, x0 - margin), min(width, x1 + margin)

    fill_color = np.asarray(fill, dtype=np.uint8)
    region = image[top:bottom, left:right]
    inside = mask[top:bottom, left:right, None]
    crop_height, crop_width = region.shape[:2]
    side = max(crop_height, crop_width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill_color
    offset_y, offset_x = (side - crop_height) // 2, (side - crop_width) // 2
    canvas[offset_y:offset_y + crop_height, offset_x:offset_x + crop_width] = np.where(inside, region, fill_color)
    return Image.fromarray(canvas)


# ----------------------------------------------------------------------------------------------------
# AMG records


def _decode_segmentation(segmentation: Any, image_size: tuple[int, int]) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool, copy=False)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        from pycocotools import mask as mask_utils

        height, width = segmentation["size"]
        rle = segmentation
        if isinstance(rle["counts"], list):  # SAM's "uncompressed_rle" output mode
            rle = mask_utils.frPyObjects(rle, height, width)
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation, torch.Tensor):
        return segmentation.detach().cpu().numpy().astype(bool)
    raise ValueError(
        "a mask record's 'segmentation' must be an HxW bool array or a COCO RLE dict, "
        f"got {type(segmentation).__name__}"
    )


def masks_from_records(records: Sequence[dict], image_size: tuple[int, int]) -> np.ndarray:
    """Stack the 'segmentation' of SamAutomaticMaskGenerator records into (N, H, W) bool.

    Accepts every output_mode of the generator: "binary_mask", "uncompressed_rle" and "coco_rle".
    """
    height, width = image_size
    masks = np.zeros((len(records), height, width), dtype=bool)
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "segmentation" not in record:
            raise ValueError(f"mask record {index} is not a dict with a 'segmentation' entry")
        mask = _decode_segmentation(record["segmentation"], image_size)
        if mask.shape != (height, width):
            raise ValueError(f"mask record {index} has shape {mask.shape}, the image is {height}x{width}")
        masks[index] = mask
    return masks


# ----------------------------------------------------------------------------------------------------
# the scorer


class ClipScorer:
    """open_clip model + tokenizer + preprocessing, scoring masks against text queries.

    model_name: an open_clip architecture ("ViT-B-32"), or "local-dir:/folder" holding an
        open_clip_config.json and a weights file (then ``pretrained`` is ignored).
    pretrained: an open_clip weights tag ("laion2b_s34b_b79k", downloaded into open_clip's / the HF cache),
        a local weights file (a state dict: .bin/.pt/.pth via torch.load(weights_only=True), or .safetensors),
        or None for random weights (tests only).
    device, dtype: decided here once; defaults are CUDA if available else CPU, and float32.
    templates: prompt templates with one "{}"; a query's embedding is the normalised mean over templates.
    background_prompts: phrases averaged into the one background embedding (the last softmax column).
    context_margin, min_mask_area, batch_size: see the module docstring.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | os.PathLike | None = DEFAULT_CLIP_PRETRAINED,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        background_prompts: Sequence[str] = DEFAULT_BACKGROUND_PROMPTS,
        context_margin: float = DEFAULT_CONTEXT_MARGIN,
        min_mask_area: int = DEFAULT_MIN_MASK_AREA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        templates = tuple(templates)
        if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
            raise ValueError(f"templates must be a non-empty list of strings with exactly one '{{}}', got {templates}")
        background_prompts = tuple(_check_queries(background_prompts))
        if not 0.0 <= float(context_margin) <= 1.0:
            raise ValueError(f"context_margin must be in [0, 1] (a fraction of the box side), got {context_margin}")
        if isinstance(min_mask_area, bool) or not isinstance(min_mask_area, (int, np.integer)) or min_mask_area < 1:
            raise ValueError(f"min_mask_area must be a positive number of pixels, got {min_mask_area!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

        try:
            self.device = torch.device(device) if device is not None else torch.device(
                "cuda" if torch.cuda.is_available() else "cpu"
            )
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from error
        self.dtype = dtype if dtype is not None else torch.float32
        self.model_name = model_name
        self.pretrained = None if pretrained is None else str(pretrained)
        self.templates = templates
        self.background_prompts = background_prompts
        self.context_margin = float(context_margin)
        self.min_mask_area = int(min_mask_area)
        self.batch_size = int(batch_size)

        self.model, self.preprocess, self.tokenizer = _load_open_clip(
            model_name, self.pretrained, self.device, cache_dir
        )
        if self.dtype != torch.float32:
            self.model.to(dtype=self.dtype)
        self.model.eval().requires_grad_(False)

        import open_clip

        mean = open_clip.get_model_preprocess_cfg(self.model).get("mean") or _OPENAI_MEAN
        if not isinstance(mean, (list, tuple)):
            mean = (mean,) * 3
        self.fill = tuple(int(round(255 * float(m))) for m in mean)
        self._trim_text = _can_trim_text(self.model)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._background: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"ClipScorer(model_name={self.model_name!r}, pretrained={self.pretrained!r}, "
            f"device={str(self.device)!r}, dtype={self.dtype})"
        )

    @property
    def logit_scale(self) -> float:
        """The model's trained softmax temperature, exp(logit_scale)."""
        return float(self.model.logit_scale.detach().float().exp().item())

    # -- text ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _embed_phrases(self, phrases: list[str]) -> torch.Tensor:
        """(P, D) float32: each phrase through every template, normalised, averaged, renormalised."""
        texts = [template.format(phrase) for phrase in phrases for template in self.templates]
        tokens = self.tokenizer(texts).to(self.device)
        if self._trim_text:
            features = _encode_text_trimmed(self.model, tokens).float()
        else:
            features = self.model.encode_text(tokens).float()
        features = torch.nn.functional.normalize(features, dim=-1)
        features = features.reshape(len(phrases), len(self.templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1)

    def encode_text(self, queries: str | Sequence[str]) -> torch.Tensor:
        """(Q, D) float32 L2-normalised text embeddings on ``self.device``, template-averaged.

        Embeddings are kept in an LRU cache keyed by query, so repeated queries cost nothing.
        """
        queries = _check_queries(queries)
        missing = [q for q in queries if q not in self._text_cache]
        if missing:
            for query, embedding in zip(missing, self._embed_phrases(missing)):
                self._text_cache[query] = embedding
        for query in queries:
            self._text_cache.move_to_end(query)
        embeddings = torch.stack([self._text_cache[q] for q in queries])
        while len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings

    def background_embedding(self) -> torch.Tensor:
        """(D,) float32: the background prompts, each template-averaged, then averaged and renormalised."""
        if self._background is None:
            phrases = self._embed_phrases(list(self.background_prompts))
            self._background = torch.nn.functional.normalize(phrases.mean(dim=0), dim=-1)
        return self._background

    # -- images ----------------------------------------------------------------------------------

    def crop(self, image: np.ndarray, mask: np.ndarray) -> Image.Image:
        """The square PIL crop of one mask, with this scorer's margin and fill (see ``mask_crop``)."""
        return mask_crop(image, mask, self.context_margin, self.fill)

    @torch.inference_mode()
    def embed_masks(self, image: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Embed the crop of every mask large enough to judge, ``batch_size`` crops per forward pass.

        image: (H, W, 3) uint8 RGB.  masks: (N, H, W) bool in the same frame.
        Returns (embeddings (M, D) float32 L2-normalised on ``self.device``,
                 kept_index (M,) int64: which of the N masks each row belongs to, ascending).
        Masks with fewer than ``min_mask_area`` pixels are skipped.
        """
        image = _check_image(image)
        masks = _check_masks(masks, image.shape[:2])
        areas = masks.sum(axis=(1, 2))
        kept_index = np.flatnonzero(areas >= self.min_mask_area).astype(np.int64)
        if len(kept_index) < masks.shape[0]:
            logger.debug("skipping %d masks below %d pixels", masks.shape[0] - len(kept_index), self.min_mask_area)
        chunks = []
        for start in range(0, len(kept_index), self.batch_size):
            batch = torch.stack(
                [self.preprocess(self.crop(image, masks[i])) for i in kept_index[start:start + self.batch_size]]
            )
            features = self.model.encode_image(batch.to(self.device, self.dtype)).float()
            chunks.append(torch.nn.functional.normalize(features, dim=-1))
        if chunks:
            embeddings = torch.cat(chunks)
        else:
            embeddings = torch.zeros((0, self.embed_dim), dtype=torch.float32, device=self.device)
        return embeddings, kept_index

    @property
    def embed_dim(self) -> int:
        """D, the size of the joint embedding space."""
        output_dim = getattr(self.model.visual, "output_dim", None)
        return int(output_dim) if output_dim else int(self.background_embedding().shape[-1])

    # -- scores ----------------------------------------------------------------------------------

    def probabilities(self, mask_embeddings: torch.Tensor | np.ndarray, queries: str | Sequence[str]) -> np.ndarray:
        """(M, Q + 1) float32 softmax over the Q queries plus the background (last column).

        mask_embeddings: (M, D) L2-normalised, as returned by ``embed_masks``.
        logits = exp(logit_scale) * cosine(mask, text); the rows sum to 1.
        """
        queries = _check_queries(queries)
        embeddings = torch.as_tensor(mask_embeddings, dtype=torch.float32).to(self.device)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"mask_embeddings must have shape (M, {self.embed_dim}), got {tuple(embeddings.shape)}")
        text = torch.cat([self.encode_text(queries), self.background_embedding()[None]])
        logits = self.logit_scale * embeddings @ text.T
        return logits.softmax(dim=-1).cpu().numpy()

    def score_labels(
        self,
        image: np.ndarray,
        masks: np.ndarray,
        labels: Sequence[str],
        queries: Sequence[str] | None = None,
    ) -> np.ndarray:
        """(N,) float32: each mask's probability for its own label (hybrid mode's verification).

        The softmax runs over ``queries`` (default: the distinct labels in order of first appearance)
        plus the background, so a mask that looks more like another query or like background scores low.
        Masks below ``min_mask_area`` pixels cannot be judged and score 0.
        """
        image = _check_image(image)
        masks = _check_masks(masks, image.shape[:2])
        labels = list(labels)
        if len(labels) != masks.shape[0]:
            raise ValueError(f"got {masks.shape[0]} masks but {len(labels)} labels")
        if queries is None:
            if not labels:
                return np.zeros((0,), dtype=np.float32)
            queries = list(dict.fromkeys(label.strip() if isinstance(label, str) else label for label in labels))
        queries = _check_queries(queries)
        column = {query: index for index, query in enumerate(queries)}
        label_columns = []
        for label in labels:
            if not isinstance(label, str) or label.strip() not in column:
                raise ValueError(f"label {label!r} is not one of the queries {queries}")
            label_columns.append(column[label.strip()])
        embeddings, kept_index = self.embed_masks(image, masks)
        scores = np.zeros((masks.shape[0],), dtype=np.float32)
        if len(kept_index):
            probabilities = self.probabilities(embeddings, queries)
            scores[kept_index] = probabilities[np.arange(len(kept_index)), np.asarray(label_columns)[kept_index]]
        return scores

    def build_index(self, image: np.ndarray, masks: np.ndarray | Sequence[dict]) -> "ClipMaskIndex":
        """Embed the masks of one image once; query the returned index as often as needed."""
        return ClipMaskIndex(self, image, masks)


def _can_trim_text(model: torch.nn.Module) -> bool:
    """True for open_clip's standard CLIP text tower: causal mask, pooled at the end-of-text token."""
    import open_clip

    mask = getattr(model, "attn_mask", None)
    return (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and isinstance(mask, torch.Tensor)
        and mask.ndim == 2
        and bool(torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)))
    )


def _encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` run only up to the batch's last end-of-text token.

    The text tower is causal and reads its output at the end-of-text token (the highest token id),
    so the padding after it cannot change the result; prompts are ~10 of the 77 positions, which
    makes a query's text encoding several times cheaper. Parity with encode_text is tested.
    """
    end_positions = tokens.argmax(dim=-1)
    length = int(end_positions.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length].contiguous())
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), end_positions]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


def _load_open_clip(model_name: str, pretrained: str | None, device: torch.device, cache_dir):
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be an open_clip model name, got {model_name!r}")
    has_schema = model_name.startswith(("local-dir:", "hf-hub:"))
    is_file = False
    if has_schema:
        if model_name.startswith("local-dir:") and not os.path.isdir(model_name[len("local-dir:"):]):
            raise ValueError(f"{model_name!r}: no such folder (it must hold open_clip_config.json and the weights)")
        pretrained = None
    else:
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown CLIP model {model_name!r}; valid names: {', '.join(open_clip.list_models())}, "
                "or 'local-dir:/folder' / 'hf-hub:org/repo'"
            )
        if pretrained is not None:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            is_file = os.path.isfile(pretrained)
            if pretrained not in tags and not is_file:
                raise ValueError(
                    f"pretrained={pretrained!r} is neither an existing weights file nor a known tag for "
                    f"{model_name} (known tags: {', '.join(tags) or 'none'})"
                )
    if pretrained is None and not has_schema:
        logger.warning("CLIP model %s has random weights (pretrained=None): scores are meaningless", model_name)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, cache_dir=cache_dir, weights_only=True
        )
    except Exception as error:
        if is_file:
            raise ValueError(
                f"could not load CLIP weights file {pretrained} into {model_name}: {error}"
            ) from error
        if pretrained is not None:
            raise RuntimeError(
                f"could not get CLIP weights {model_name}/{pretrained}: {error}. Without internet, download the "
                "weights once elsewhere and pass the file: ClipScorer(model_name, pretrained='/path/to/weights.bin')"
            ) from error
        raise ValueError(f"could not create CLIP model {model_name!r}: {error}") from error
    tokenizer = open_clip.get_tokenizer(model_name)
    logger.info("loaded CLIP %s (%s) on %s", model_name, pretrained, device)
    return model, preprocess, tokenizer


# ----------------------------------------------------------------------------------------------------
# the per-image index for mode="clip"


class ClipMaskIndex:
    """The automatic masks of one image with their CLIP crop embeddings, computed once.

    scorer: the ClipScorer that embeds crops (and later the queries).
    image: (H, W, 3) uint8 RGB.
    masks: (N, H, W) bool, or SamAutomaticMaskGenerator records (any output_mode).

    Attributes: image_size (H, W); num_masks N; kept_index (M,) int64 (masks large enough to judge);
    embeddings (M, D) float32; boxes (N, 4) float32 xyxy in image pixels (the records' "bbox" when
    given, else torchvision's masks_to_boxes; both use inclusive max coordinates, as SAM does);
    mask_scores (N,) float32 (the records' "predicted_iou", 1.0 for plain masks).
    Masks are kept bit-packed (1 bit per pixel); ``masks(indices)`` unpacks the ones asked for.
    """

    def __init__(self, scorer: ClipScorer, image: np.ndarray, masks: np.ndarray | Sequence[dict]) -> None:
        image = _check_image(image)
        self.scorer = scorer
        self.image_size = (int(image.shape[0]), int(image.shape[1]))
        if isinstance(masks, (list, tuple)) and (len(masks) == 0 or isinstance(masks[0], dict)):
            records = masks
            masks = masks_from_records(records, self.image_size)
            if all("bbox" in record for record in records):  # SAM's XYWH -> xyxy
                self.boxes = np.array([record["bbox"] for record in records], dtype=np.float32).reshape(-1, 4)
                self.boxes[:, 2:] += self.boxes[:, :2]
            else:
                self.boxes = _boxes_from_masks(masks)
            self.mask_scores = np.array([r.get("predicted_iou", 1.0) for r in records], dtype=np.float32)
        else:
            masks = _check_masks(masks, self.image_size)
            self.boxes = _boxes_from_masks(masks)
            self.mask_scores = np.ones((masks.shape[0],), dtype=np.float32)
        self.num_masks = int(masks.shape[0])
        self.embeddings, self.kept_index = scorer.embed_masks(image, masks)
        self._packed = np.packbits(masks, axis=-1)

    def __len__(self) -> int:
        return self.num_masks

    def __repr__(self) -> str:
        return (
            f"ClipMaskIndex(image_size={self.image_size}, num_masks={self.num_masks}, "
            f"embedded={len(self.kept_index)})"
        )

    @property
    def nbytes(self) -> int:
        """Approximate memory held (packed masks + embeddings), for sizing a cache."""
        return int(self._packed.nbytes + self.embeddings.numel() * 4 + self.boxes.nbytes + self.mask_scores.nbytes)

    def masks(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """(K, H, W) bool: the masks at ``indices`` (all N when None)."""
        packed = self._packed if indices is None else self._packed[np.asarray(indices, dtype=np.int64)]
        return np.unpackbits(packed, axis=-1, count=self.image_size[1]).astype(bool)

    def probabilities(self, queries: str | Sequence[str]) -> np.ndarray:
        """(M, Q + 1) float32 softmax for the embedded masks (rows follow ``kept_index``)."""
        return self.scorer.probabilities(self.embeddings, queries)

    def query(
        self,
        queries: str | Sequence[str],
        clip_threshold: float | None = DEFAULT_CLIP_THRESHOLD,
        top_k: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which masks do the queries name?  Costs one text encoding and one matrix product.

        Each embedded mask gets one label, its most probable query, scored by that query's softmax
        probability (the queries and the background compete in the softmax).  Masks scoring at least
        ``clip_threshold`` are kept (None: no threshold), ranked by score (ties: lower mask index
        first) and cut to the ``top_k`` best (None: all).  With clip_threshold >= 0.5 a kept mask's
        label also beats the background.

        Returns (mask_indices (K,) int64 into the N masks, label_indices (K,) int64 into ``queries``,
        scores (K,) float32), best first.
        """
        queries = _check_queries(queries)
        clip_threshold = _check_threshold(clip_threshold)
        top_k = _check_top_k(top_k)
        if len(self.kept_index) == 0:
            empty = np.zeros((0,), dtype=np.int64)
            return empty, empty.copy(), np.zeros((0,), dtype=np.float32)
        query_probabilities = self.probabilities(queries)[:, :-1]
        label_indices = query_probabilities.argmax(axis=1)
        scores = query_probabilities[np.arange(len(label_indices)), label_indices]
        keep = np.ones(len(scores), dtype=bool) if clip_threshold is None else scores >= clip_threshold
        rows = np.flatnonzero(keep)
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        if top_k is not None:
            rows = rows[:top_k]
        return (
            self.kept_index[rows].astype(np.int64),
            label_indices[rows].astype(np.int64),
            scores[rows].astype(np.float32),
        )


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    from torchvision.ops import masks_to_boxes

    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    nonempty = masks.any(axis=(1, 2))
    if nonempty.any():
        boxes[nonempty] = masks_to_boxes(torch.from_numpy(masks[nonempty])).numpy()
    return boxes
