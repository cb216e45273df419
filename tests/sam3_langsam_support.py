"""Helpers for tests/test_sam3_langsam.py: SAM 3 as langsam's concept model, on the tiny random
SAM 3 of tests/sam3_factory.py (saved once per module in both checkpoint layouts)."""

from __future__ import annotations

import numpy as np

from sam.sam3 import Sam3Predictor, load_sam3


def reference_predictor(checkpoint) -> Sam3Predictor:
    """A `Sam3Predictor` of its own on the same weights, loaded from the other layout: what
    LangSAM's results are compared with."""
    return Sam3Predictor(load_sam3(checkpoint))


def expected_segment(predictor: Sam3Predictor, image: np.ndarray, queries: list[str], threshold: float,
                     exemplars=None) -> dict:
    """What `LangSAM(model="sam3").segment` must return: every query's instances from
    `Sam3Predictor` (`predict_many` for text alone, as batched in one head pass; `predict` per query
    with exemplars), best score first, ties in query order. (Batched and one-by-one agree to float
    rounding: tests/test_sam3_model.py; the same path on the same weights agrees exactly.)"""
    predictor.set_image(image)
    if exemplars is None:
        predictions = predictor.predict_many(queries, threshold=threshold)
    else:
        predictions = [predictor.predict(text=query, exemplars=exemplars, threshold=threshold) for query in queries]
    scores = np.concatenate([p.scores for p in predictions])
    order = np.argsort(-scores, kind="stable")
    labels = [label for p in predictions for label in p.labels]
    return {"scores": scores[order], "labels": [labels[i] for i in order],
            "masks": np.concatenate([p.masks for p in predictions])[order],
            "boxes": np.concatenate([p.boxes for p in predictions])[order]}


def assert_fills_nontrivial(masks: np.ndarray) -> None:
    """Random weights must give masks that are neither empty nor the whole image."""
    fill = masks.reshape(len(masks), -1).mean(axis=1)
    assert len(masks) > 0 and (fill > 0.01).all() and (fill < 0.99).all(), fill


class AreaClipScorer:
    """A stand-in CLIP scorer for hybrid mode: each mask's "probability" is its fill of the image,
    so which objects survive a clip_threshold is known without CLIP."""

    def __init__(self) -> None:
        self.calls = []

    def score_labels(self, image, masks, labels, queries=None):
        self.calls.append((list(labels), list(queries or [])))
        return masks.reshape(len(masks), -1).mean(axis=1).astype(np.float32)
