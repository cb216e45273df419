"""Grounding DINO (transformers): an image and text queries -> boxes labelled with the queries.

All queries of an image go into one caption (``"a dog. a cat."``), so one forward pass serves
them all; only a caption longer than the text encoder's ``max_text_len`` tokens is split into
several passes (the model would otherwise truncate it silently).

The model is transformers' ``GroundingDinoForObjectDetection`` with its hub weights; by default
its forward pass runs through :mod:`langsam.gdino_fast` (same results up to float rounding,
about half the time on CPU; ``fast=False`` runs transformers' own forward). The outputs go
through transformers' own post-processing either way.
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
MIN_DETECTOR_SIZE = 64  # smallest longest side accepted for detector_size (pixels)


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
        fast: run the forward pass with :class:`langsam.gdino_fast.FastGroundingDino` (same
            model and weights, same results up to float rounding, ~2x faster on CPU): ``True``
            (all speed-ups), ``False`` (transformers' own forward) or a
            :class:`~langsam.gdino_fast.Speedups` choosing them one by one.
        detector_size: the longest image side fed to the detector (>= 64), trading accuracy for
            speed; None keeps the released preprocessing (shortest side 800, longest 1333).
    """

    def __init__(self, model_id_or_dir: str | os.PathLike = DEFAULT_DETECTOR, device: Any = None,
                 dtype: Any = None, *, model: Any = None, processor: Any = None, fast: Any = True,
                 detector_size: int | None = None) -> None:
        if (model is None) != (processor is None):
            raise ValueError("pass model and processor together (or neither)")
        self.speedups = _check_fast(fast)
        self.detector_size = _check_detector_size(detector_size)
        self.model_id_or_dir = os.fspath(model_id_or_dir)
        self._device = device
        self._dtype = dtype
        self._model = model
        self._processor = processor
        self._fast_model: Any = None
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

    @property
    def fast_model(self):
        """The :class:`~langsam.gdino_fast.FastGroundingDino` running the model, or None when
        ``fast=False`` (or the model is a variant it does not support; then a warning is logged)."""
        if self.speedups is None:
            return None
        if self._fast_model is None:
            from langsam.gdino_fast import FastGroundingDino, unsupported_reason

            reason = unsupported_reason(self.model)
            if reason is not None:
                logger.warning("fast Grounding DINO path off (%s); using transformers' forward", reason)
                self.speedups = None
                return None
            self._fast_model = FastGroundingDino(self.model, self.speedups)
        return self._fast_model

    def clear_cache(self) -> None:
        """Forget cached caption encodings and input geometry (call after changing weights)."""
        if self._fast_model is not None:
            self._fast_model.clear_cache()

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
            logger.info("%d queries exceed %d tokens: running %d detector passes", len(queries), self.max_text_len,
                        len(groups))
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
        return self.detect_batch([image], [queries], box_threshold, text_threshold, batch_size=1)[0]

    def detect_batch(self, images: Sequence[Any], queries: str | Sequence[str] | Sequence[Sequence[str]],
                     box_threshold: float = 0.3, text_threshold: float = 0.25, *,
                     batch_size: int | None = None) -> list[Detections]:
        """:meth:`detect` for several images, several images per forward pass.

        Images whose detector input has the same size (after the resize) share forward passes
        of up to ``batch_size`` images; images are never padded to a common size, because the
        Swin backbone has no padding mask and padding would change the features. The results
        equal one :meth:`detect` call per image (up to float rounding).

        Args:
            images: images as for :meth:`detect`.
            queries: as ``LangSAM.segment_batch`` takes them: one text for every image (a string,
                or a list of query strings), or one list of queries per image
                (``[["a dog"], ["a cat", "a hat"]]``).
            box_threshold, text_threshold: as for :meth:`detect`.
            batch_size: images per forward pass. Default: 1 on CPU (batching measured no faster
                there, see ``benchmarks/bench_detector.py --batch``), 8 on GPUs.

        Returns:
            One :class:`Detections` per image, in order.
        """
        from langsam.io import load_image

        _check_threshold("box_threshold", box_threshold)
        _check_threshold("text_threshold", text_threshold)
        images = list(images)
        per_image = _queries_per_image(queries, len(images))
        if batch_size is None:
            batch_size = 1 if self.device.type == "cpu" else 8
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        query_lists = [parse_queries(queries) for queries in per_image]  # fail before any image work
        jobs = [(image_index, group) for image_index, queries in enumerate(query_lists)
                for group in self.build_captions(queries)]
        pixels = [load_image(image) for image in images]
        inputs = [self._image_inputs(image) for image in pixels]
        parts = self._run_jobs(pixels, inputs, query_lists, jobs, box_threshold, text_threshold, batch_size)
        results = []
        for image_index, queries in enumerate(query_lists):
            mine = [part for (index, _), part in zip(jobs, parts) if index == image_index]
            results.append(mine[0] if len(mine) == 1 else _concatenate(mine, queries))
        return results

    def _image_inputs(self, pixels: np.ndarray) -> dict:
        """The processor's ``pixel_values`` ``(1, 3, h, w)`` and ``pixel_mask`` ``(1, h, w)``."""
        size = {} if self.detector_size is None else {
            "size": {"shortest_edge": self.detector_size, "longest_edge": self.detector_size}}
        encoded = self.processor.image_processor(images=pixels, return_tensors="pt", **size)
        return {"pixel_values": encoded["pixel_values"], "pixel_mask": encoded["pixel_mask"]}

    def _run_jobs(self, pixels: list[np.ndarray], inputs: list[dict], query_lists: list[list[str]],
                  jobs: list[tuple[int, list[int]]], box_threshold: float, text_threshold: float,
                  batch_size: int) -> list[Detections]:
        """One :class:`Detections` per job (image index, query group), batching jobs whose
        inputs have the same size."""
        captions = [" ".join(caption_text(query_lists[image][i]) + "." for i in group) for image, group in jobs]
        tokens = [self.processor.tokenizer(caption, return_tensors="pt", return_token_type_ids=True)
                  for caption in captions]
        by_size: dict[tuple, list[int]] = {}
        for job_index, (image_index, _) in enumerate(jobs):
            by_size.setdefault(tuple(inputs[image_index]["pixel_values"].shape), []).append(job_index)
        results: list[Detections | None] = [None] * len(jobs)
        for members in by_size.values():
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                logits, boxes = self._forward([inputs[jobs[j][0]] for j in batch], [tokens[j] for j in batch])
                for row, job_index in enumerate(batch):
                    image_index, group = jobs[job_index]
                    results[job_index] = self._detections(
                        logits[row:row + 1], boxes[row:row + 1], tokens[job_index]["input_ids"], captions[job_index],
                        pixels[image_index].shape[:2], query_lists[image_index], group, box_threshold, text_threshold)
        return results

    def _forward(self, images: list[dict], tokens: list[dict]):
        """One forward pass over same-size images with their captions -> (logits, pred_boxes) float32."""
        import torch

        model = self.model
        device, dtype = model.device, next(model.parameters()).dtype
        pixel_values = torch.cat([item["pixel_values"] for item in images]).to(device, dtype)
        pixel_mask = torch.cat([item["pixel_mask"] for item in images]).to(device)
        fast = self.fast_model
        with torch.inference_mode():
            if fast is not None:
                text = fast.encode_captions([t["input_ids"].to(device) for t in tokens],
                                            [t["token_type_ids"].to(device) for t in tokens])
                outputs = fast.forward_batch(pixel_values, text, pixel_mask)
            else:
                pad_id = getattr(self.processor.tokenizer, "pad_token_id", None) or 0
                outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask, **_pad_tokens(tokens, device, pad_id))
        self.forward_passes += 1
        return outputs.logits.float(), outputs.pred_boxes.float()

    def _detections(self, logits, boxes, input_ids, caption: str, image_size: tuple[int, int], queries: list[str],
                    group: list[int], box_threshold: float, text_threshold: float) -> Detections:
        """transformers' post-processing of one image's outputs, plus the query label of each box."""
        from types import SimpleNamespace

        input_ids = input_ids.to(logits.device)
        result = post_process(self.processor, SimpleNamespace(logits=logits, pred_boxes=boxes), input_ids,
                              box_threshold, text_threshold, [image_size])[0]
        # Same selection as transformers' post-processing, to get each kept box's token probabilities.
        probabilities = logits[0].sigmoid()
        kept = probabilities[probabilities.max(dim=-1).values > box_threshold]
        if kept.shape[0] != result["boxes"].shape[0]:
            raise RuntimeError(
                f"transformers post-processing kept {result['boxes'].shape[0]} boxes but the logits give "
                f"{kept.shape[0]}; this transformers version changed its box selection"
            )
        spans = query_token_spans(self.processor.tokenizer, caption, [caption_text(queries[i]) for i in group])
        label_ids = assign_queries(kept, spans)
        global_ids = np.asarray([group[i] for i in label_ids], dtype=np.int64)
        return Detections(
            boxes=result["boxes"].detach().cpu().float().numpy().reshape(-1, 4),
            scores=result["scores"].detach().cpu().float().numpy().reshape(-1),
            labels=[queries[i] for i in global_ids],
            label_ids=global_ids,
            phrases=[str(p) for p in result_phrases(result)],
            queries=list(queries),
        )

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        return f"GroundingDinoDetector({self.model_id_or_dir!r}, {state})"


def _concatenate(parts: list[Detections], queries: list[str]) -> Detections:
    """The detections of several caption passes over one image, pass after pass."""
    return Detections(
        boxes=np.concatenate([p.boxes for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
        labels=[label for p in parts for label in p.labels],
        label_ids=np.concatenate([p.label_ids for p in parts]),
        phrases=[phrase for p in parts for phrase in p.phrases],
        queries=list(queries),
    )


def _queries_per_image(queries: Any, count: int) -> list:
    """``detect_batch``'s ``queries`` -> one entry per image (``LangSAM.segment_batch``'s rule)."""
    if isinstance(queries, str):
        return [queries] * count
    if isinstance(queries, Sequence):
        entries = list(queries)
        if all(isinstance(entry, str) for entry in entries):
            return [entries] * count
        if all(isinstance(entry, (list, tuple)) for entry in entries):
            if len(entries) != count:
                raise ValueError(f"got {count} images but {len(entries)} per-image query lists")
            return entries
    raise ValueError("queries must be a string, a list of query strings (for every image) or one list of "
                     f"query strings per image, got {queries!r:.80}")


def _pad_tokens(tokens: list[dict], device: Any, pad_id: int) -> dict:
    """Tokenized captions ``(1, T_i)`` -> one right-padded batch (``pad_id``, attention mask 0)."""
    import torch

    length = max(t["input_ids"].shape[1] for t in tokens)
    batch = {}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        fill = pad_id if key == "input_ids" else 0
        rows = [torch.nn.functional.pad(t[key], (0, length - t[key].shape[1]), value=fill) for t in tokens]
        batch[key] = torch.cat(rows).to(device)
    return batch


def _check_fast(fast: Any):
    """``fast`` argument -> a Speedups, or None for transformers' forward."""
    from langsam.gdino_fast import Speedups

    if isinstance(fast, Speedups):
        return fast
    if fast is True:
        return Speedups()
    if fast is False or fast is None:
        return None
    raise ValueError(f"fast must be True, False or a langsam.gdino_fast.Speedups, got {fast!r}")


def _check_detector_size(size: Any) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_DETECTOR_SIZE:
        raise ValueError(f"detector_size must be an integer >= {MIN_DETECTOR_SIZE} (pixels) or None, got {size!r}")
    return int(size)


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


def result_phrases(result: Any) -> list:
    """The matched phrases of one post-processed result: ``text_labels`` (transformers >= 4.51,
    where reading ``labels`` raises a FutureWarning), else ``labels``."""
    return result["text_labels"] if "text_labels" in result else result["labels"]


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
