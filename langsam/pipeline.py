"""LangSAM: an image and text in, a :class:`~langsam.result.Segmentation` out.

Data flow (mode ``"grounded"``): image -> ``load_image`` -> Grounding DINO (all queries in one
caption, one forward pass) -> boxes -> SAM image embedding (cached per image content) -> ONE
batched ``predict_torch`` call for all boxes -> masks. Mode ``"hybrid"`` adds a CLIP check of
each mask against its label; mode ``"clip"`` ranks SAM's automatic masks with CLIP instead of
using the detector.

With ``model="sam3"`` SAM 3 is the concept model instead of Grounding DINO + SAM: one image pass,
then per query the text encoder (cached) and the DETR heads give every instance's box, score and
mask; positive / negative exemplar boxes steer it. Mode ``"hybrid"`` verifies those with CLIP too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from langsam.detector import DEFAULT_DETECTOR, Detections, parse_queries
from langsam.io import ImageSource, load_image
from langsam.result import MODES, Segmentation, clip_boxes

logger = logging.getLogger(__name__)

__all__ = ["CONCEPT_MODELS", "EXEMPLAR_LABEL", "LangSAM", "check_amg_params", "check_exemplars", "image_key",
           "resolve_device", "resolve_dtype"]

#: ``LangSAM(model=...)``: the concept model that turns text into objects. ``"grounding-dino"``:
#: Grounding DINO boxes, then SAM (``sam_type``) masks; ``"sam3"``: SAM 3 finds every instance itself.
CONCEPT_MODELS = ("grounding-dino", "sam3")
DEFAULT_MODEL = "grounding-dino"
#: The label of objects found from exemplar boxes alone (no text).
EXEMPLAR_LABEL = "exemplar"

#: SAM 2.1 small: better 1-click mIoU than SAM 1 ViT-H in the SAM 2 paper, and set_image costs
#: 0.32x vit_b's on CPU here (benchmarks/bench_models.py).
DEFAULT_SAM_TYPE = "sam2.1_hiera_small"
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_CLIP_THRESHOLD = 0.5  # clip/hybrid: keep masks whose own label has CLIP probability >= this
#: Bytes of full-resolution mask logits decoded at once in grounded / hybrid mode (see _segment_boxes).
MASK_CHUNK_BYTES = 256 * 1024 * 1024

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def resolve_device(device: Any = None):
    """``torch.device`` to run on: the one asked for, else cuda, then mps, then cpu.

    Raises:
        ValueError: an unknown device string, or cuda/mps asked for but not available.
    """
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device='cpu'")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for but MPS is not available; use device='cpu'")
    return resolved


def resolve_dtype(dtype: Any = None):
    """``torch.dtype`` from None (float32), a torch dtype, or a name like ``"bf16"``."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return getattr(torch, name)


def check_amg_params(amg_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate automatic-mask-generator settings by name (their values are checked by the
    generator itself, when it is built). Returns a plain dict (empty for None)."""
    if amg_params is None:
        return {}
    if not isinstance(amg_params, Mapping):
        raise ValueError(f"amg_params must be a dict of generator settings, got {type(amg_params).__name__}")
    import inspect

    from sam.automatic_mask_generator import Sam2AutomaticMaskGenerator

    # The pipeline decides device, dtype and output format itself. The SAM 2 generator takes
    # every setting of the SAM 1 one, plus its own; which model family is loaded is not known yet.
    accepted = set(inspect.signature(Sam2AutomaticMaskGenerator.__init__).parameters) - {
        "self", "model", "device", "dtype", "output_mode"}
    unknown = sorted(set(amg_params) - accepted)
    if unknown:
        raise ValueError(f"unknown amg_params {unknown}; valid names: {', '.join(sorted(accepted))}")
    for name, value in amg_params.items():
        try:
            hash(value)
        except TypeError:
            raise ValueError(f"amg_params[{name!r}] must be a number, string or None (got {type(value).__name__}); "
                             f"explicit point_grids are not supported in clip mode") from None
    return dict(amg_params)


def image_key(pixels: np.ndarray) -> str:
    """Content hash of an ``(H, W, 3)`` uint8 image (shape included), the embedding-cache key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


def _no_text(text: Any) -> bool:
    """True for no query at all: None, an empty or blank string, or an empty list."""
    if text is None:
        return True
    if isinstance(text, str):
        return not text.strip(" .")
    return isinstance(text, Sequence) and len(text) == 0


def check_exemplars(exemplars: Any, image_size: tuple[int, int]) -> list[tuple[tuple[float, float, float, float], bool]]:
    """Validate SAM 3 exemplar boxes ``[(box, positive), ...]`` against the image they are drawn
    on: ``box`` is ``(x0, y0, x1, y1)`` in original-image pixels, inside ``(H, W)`` and not empty;
    ``positive`` a bool (True: "more like this", False: "not like this"). Returns them as tuples."""
    height, width = image_size
    if isinstance(exemplars, (str, bytes)) or not isinstance(exemplars, Sequence):
        raise ValueError(f"exemplars must be a list of (box, positive) pairs, got {type(exemplars).__name__}")
    checked = []
    for index, item in enumerate(exemplars):
        try:
            box, positive = item
            coords = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"exemplar {index} must be (box x0,y0,x1,y1 in pixels, positive: bool); got {item!r}") from None
        if len(coords) != 4 or not isinstance(positive, (bool, np.bool_)):
            raise ValueError(f"exemplar {index} must be (box x0,y0,x1,y1 in pixels, positive: bool); got {item!r}")
        x0, y0, x1, y1 = coords
        if not np.isfinite(coords).all():
            raise ValueError(f"exemplar {index}: box {list(coords)} has NaN or infinite coordinates")
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"exemplar {index}: box {list(coords)} is empty (needs x1 > x0 and y1 > y0)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"exemplar {index}: box {list(coords)} lies outside the {width}x{height} image")
        checked.append((coords, bool(positive)))
    return checked


def _default_sam3_checkpoint():
    """The registry's ``"sam3"`` checkpoint (cached / downloaded by ``langsam.weights``)."""
    from sam.build import MODEL_SPECS

    from langsam.weights import resolve_sam_checkpoint

    if "sam3" not in MODEL_SPECS:
        raise ValueError("no SAM 3 weights are registered for download in this version: pass "
                         "sam3_checkpoint=PATH (CLI: --sam3-checkpoint PATH), Meta's sam3.pt or a transformers "
                         "save_pretrained folder of facebook/sam3 (gated on the Hugging Face hub: request access "
                         "there, then download it)")
    return resolve_sam_checkpoint("sam3")


class LangSAM:
    """Text-prompted segmentation: Grounding DINO boxes -> SAM masks (+ optional CLIP).

    Nothing loads in the constructor; each model loads on first use, once.

    Args:
        sam_type: any name of the SAM registry (``sam.build.valid_model_types()``): SAM 2.1
            ``"sam2.1_hiera_tiny"``, ``"sam2.1_hiera_small"``, ``"sam2.1_hiera_base_plus"``,
            ``"sam2.1_hiera_large"``, SAM 2.0 ``"sam2_hiera_*"``, SAM 1 ``"vit_b"``, ``"vit_l"``,
            ``"vit_h"``, or ``"auto"`` (family and size inferred from ``sam_checkpoint``).
        sam_checkpoint: local SAM checkpoint; None downloads the official one (cached).
        detector: Grounding DINO hub id or local ``save_pretrained`` folder.
        clip_model, clip_pretrained: open_clip name and tag or local weights file (clip and
            hybrid modes only).
        device: None picks cuda, then mps, then cpu. dtype: None is float32.
        sam_model: an already-built SAM (``sam.Sam`` or ``sam.Sam2``) or ``SamPredictor``.
        detector_model: an object with ``detect(image, queries, box_threshold, text_threshold)
            -> Detections`` (e.g. a :class:`~langsam.detector.GroundingDinoDetector`).
        clip_scorer: a :class:`~langsam.clip_scorer.ClipScorer`.
        embedding_cache_size: how many image embeddings to keep (LRU by image content); 0
            disables the cache. A SAM 1 embedding is 4 MiB in float32; SAM 2's multi-level
            features are 16 MiB.
        amg_params: automatic-mask-generator settings for ``mode="clip"`` (``points_per_side``,
            ``pred_iou_thresh``, ...; see ``sam.SamAutomaticMaskGenerator``); None: its defaults.
            ``segment(..., amg_params=...)`` overrides them per call.
        detector_size: the longest image side fed to Grounding DINO (speed for accuracy); None
            keeps the released preprocessing (shortest side 800, longest 1333).
        model: the concept model, one of :data:`CONCEPT_MODELS`: ``"grounding-dino"`` (default:
            Grounding DINO boxes -> SAM masks) or ``"sam3"`` (SAM 3 finds, boxes and masks every
            instance itself, and takes exemplar boxes). ``segment(..., model=...)`` overrides it per call.
        sam3_checkpoint: SAM 3 weights: Meta's ``sam3.pt`` (a ``config.json`` beside it is read if
            present) or a transformers ``save_pretrained`` folder / its ``model.safetensors``; None
            asks the weights registry for its ``"sam3"`` entry.
        sam3_model: an already-built ``sam.sam3.Sam3Image`` or ``Sam3Predictor``.
    """

    def __init__(
        self,
        sam_type: str = DEFAULT_SAM_TYPE,
        sam_checkpoint: str | os.PathLike | None = None,
        detector: str | os.PathLike = DEFAULT_DETECTOR,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str | os.PathLike | None = DEFAULT_CLIP_PRETRAINED,
        device: Any = None,
        dtype: Any = None,
        *,
        sam_model: Any = None,
        detector_model: Any = None,
        clip_scorer: Any = None,
        embedding_cache_size: int = 4,
        amg_params: Mapping[str, Any] | None = None,
        detector_size: int | None = None,
        model: str = DEFAULT_MODEL,
        sam3_checkpoint: str | os.PathLike | None = None,
        sam3_model: Any = None,
    ) -> None:
        if detector_size is not None and (
            isinstance(detector_size, bool) or not isinstance(detector_size, int) or detector_size < 64
        ):
            raise ValueError(f"detector_size must be an integer >= 64 or None, got {detector_size!r}")
        if not isinstance(embedding_cache_size, int) or embedding_cache_size < 0:
            raise ValueError(f"embedding_cache_size must be an integer >= 0, got {embedding_cache_size!r}")
        if sam_type == "sam3":  # SAM 3 is not a mask model for detector boxes here: it is the concept model
            raise ValueError('sam_type="sam3": SAM 3 finds the objects itself; use LangSAM(model="sam3") '
                             '(sam3_checkpoint=<sam3.pt> for a local file)')
        if sam_model is None and sam_checkpoint is None and sam_type == "auto":
            raise ValueError('sam_type="auto" infers the model size from a checkpoint: pass sam_checkpoint=<path>')
        if sam_checkpoint is not None and not os.path.isfile(sam_checkpoint):
            raise ValueError(f"SAM checkpoint {os.fspath(sam_checkpoint)!r} does not exist or is not a file")
        self.model = self._check_model(model)
        if sam3_checkpoint is not None and not os.path.exists(sam3_checkpoint):
            raise ValueError(f"SAM 3 checkpoint {os.fspath(sam3_checkpoint)!r} does not exist (give Meta's sam3.pt or "
                             "a transformers save_pretrained folder)")
        self.sam3_checkpoint = sam3_checkpoint
        self._sam3_source = sam3_model
        self._sam3 = None
        self._sam3_video = None  # SAM 3's video predictor (track with model="sam3"), built on first use
        self._sam3_video_checkpoint = None  # ... and the file it came from
        self._sam3_image = None  # (image_key, image_passes) when the SAM 3 predictor holds our image
        self.sam_type = sam_type
        self.sam_checkpoint = sam_checkpoint
        self.detector_name = os.fspath(detector)
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.embedding_cache_size = embedding_cache_size
        self.amg_params = check_amg_params(amg_params)
        self.detector_size = detector_size
        self._sam_source = sam_model
        self._predictor = None
        self._detector = detector_model
        self._clip_scorer = clip_scorer
        self._embeddings: OrderedDict[str, tuple] = OrderedDict()
        self._clip_indexes: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.RLock()  # the predictor holds one image at a time

    def __repr__(self) -> str:
        concept = "" if self.model == DEFAULT_MODEL else f"model={self.model!r}, "
        return (f"LangSAM({concept}sam_type={self.sam_type!r}, detector={self.detector_name!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype})")

    @staticmethod
    def _check_model(model: Any) -> str:
        if model not in CONCEPT_MODELS:
            raise ValueError(f"model must be one of {', '.join(CONCEPT_MODELS)}, got {model!r}")
        return model

    # ------------------------------------------------------------------ lazy models
    @property
    def predictor(self):
        """The ``sam.SamPredictor`` (built on first access, once)."""
        with self._lock:
            if self._predictor is None:
                from sam import SamPredictor, build_sam

                source = self._sam_source
                if isinstance(source, SamPredictor):
                    self._predictor = source
                else:
                    if source is None:
                        from langsam.weights import resolve_sam_checkpoint

                        checkpoint = resolve_sam_checkpoint(self.sam_type, self.sam_checkpoint)
                        logger.info("loading SAM %s from %s", self.sam_type, checkpoint)
                        source = build_sam(self.sam_type, checkpoint=checkpoint)
                    self._predictor = SamPredictor(source, device=self.device, dtype=self.dtype)
            return self._predictor

    @property
    def detector(self):
        """The text detector (a ``GroundingDinoDetector`` unless one was injected)."""
        with self._lock:
            if self._detector is None:
                from langsam.detector import GroundingDinoDetector

                options = {} if self.detector_size is None else {"detector_size": self.detector_size}
                self._detector = GroundingDinoDetector(self.detector_name, device=self.device, dtype=self.dtype,
                                                       **options)
            return self._detector

    @property
    def clip_scorer(self):
        """The ``ClipScorer`` for modes clip and hybrid (built on first access)."""
        with self._lock:
            if self._clip_scorer is None:
                from langsam.clip_scorer import ClipScorer

                self._clip_scorer = ClipScorer(self.clip_model, self.clip_pretrained, device=self.device,
                                               dtype=self.dtype)
            return self._clip_scorer

    @property
    def sam3_predictor(self):
        """The ``sam.sam3.Sam3Predictor`` of ``model="sam3"`` (built on first access, once)."""
        with self._lock:
            if self._sam3 is None:
                import torch

                from sam.sam3 import Sam3Image, Sam3Predictor, load_sam3

                if self.dtype != torch.float32:
                    raise ValueError(f"model='sam3' runs in float32 here; got dtype={self.dtype}")
                source = self._sam3_source
                if isinstance(source, Sam3Predictor):
                    self._sam3 = source
                    return source
                if source is None:
                    checkpoint = self.sam3_checkpoint
                    if checkpoint is None:
                        checkpoint = _default_sam3_checkpoint()
                    logger.info("loading SAM 3 from %s", checkpoint)
                    source = load_sam3(checkpoint)
                if not isinstance(source, Sam3Image):
                    raise ValueError(f"sam3_model must be a sam.sam3.Sam3Image or Sam3Predictor, got {type(source).__name__}")
                self._sam3 = Sam3Predictor(source.to(self.device))
            return self._sam3

    def load_models(self, mode: str = "grounded", model: str | None = None) -> None:
        """Load now every model ``segment(mode=mode, model=model)`` needs (``mode="sam"``: SAM
        alone), so that a missing one fails once, at start, not on the first image."""
        model = self.model if model is None else self._check_model(model)
        if mode in ("grounded", "hybrid") and model == "sam3":
            self.sam3_predictor
        else:
            self.predictor
            if mode in ("grounded", "hybrid"):
                detector = self.detector
                if hasattr(detector, "load"):
                    detector.load()
        if mode in ("clip", "hybrid"):
            self.clip_scorer

    # ------------------------------------------------------------------ embedding cache
    def set_image(self, pixels: np.ndarray) -> str:
        """Make ``pixels`` the predictor's image, reusing a cached embedding when the same
        image content was seen recently. Returns the image key."""
        key = image_key(pixels)
        with self._lock:
            predictor = self.predictor
            cached = self._embeddings.get(key)
            if cached is not None:
                self._embeddings.move_to_end(key)
                # The predictor may be shared (injected) and hold another image by now: compare
                # the embedding itself, then restore the documented predictor state if needed.
                if not (predictor.is_image_set and predictor.features is cached[0]):
                    predictor.set_embedding(*cached)
            else:
                predictor.set_image(pixels)
                if self.embedding_cache_size > 0:
                    self._embeddings[key] = (predictor.features, predictor.original_size, predictor.input_size)
                    while len(self._embeddings) > self.embedding_cache_size:
                        self._embeddings.popitem(last=False)
            return key

    def clear_cache(self) -> None:
        """Drop cached image embeddings, CLIP mask indexes and the detector's caption cache."""
        with self._lock:
            self._embeddings.clear()
            self._clip_indexes.clear()
            if self._detector is not None and hasattr(self._detector, "clear_cache"):
                self._detector.clear_cache()
            if self._predictor is not None:
                self._predictor.reset_image()
            self._sam3_image = None

    # ------------------------------------------------------------------ public API
    def segment(
        self,
        image: ImageSource,
        text: str | Sequence[str] | None,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        mode: str = "grounded",
        multimask: bool = False,
        clip_threshold: float | None = None,
        top_k: int | None = None,
        amg_params: Mapping[str, Any] | None = None,
        exemplars: Sequence[tuple[Sequence[float], bool]] | None = None,
        model: str | None = None,
    ) -> Segmentation:
        """Segment every object the text names.

        Args:
            image: a path, a PIL image or an ``(H, W, 3)`` uint8 RGB array (see ``load_image``).
            text: one string with queries separated by ``.`` (``"a dog. a cat"``) or a list of
                queries. Labels in the result are these queries, as written. With SAM 3 and
                exemplars it may be None or empty: the objects are then labelled ``"exemplar"``.
            box_threshold: the minimum object score: Grounding DINO's box score, or with SAM 3
                its score presence x query probability (0.3 is also transformers' default for
                SAM 3; Meta's own is 0.5).
            text_threshold: Grounding DINO's text-token threshold (unused by SAM 3).
            mode: ``"grounded"`` (the concept model's objects: detector boxes -> SAM, or SAM 3's
                instances), ``"hybrid"`` (grounded, then keep masks whose CLIP probability for
                their own label is >= ``clip_threshold``) or ``"clip"`` (SAM automatic masks
                ranked by CLIP; no concept model).
            multimask: ask SAM for 3 masks per box and keep the one with the best predicted IoU
                (Grounding DINO + SAM only).
            clip_threshold: CLIP probability cut (clip / hybrid; None: 0.5).
            top_k: keep at most this many objects, best first.
            amg_params: automatic-mask-generator settings for this call (clip mode only);
                None uses the pipeline's ``amg_params``.
            exemplars: SAM 3 only: ``[(box, positive), ...]`` with ``box`` ``(x0, y0, x1, y1)`` in
                image pixels and ``positive`` True ("more like this") or False ("not like
                this"). They join every query's prompt, or stand alone without text.
            model: the concept model for this call (see :data:`CONCEPT_MODELS`); None: the
                pipeline's ``model``.

        Returns:
            A :class:`Segmentation` (objects best first); empty with masks ``(0, H, W)`` when
            nothing is found. With SAM 3, ``scores`` and ``mask_scores`` are both SAM 3's
            score (it has no separate mask-quality estimate).

        Raises:
            ValueError: empty text (and no exemplars), unknown mode or model, thresholds out
                of range, bad exemplars, unreadable image.
        """
        model = self._check_segment(text, mode, exemplars, model)
        queries = [] if _no_text(text) else parse_queries(text)
        amg_params = self._check_options(box_threshold, text_threshold, mode, clip_threshold, top_k, amg_params)
        pixels = load_image(image)
        checked = None if exemplars is None else check_exemplars(exemplars, pixels.shape[:2])
        with self._lock:
            if mode == "clip":
                return self._segment_clip(pixels, queries, clip_threshold, top_k, amg_params)
            if model == "sam3":
                result = self._segment_sam3(pixels, queries, checked, box_threshold, mode,
                                            top_k if mode == "grounded" else None)
            else:
                detections = self.detector.detect(pixels, queries, box_threshold=box_threshold,
                                                  text_threshold=text_threshold)
                result = self._segment_boxes(pixels, detections, multimask, mode,
                                             top_k if mode == "grounded" else None)
            if mode == "hybrid":
                result = self._verify_with_clip(result, queries, clip_threshold, top_k)
            return result

    def segment_batch(self, images: Sequence[ImageSource], texts: str | Sequence[str] | Sequence[Sequence[str]] | None,
                      box_threshold: float = 0.3, text_threshold: float = 0.25, mode: str = "grounded",
                      multimask: bool = False, clip_threshold: float | None = None, top_k: int | None = None,
                      amg_params: Mapping[str, Any] | None = None,
                      detector_batch_size: int | None = None,
                      exemplars: Sequence[tuple[Sequence[float], bool]] | None = None,
                      model: str | None = None) -> list[Segmentation]:
        """:meth:`segment` over several images; the results equal one :meth:`segment` per image.

        ``texts`` is either one text for every image (a string, or a list of query strings) or
        one text per image given as a list of lists (``[["a dog"], ["a cat", "a hat"]]``).
        Each image costs one SAM encoding. In modes grounded and hybrid the detector sees the
        images through ``detect_batch``: images of the same detector input size share forward
        passes of up to ``detector_batch_size`` images (default: 1 on CPU, 8 on a GPU), and the
        caption is encoded once for all of them. With SAM 3 (``model="sam3"``) each image is one
        image pass and ``exemplars`` (pixels) apply to every image.
        """
        images = list(images)
        if texts and not isinstance(texts, str) and all(isinstance(t, (list, tuple)) for t in texts):
            per_image = list(texts)
            if len(per_image) != len(images):
                raise ValueError(f"got {len(images)} images but {len(per_image)} per-image texts")
        else:
            per_image = [texts] * len(images)
        for text in per_image:
            model = self._check_segment(text, mode, exemplars, model)
        query_lists = [[] if _no_text(text) else parse_queries(text) for text in per_image]  # fail before image work
        amg_params = self._check_options(box_threshold, text_threshold, mode, clip_threshold, top_k, amg_params)
        pixels = [load_image(image) for image in images]
        checked = [None if exemplars is None else check_exemplars(exemplars, image.shape[:2]) for image in pixels]
        with self._lock:
            if mode == "clip":
                return [self._segment_clip(image, queries, clip_threshold, top_k, amg_params)
                        for image, queries in zip(pixels, query_lists)]
            if model == "sam3":
                detections = [None] * len(pixels)
            else:
                detector = self.detector
                if hasattr(detector, "detect_batch"):
                    detections = detector.detect_batch(pixels, query_lists, box_threshold, text_threshold,
                                                       batch_size=detector_batch_size)
                else:  # an injected detector with detect() only
                    detections = [detector.detect(image, queries, box_threshold=box_threshold,
                                                  text_threshold=text_threshold)
                                  for image, queries in zip(pixels, query_lists)]
            results = []
            for image, queries, found, boxes in zip(pixels, query_lists, detections, checked):
                keep = top_k if mode == "grounded" else None
                if model == "sam3":
                    result = self._segment_sam3(image, queries, boxes, box_threshold, mode, keep)
                else:
                    result = self._segment_boxes(image, found, multimask, mode, keep)
                if mode == "hybrid":
                    result = self._verify_with_clip(result, queries, clip_threshold, top_k)
                results.append(result)
            return results

    def _check_segment(self, text: Any, mode: str, exemplars: Any, model: str | None) -> str:
        """The concept model of a segment call, after checking that it can serve this call."""
        model = self.model if model is None else self._check_model(model)
        if mode == "clip" and (model == "sam3" or exemplars):
            raise ValueError("mode='clip' ranks SAM's automatic masks with CLIP and uses no concept model, so it takes "
                             "neither model='sam3' nor exemplars; use mode='grounded' or 'hybrid' with SAM 3")
        if exemplars and model != "sam3":
            raise ValueError("exemplar boxes need model='sam3': Grounding DINO takes text only")
        if _no_text(text) and mode == "hybrid":
            raise ValueError("mode='hybrid' checks each mask against its query with CLIP, so it needs text")
        if _no_text(text) and not exemplars:
            raise ValueError("text is empty: give at least one query, e.g. 'a dog' or 'a dog. a cat.'"
                             + (", or exemplar boxes" if model == "sam3" else ""))
        return model

    def _check_options(self, box_threshold: float, text_threshold: float, mode: str, clip_threshold: float | None,
                       top_k: int | None, amg_params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate :meth:`segment`'s options; returns the generator settings to use."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if clip_threshold is not None and (not isinstance(clip_threshold, (int, float)) or not 0.0 <= clip_threshold <= 1.0):
            raise ValueError(f"clip_threshold must be a number in [0, 1] or None, got {clip_threshold!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if amg_params is not None and mode != "clip":
            raise ValueError(f"amg_params are the automatic mask generator's settings and apply only to "
                             f"mode='clip', not mode={mode!r}")
        return self.amg_params if amg_params is None else check_amg_params(amg_params)

    def track(self, video: Any, text: str | Sequence[str], detect_every: int = 10, *, model: str | None = None,
              **kwargs: Any):
        """Track what ``text`` names through ``video``: a lazy :class:`langsam.video.TrackedVideo`
        of per-frame masks with stable ids (see :func:`langsam.video.track_video`). Grounding DINO
        finds the objects and SAM 2 / 2.1 (``sam_type``) tracks them; with ``model="sam3"`` SAM 3
        finds them (``box_threshold``: its score threshold, default 0.5) and SAM 3's video tracker,
        from ``sam3_checkpoint``, tracks them (:mod:`langsam.video.sam3`); adding
        ``association="sam3"`` runs SAM 3's own video inference instead of langsam's association
        (:mod:`sam.video.concept`; ``sam3_settings``: its thresholds by ``ConceptTrackingConfig``
        name). ``model``: this call's concept model (default: the pipeline's)."""
        from langsam.video import track_video

        model = self.model if model is None else self._check_model(model)
        association = kwargs.get("association", "langsam")
        if association == "sam3" and model != "sam3":
            raise ValueError("association='sam3' is SAM 3's own video inference: it needs model='sam3'")
        if model == "sam3":
            from langsam.video.sam3 import DEFAULT_SAM3_THRESHOLD, Sam3FrameDetector, sam3_concept_predictor

            if association == "sam3":
                settings = kwargs.pop("sam3_settings", None) or {}
                if kwargs.get("concept_predictor") is None:
                    # The checkpoint's own rules (a transformers config.json), then sam3_settings,
                    # then an explicit box_threshold.
                    video_predictor = self.sam3_video_predictor()
                    kwargs["concept_predictor"] = sam3_concept_predictor(
                        self.sam3_predictor, video_predictor, kwargs.get("box_threshold"),
                        checkpoint=self._sam3_video_checkpoint, **settings)
                kwargs.setdefault("box_threshold", kwargs["concept_predictor"].config.score_threshold_detection)
            else:
                kwargs.setdefault("box_threshold", DEFAULT_SAM3_THRESHOLD)
                if kwargs.get("video_predictor") is None:
                    kwargs["video_predictor"] = self.sam3_video_predictor()
                kwargs.setdefault("detector", Sam3FrameDetector(self.sam3_predictor))
        if "sam3_settings" in kwargs:
            raise ValueError("sam3_settings (SAM 3's association thresholds) need model='sam3', association='sam3'")
        return track_video(self, video, text, detect_every, **kwargs)

    def sam3_video_predictor(self) -> Any:
        """SAM 3's video predictor (``sam.video.SamVideoPredictor`` on ``sam.sam3.tracker.Sam3Tracker``)
        of ``model="sam3"``: built on first use, once, from ``sam3_checkpoint`` and on the concept
        model's ViT (see :func:`langsam.video.sam3.sam3_video_predictor`)."""
        from langsam.video.sam3 import sam3_video_predictor

        with self._lock:
            if self._sam3_video is None:
                checkpoint = self.sam3_checkpoint
                if checkpoint is None:
                    if self._sam3_source is not None:
                        raise ValueError("track() with model='sam3' loads SAM 3's video tracker from sam3_checkpoint; "
                                         "this pipeline was given a built sam3_model: pass sam3_checkpoint=<sam3.pt> too")
                    checkpoint = _default_sam3_checkpoint()
                self._sam3_video = sam3_video_predictor(self.sam3_predictor, checkpoint)
                self._sam3_video_checkpoint = checkpoint
            return self._sam3_video

    def auto_masks(self, image: ImageSource, **amg_params: Any) -> list[dict]:
        """SAM's automatic masks of ``image``, from the generator of the loaded model's family
        (``sam.make_mask_generator``: ``SamAutomaticMaskGenerator`` or
        ``Sam2AutomaticMaskGenerator``, with that family's defaults); ``amg_params`` are the
        generator's own (``points_per_side``, ``pred_iou_thresh``, ...)."""
        from sam import make_mask_generator

        pixels = load_image(image)
        with self._lock:
            generator = make_mask_generator(self.predictor.model, **amg_params)
            return generator.generate(pixels)

    # ------------------------------------------------------------------ stages
    def _segment_boxes(self, pixels: np.ndarray, detections: Detections, multimask: bool, mode: str,
                       top_k: int | None) -> Segmentation:
        """Masks for all detected boxes in one batched SAM decoder call."""
        import torch

        height, width = pixels.shape[:2]
        # Detector boxes may reach past the image (Grounding DINO predicts centre and size, and
        # nothing bounds the size); SAM gets them clipped to the image, as every box we return.
        all_boxes = clip_boxes(detections.boxes, (height, width))
        inside = (all_boxes[:, 2] > all_boxes[:, 0]) & (all_boxes[:, 3] > all_boxes[:, 1])
        if not inside.all():
            logger.debug("dropping %d detection(s) that lie wholly outside the image", int((~inside).sum()))
        order = np.argsort(-detections.scores, kind="stable")  # best first; ties keep detector order
        order = order[inside[order]]
        if top_k is not None:
            order = order[:top_k]
        if len(order) == 0:
            return Segmentation.empty((height, width), mode=mode, image=pixels)
        boxes = all_boxes[order]
        self.set_image(pixels)
        predictor = self.predictor
        input_boxes = predictor.transform.apply_boxes_torch(
            torch.as_tensor(boxes, dtype=torch.float32, device=predictor.device), predictor.original_size
        )
        # A decoder call returns (B, C, H, W) float32 logits at full resolution (48 MB per box
        # and candidate on a 12-megapixel photo): decode in chunks so the peak stays bounded.
        candidates = 3 if multimask else 1
        chunk = max(1, MASK_CHUNK_BYTES // (candidates * height * width * 5))  # float32 logits + bool
        masks = np.empty((len(order), height, width), dtype=bool)
        mask_scores = np.empty(len(order), dtype=np.float32)
        for start in range(0, len(order), chunk):
            part, iou_predictions, _ = predictor.predict_torch(
                None, None, boxes=input_boxes[start:start + chunk], multimask_output=multimask
            )
            best = iou_predictions.argmax(dim=1)  # (n,) — with multimask=False there is one candidate
            rows = torch.arange(part.shape[0], device=part.device)
            masks[start:start + chunk] = part[rows, best].cpu().numpy()
            mask_scores[start:start + chunk] = iou_predictions[rows, best].float().cpu().numpy()
            del part
        return Segmentation(
            masks=masks,
            boxes=boxes,
            scores=detections.scores[order],
            mask_scores=mask_scores,
            labels=[detections.labels[i] for i in order],
            image_size=(height, width),
            mode=mode,
            image=pixels,
        )

    def _segment_sam3(self, pixels: np.ndarray, queries: list[str], exemplars: list | None, threshold: float,
                      mode: str, top_k: int | None) -> Segmentation:
        """Every instance of each query (or of the exemplars alone) from SAM 3: one image pass
        (skipped when the predictor holds this image), then one batched head pass for text-only
        queries, or one pass per query when exemplars join the prompt."""
        height, width = pixels.shape[:2]
        predictor = self.sam3_predictor
        # The predictor holds one image; it may be shared (injected) and have run another since.
        held = (image_key(pixels), predictor.image_passes)
        if self._sam3_image != held:
            predictor.set_image(pixels)
            self._sam3_image = (held[0], predictor.image_passes)
        threshold = float(threshold)
        if not exemplars:
            predictions = predictor.predict_many(queries, threshold=threshold)
        else:
            prompts = queries or [None]
            predictions = [predictor.predict(text=query, exemplars=exemplars, threshold=threshold) for query in prompts]
            if not queries:
                predictions[0].labels = [EXEMPLAR_LABEL] * len(predictions[0])
        scores = np.concatenate([p.scores for p in predictions]).astype(np.float32)
        if len(scores) == 0:
            return Segmentation.empty((height, width), mode=mode, image=pixels)
        order = np.argsort(-scores, kind="stable")  # best first; ties keep query order
        if top_k is not None:
            order = order[:top_k]
        labels = [label for p in predictions for label in p.labels]
        return Segmentation(
            masks=np.concatenate([p.masks for p in predictions])[order],
            boxes=np.concatenate([p.boxes for p in predictions])[order],
            scores=scores[order],
            mask_scores=scores[order],
            labels=[labels[i] for i in order],
            image_size=(height, width),
            mode=mode,
            image=pixels,
        )

    def _verify_with_clip(self, result: Segmentation, queries: list[str], clip_threshold: float | None,
                          top_k: int | None) -> Segmentation:
        threshold = DEFAULT_CLIP_THRESHOLD if clip_threshold is None else float(clip_threshold)
        if len(result) == 0:
            return Segmentation.empty(result.image_size, mode="hybrid", image=result.image, with_clip_scores=True)
        result.clip_scores = np.asarray(
            self.clip_scorer.score_labels(result.image, result.masks, result.labels, queries=queries), dtype=np.float32
        )
        kept = result[result.clip_scores >= threshold]
        return kept[:top_k] if top_k is not None else kept

    def _segment_clip(self, pixels: np.ndarray, queries: list[str], clip_threshold: float | None,
                      top_k: int | None, amg_params: dict[str, Any]) -> Segmentation:
        threshold = DEFAULT_CLIP_THRESHOLD if clip_threshold is None else float(clip_threshold)
        # The automatic masks depend on the generator's settings as much as on the image.
        key = (image_key(pixels), tuple(sorted(amg_params.items())))
        index = self._clip_indexes.get(key)
        if index is None:
            index = self.clip_scorer.build_index(pixels, self.auto_masks(pixels, **amg_params))
            self._clip_indexes[key] = index
            while len(self._clip_indexes) > max(1, self.embedding_cache_size // 2):
                self._clip_indexes.popitem(last=False)
        else:
            self._clip_indexes.move_to_end(key)
        mask_indices, label_indices, scores = index.query(queries, clip_threshold=threshold, top_k=top_k)
        height, width = pixels.shape[:2]
        if len(mask_indices) == 0:
            return Segmentation.empty((height, width), mode="clip", image=pixels, with_clip_scores=True)
        return Segmentation(
            masks=index.masks(mask_indices),
            boxes=index.boxes[mask_indices],
            scores=scores,
            mask_scores=index.mask_scores[mask_indices],
            labels=[queries[i] for i in label_indices],
            image_size=(height, width),
            clip_scores=scores,
            mode="clip",
            image=pixels,
        )
