"""Grounding DINO (transformers): an image and text queries -> boxes labelled with the queries.

All queries of an image go into one caption (``"a dog. a cat."``), so one forward pass serves
them all; only a caption longer than the text encoder's ``max_text_len`` tokens is split into
several passes (the model would otherwise truncate it silently).
"""

from __future__ import annotations

import inspect
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Detections", "GroundingDinoDetector", "parse_queries"]

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"


def parse_queries(text: str | Sequence[str]) -> list[str]:
    """Split user text into queries, as the user wrote them (stripped, duplicates dropped).

    ``"a dog. a cat."`` and ``["a dog", "a cat"]`` both give ``["a dog", "a cat"]``. Queries
    are compared case-insensitively for duplicates; the first spelling is kept.

    Raises:
        ValueError: no non-blank query, or ``text`` is not a string / list of strings.
    """
    if isinstance(text, str):
        parts = text.split(".")
    elif isinstance(text, Sequence) and all(isinstance(item, str) for item in text):
        parts = list(text)
    else:
        raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
    queries: list[str] = []
    seen: set[str] = set()
    for part in parts:
        # Control and format characters (NUL, ESC, zero-width space...) are invisible and the
        # tokenizer drops them; as spaces they still keep the words they separate apart.
        part = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in part)
        query = " ".join(part.split()).rstrip(" .")  # trailing dots end a query; leading ones are kept (".net")
        if query and query.lower() not in seen:
            seen.add(query.lower())
            queries.append(query)
    if not queries:
        raise ValueError("text is empty: give at least one query, e.g. 'a dog' or 'a dog. a cat.'")
    return queries


def caption_text(query: str) -> str:
    """How a query appears in the caption: lower case (the model was trained that way), with
    inner dots removed because a dot separates queries."""
    return " ".join(query.lower().replace(".", " ").split())


@dataclass
class Detections:
    """Boxes found in one image.

    boxes: ``(N, 4)`` float32 xyxy in original-image pixels; scores: ``(N,)`` float32 (max
    token probability, as in transformers); labels: ``N`` queries as the user wrote them;
    label_ids: ``(N,)`` int64 index into ``queries``; phrases: ``N`` phrases decoded from the
    tokens above ``text_threshold`` (transformers' ``text_labels``).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    label_ids: np.ndarray
    phrases: list[str]
    queries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, queries: Sequence[str] = ()) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], np.zeros(0, np.int64), [], list(queries))


class GroundingDinoDetector:
    """Text-prompted box detector.

    Args:
        model_id_or_dir: hub id (``"IDEA-Research/grounding-dino-tiny"`` or ``-base``), a short
            name from :data:`langsam.weights.GROUNDING_DINO_MODELS`, or a local
            ``save_pretrained`` folder. Loaded lazily on first :meth:`detect`, once.
        device, dtype: where the model runs (default cpu / float32).
        model, processor: already-built ``GroundingDinoForObjectDetection`` and processor,
            used instead of loading (tests, custom models).
    """

    def __init__(self, model_id_or_dir: str | os.PathLike = DEFAULT_DETECTOR, device: Any = None,
                 dtype: Any = None, *, model: Any = None, processor: Any = None) -> None:
        if (model is None) != (processor is None):
            raise ValueError("pass model and processor together (or neither)")
        self.model_id_or_dir = os.fspath(model_id_or_dir)
        self._device = device
        self._dtype = dtype
        self._model = model
        self._processor = processor
        self.forward_passes = 0  # how many times the model ran (tests and benchmarks read it)
        if model is not None:
            self._place_model()

    # ------------------------------------------------------------------ loading
    def _place_model(self) -> None:
        import torch

        device = torch.device(self._device) if self._device is not None else self._model.device
        self._model = self._model.to(device=device, dtype=self._dtype).eval()

    def load(self) -> "GroundingDinoDetector":
        """Load model and processor now (otherwise done on first :meth:`detect`)."""
        if self._model is None:
            from transformers import AutoProcessor, GroundingDinoForObjectDetection

            from langsam.weights import resolve_grounding_dino

            folder = resolve_grounding_dino(self.model_id_or_dir)
            logger.info("loading Grounding DINO from %s", folder)
            self._processor = AutoProcessor.from_pretrained(folder)
            self._model = GroundingDinoForObjectDetection.from_pretrained(folder, use_safetensors=True)
            self._place_model()
        return self

    @property
    def model(self):
        return self.load()._model

    @property
    def processor(self):
        return self.load()._processor

    @property
    def device(self):
        return self.model.device

    @property
    def max_text_len(self) -> int:
        return int(getattr(self.model.config, "max_text_len", 256))

    # ------------------------------------------------------------------ captions
    def build_captions(self, queries: Sequence[str]) -> list[list[int]]:
        """Group query indices into captions that fit ``max_text_len`` tokens (usually one group).

        Raises:
            ValueError: a single query is longer than the text encoder allows.
        """
        tokenizer = self.processor.tokenizer
        budget = self.max_text_len - 2  # [CLS] and [SEP]
        groups: list[list[int]] = [[]]
        used = 0
        for index, query in enumerate(queries):
            cost = len(tokenizer(caption_text(query) + ".", add_special_tokens=False)["input_ids"])
            if not tokenizer(caption_text(query), add_special_tokens=False)["input_ids"]:
                raise ValueError(
                    f"query {query!r} has no words Grounding DINO can read (only accents or symbols it drops)"
                )
            if cost > budget:
                raise ValueError(
                    f"query {query!r} is {cost} tokens long; Grounding DINO reads at most {budget} per caption"
                )
            if used + cost > budget and groups[-1]:
                groups.append([])
                used = 0
            groups[-1].append(index)
            used += cost
        if len(groups) > 1:
            logger.info("%d queries exceed %d tokens: running %d detector passes", len(queries), self.max_text_len, len(groups))
        return groups

    # ------------------------------------------------------------------ detection
    def detect(self, image: Any, queries: str | Sequence[str], box_threshold: float = 0.3,
               text_threshold: float = 0.25) -> Detections:
        """Find the queries in ``image``.

        Args:
            image: anything :func:`langsam.io.load_image` accepts (``(H, W, 3)`` uint8 RGB best).
            queries: one string (queries separated by ``.``) or a list of strings.
            box_threshold: keep boxes whose best token probability exceeds this.
            text_threshold: tokens above this form the matched phrase.

        Returns:
            :class:`Detections` with boxes in original-image pixels; each label is the query
            (as written by the user) whose tokens score highest for that box.
        """
        from langsam.io import load_image

        _check_threshold("box_threshold", box_threshold)
        _check_threshold("text_threshold", text_threshold)
        query_list = parse_queries(queries)
        pixels = load_image(image)
        parts = [self._detect_caption(pixels, query_list, group, box_threshold, text_threshold)
                 for group in self.build_captions(query_list)]
        if len(parts) == 1:
            return parts[0]
        return Detections(
            boxes=np.concatenate([p.boxes for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            labels=[label for p in parts for label in p.labels],
            label_ids=np.concatenate([p.label_ids for p in parts]),
            phrases=[phrase for p in parts for phrase in p.phrases],
            queries=query_list,
        )

    def _detect_caption(self, pixels: np.ndarray, queries: list[str], group: list[int],
                        box_threshold: float, text_threshold: float) -> Detections:
        import torch

        caption = " ".join(caption_text(queries[i]) + "." for i in group)
        inputs = self.processor(images=pixels, text=caption, return_tensors="pt")
        model = self.model
        dtype = next(model.parameters()).dtype
        inputs = {key: (value.to(model.device, dtype) if value.is_floating_point() else value.to(model.device))
                  for key, value in inputs.items()}
        with torch.inference_mode():
            outputs = model(**inputs)
        self.forward_passes += 1
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        height, width = pixels.shape[:2]
        result = post_process(self.processor, outputs, inputs["input_ids"], box_threshold, text_threshold,
                              [(height, width)])[0]
        # Same selection as transformers' post-processing, to get each kept box's token probabilities.
        probabilities = outputs.logits[0].sigmoid()
        keep = probabilities.max(dim=-1).values > box_threshold
        kept = probabilities[keep]
        if kept.shape[0] != result["boxes"].shape[0]:
            raise RuntimeError(
                f"transformers post-processing kept {result['boxes'].shape[0]} boxes but the logits give "
                f"{kept.shape[0]}; this transformers version changed its box selection"
            )
        spans = query_token_spans(self.processor.tokenizer, caption, [caption_text(queries[i]) for i in group])
        label_ids = assign_queries(kept, spans)
        global_ids = np.asarray([group[i] for i in label_ids], dtype=np.int64)
        phrases = result["text_labels"] if "text_labels" in result else result["labels"]  # older transformers
        return Detections(
            boxes=result["boxes"].detach().cpu().float().numpy().reshape(-1, 4),
            scores=result["scores"].detach().cpu().float().numpy().reshape(-1),
            labels=[queries[i] for i in global_ids],
            label_ids=global_ids,
            phrases=[str(p) for p in phrases],
            queries=list(queries),
        )

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        return f"GroundingDinoDetector({self.model_id_or_dir!r}, {state})"


def _check_threshold(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def post_process(processor: Any, outputs: Any, input_ids: Any, box_threshold: float, text_threshold: float,
                 target_sizes: list[tuple[int, int]]) -> list[dict]:
    """Call transformers' ``post_process_grounded_object_detection`` whatever its version.

    transformers renamed the first threshold argument from ``box_threshold`` to
    ``threshold``; the signature is inspected rather than the version number.
    """
    method = processor.post_process_grounded_object_detection
    parameters = inspect.signature(method).parameters
    box_name = "threshold" if "threshold" in parameters else "box_threshold"
    return method(outputs, input_ids=input_ids, text_threshold=text_threshold, target_sizes=target_sizes,
                  **{box_name: box_threshold})


def query_token_spans(tokenizer: Any, caption: str, pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Token index range ``[start, end)`` of each query piece inside the tokenized caption.

    Uses character offsets when the tokenizer provides them; otherwise counts tokens per
    piece (BERT splits at the dots, so the counts add up).
    """
    encoded = tokenizer(caption, return_offsets_mapping=True) if getattr(tokenizer, "is_fast", False) else None
    char_starts, position = [], 0
    for piece in pieces:
        start = caption.index(piece, position)
        char_starts.append((start, start + len(piece)))
        position = start + len(piece)
    spans = []
    if encoded is not None and "offset_mapping" in encoded:
        offsets = encoded["offset_mapping"]
        for char_start, char_end in char_starts:
            tokens = [i for i, (a, b) in enumerate(offsets) if b > a and a >= char_start and b <= char_end]
            spans.append((tokens[0], tokens[-1] + 1) if tokens else (0, 0))
        return spans
    index = 1  # after [CLS]
    for piece in pieces:
        count = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        spans.append((index, index + count))
        index += count + 1  # the separating "."
    return spans


def assign_queries(probabilities: Any, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """For each box, the query whose tokens reach the highest probability.

    probabilities: ``(N, max_text_len)`` token probabilities of N boxes; spans: token range
    per query. Returns ``(N,)`` int64 indices into ``spans``.
    """
    import torch

    if probabilities.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    per_query = torch.stack(
        [probabilities[:, start:end].max(dim=-1).values if end > start
         else torch.full((probabilities.shape[0],), -1.0, device=probabilities.device)
         for start, end in spans],
        dim=1,
    )
    return per_query.argmax(dim=1).cpu().numpy().astype(np.int64)
