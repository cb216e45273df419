"""Hardening (issue 8): fuzzed prompts (points, labels, boxes, mask inputs) and fuzzed text.

A prompt is either valid, and then gives masks of the documented shapes with finite scores, or
refused with a ``ValueError`` that names the argument at fault. Validity is decided here by an
oracle written from the documented rules, independently of the predictor's own checks.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from langsam.detector import GroundingDinoDetector, caption_text, parse_queries
from langsam.pipeline import LangSAM
from sam import SamPredictor
from sam_factory import make_tiny_sam, real_photo
from tiny_gdino import save_tiny_grounding_dino

HEIGHT, WIDTH = 48, 64  # small original image: cheap mask upscaling, prompts easy to place outside it
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


@pytest.fixture(scope="module")
def predictor():
    predictor = SamPredictor(make_tiny_sam(seed=7))
    predictor.set_image(np.ascontiguousarray(real_photo("coffee")[100:100 + HEIGHT, 200:200 + WIDTH]))
    return predictor


# --------------------------------------------------------------------------------------------
# Point / box / mask prompts
# --------------------------------------------------------------------------------------------

COORD = st.one_of(st.floats(-20, WIDTH + 20), st.sampled_from([0.0, float(WIDTH), float(HEIGHT), np.nan, np.inf,
                                                                -np.inf, -1e30, 1e30]))


@st.composite
def points(draw):
    kind = draw(st.sampled_from(["none", "valid", "valid", "valid", "empty", "mismatch", "bad_label", "only_coords",
                                 "wild", "many"]))
    if kind == "none":
        return None, None
    if kind == "only_coords":
        return np.array([[1.0, 1.0]]), None
    if kind == "empty":
        return np.zeros((0, 2)), np.zeros(0, dtype=int)
    count = 300 if kind == "many" else draw(st.integers(1, 6))
    xs = np.asarray(draw(st.lists(st.floats(0, WIDTH), min_size=count, max_size=count)) if kind != "many"
                    else np.linspace(0, WIDTH, count))
    ys = np.asarray(draw(st.lists(st.floats(0, HEIGHT), min_size=count, max_size=count)) if kind != "many"
                    else np.linspace(0, HEIGHT, count))
    coords = np.stack([xs, ys], axis=1)
    labels = np.asarray(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=count, max_size=count)))
    if kind == "wild":
        coords[draw(st.integers(0, count - 1))] = [draw(COORD), draw(COORD)]
    if kind == "mismatch":
        labels = labels[:-1] if count > 1 else np.array([1, 1])
    if kind == "bad_label":
        labels = labels.copy()
        labels[0] = draw(st.sampled_from([2, -2, 7]))
    return coords, labels


@st.composite
def boxes(draw):
    kind = draw(st.sampled_from(["none", "valid", "valid", "outside", "inverted", "nan", "shape"]))
    if kind == "none":
        return None
    if kind == "shape":
        return np.asarray(draw(st.sampled_from([[1, 2, 3], [[0, 0, 5, 5], [1, 1, 6, 6]], [], [0, 0, 1, 1, 2]])),
                          dtype=float)
    x0, x1 = sorted([draw(st.floats(0, WIDTH)), draw(st.floats(0, WIDTH))])
    y0, y1 = sorted([draw(st.floats(0, HEIGHT)), draw(st.floats(0, HEIGHT))])
    if kind == "outside":  # partly or fully outside the image: still a valid box
        shift = draw(st.floats(-3 * WIDTH, 3 * WIDTH))
        x0, x1 = x0 + shift, x1 + shift
    if kind == "inverted":
        if x0 == x1:
            x1 = x0 + 1.0
        x0, x1 = x1, x0
    box = np.array([x0, y0, x1, y1])
    if kind == "nan":
        box[draw(st.integers(0, 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return box


@st.composite
def mask_inputs(draw):
    kind = draw(st.sampled_from(["none", "none", "valid", "valid_2d", "shape", "nan"]))
    if kind == "none":
        return None
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    if kind == "shape":
        return rng.normal(size=draw(st.sampled_from([(1, 64, 64), (3, 256, 256), (1, 1, 256, 256), (256,)])))
    logits = rng.normal(scale=4.0, size=(1, 256, 256)).astype(np.float32)
    if kind == "nan":
        logits[0, 3, 5] = np.nan
    return logits[0] if kind == "valid_2d" else logits


def _refusal(coords, labels, box, mask) -> str | None:
    """The argument a valid predictor must complain about, or None if the prompt is valid."""
    if (coords is None) != (labels is None):
        return "point"
    if coords is not None:
        if coords.shape[0] != labels.shape[0]:
            return "point"
        if coords.shape[0] == 0 or not np.isfinite(coords).all():
            return "point_coords"
        if not np.isin(labels, (-1, 0, 1)).all():
            return "point_labels"
        if (coords[:, 0] < 0).any() or (coords[:, 0] > WIDTH).any() or (coords[:, 1] < 0).any() \
                or (coords[:, 1] > HEIGHT).any():
            return "outside"
    if box is not None:
        if box.size != 4 or box.ndim != 1:
            return "box"
        if not np.isfinite(box).all() or box[2] < box[0] or box[3] < box[1]:
            return "box"
    if mask is not None and (mask.shape not in ((1, 256, 256), (256, 256)) or not np.isfinite(mask).all()):
        return "mask_input"
    return None


@FUZZ
@given(point_prompt=points(), box=boxes(), mask=mask_inputs(), multimask=st.booleans())
def test_predict_prompt_fuzz(predictor, point_prompt, box, mask, multimask):
    coords, labels = point_prompt
    expected_error = _refusal(coords, labels, box, mask)
    kwargs = dict(point_coords=coords, point_labels=labels, box=box, mask_input=mask, multimask_output=multimask)
    if expected_error is not None:
        with pytest.raises(ValueError, match=expected_error):
            predictor.predict(**kwargs)
        return
    masks, scores, low_res = predictor.predict(**kwargs)
    count = 3 if multimask else 1
    assert masks.shape == (count, HEIGHT, WIDTH) and masks.dtype == bool
    assert scores.shape == (count,) and np.isfinite(scores).all()
    assert low_res.shape == (count, 256, 256) and np.isfinite(low_res).all()


def test_predict_torch_batch_sizes_must_agree(predictor):
    coords = torch.tensor([[[10.0, 10.0]], [[20.0, 20.0]]])
    labels = torch.ones(2, 1, dtype=torch.int)
    box = torch.tensor([[0.0, 0.0, 30.0, 30.0]] * 3)
    masks = torch.zeros(4, 1, 256, 256)
    for kwargs in ({"boxes": box}, {"mask_input": masks}, {"boxes": box[:2], "mask_input": masks}):
        with pytest.raises(ValueError, match="batch sizes disagree"):
            predictor.predict_torch(coords, labels, **kwargs)
    with pytest.raises(ValueError, match="point_labels must have shape"):
        predictor.predict_torch(coords, labels[:1])
    with pytest.raises(ValueError, match="given together"):
        predictor.predict_torch(coords, None)
    with pytest.raises(ValueError, match="boxes must have shape"):
        predictor.predict_torch(None, None, boxes=box[0])
    # Agreeing batches decode in one call, each row equal to its own single call.
    together, scores, _ = predictor.predict_torch(coords, labels, boxes=box[:2], multimask_output=False)
    alone, alone_scores, _ = predictor.predict_torch(coords[1:], labels[1:], boxes=box[1:2], multimask_output=False)
    assert together.shape == (2, 1, HEIGHT, WIDTH)
    # Batched and single runs differ by float rounding only; compare the decisive logits.
    torch.testing.assert_close(scores[1:], alone_scores, atol=1e-4, rtol=1e-4)
    assert (together[1:] != alone).float().mean() < 0.01


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

TEXT_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))  # every character incl. controls
TEXTS = st.one_of(
    st.text(TEXT_ALPHABET, max_size=40),
    st.text(st.sampled_from(list(".,;:!?-_ \t\n\r\x00\x01\x1f\u200b\u00a0")), max_size=20),
    st.lists(st.text(TEXT_ALPHABET, max_size=12), max_size=5),
)


def _words(text: str) -> list[str]:
    return " ".join(text.split()).split(" ")


def _is_subsequence(needle: str, haystack: str) -> bool:
    characters = iter(haystack)
    return all(char in characters for char in needle)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_parse_queries_fuzz(text):
    parts = text.split(".") if isinstance(text, str) else text
    visible = [c for part in parts for c in part if not (c.isspace() or c == "." or unicodedata.category(c)[0] == "C")]
    try:
        queries = parse_queries(text)
    except ValueError as error:
        assert "text is empty" in str(error)
        assert not visible, f"{text!r} has words but was refused"
        return
    assert queries and len({q.lower() for q in queries}) == len(queries)
    for query in queries:
        # trailing dots end a query; leading ones may belong to it (".net")
        assert query and query == query.rstrip(" .") and query == " ".join(query.split())
        # a query is what the user wrote (whitespace collapsed, invisible characters maybe dropped)
        assert any(_is_subsequence(query.replace(" ", ""), "".join(part.split())) for part in parts)


@pytest.mark.parametrize("bad", [None, 3, ["ok", 4], b"a cat", [["nested"]]])
def test_text_of_the_wrong_type_is_a_value_error(bad):
    with pytest.raises(ValueError, match="text must be a string or a list of strings"):
        parse_queries(bad)


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory):
    folder = save_tiny_grounding_dino(tmp_path_factory.mktemp("gdino_fuzz") / "gdino", seed=1)
    detector = GroundingDinoDetector(str(folder), device="cpu").load()
    pipeline = LangSAM(sam_model=make_tiny_sam(seed=2), detector_model=detector, device="cpu")
    image = np.ascontiguousarray(real_photo("chelsea")[::6, ::6])
    return pipeline, detector, image


def _readable(detector, query: str) -> bool:
    tokenizer = detector.processor.tokenizer
    return len(tokenizer(caption_text(query), add_special_tokens=False)["input_ids"]) > 0


# No shrinking: each example runs the detector, and a failure is readable as drawn.
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(text=TEXTS)
@example(text="\x01")
@example(text=["a cat", "\u200b"])
def test_segment_text_fuzz(text_pipeline, text):
    pipeline, detector, image = text_pipeline
    try:
        queries = parse_queries(text)
    except ValueError:
        with pytest.raises(ValueError, match="text is empty"):
            pipeline.segment(image, text)
        return
    if not all(_readable(detector, query) for query in queries):
        # Boxes scored against no word at all would be labelled with an invisible query.
        with pytest.raises(ValueError, match="no words|cannot read"):
            pipeline.segment(image, text, box_threshold=0.0, text_threshold=0.0, top_k=1)
        return
    # Thresholds 0 and top_k=1: the random detector always returns its best box, so labels and
    # masks are exercised for every text.
    result = pipeline.segment(image, text, box_threshold=0.0, text_threshold=0.0, top_k=1)
    assert len(result) == 1 and result.masks.shape == (1, *image.shape[:2])
    assert set(result.labels) <= set(queries)


@pytest.mark.parametrize("text", ["\x01", "\x00\x07", "\u200b", "\u200b. \x1b", "\u0301\u0301"])
def test_text_with_no_readable_words_is_refused(text_pipeline, text):
    """Control or format characters alone carry no words: the detector would score boxes
    against nothing but the separating '.', and label them with the invisible query."""
    pipeline, detector, image = text_pipeline
    with pytest.raises(ValueError, match="empty|no words|cannot read"):
        pipeline.segment(image, text, box_threshold=0.0, text_threshold=0.0, top_k=1)


def test_control_characters_do_not_reach_labels_or_split_words(text_pipeline):
    pipeline, detector, image = text_pipeline
    result = pipeline.segment(image, "a\x00cat.\x07 a dog\x1b", box_threshold=0.0, text_threshold=0.0, top_k=3)
    for label in result.labels:
        assert not any(unicodedata.category(c)[0] == "C" for c in label), label


def test_very_long_captions(text_pipeline):
    pipeline, detector, image = text_pipeline
    words = [f"thing{i}" for i in range(400)]
    with pytest.raises(ValueError, match="tokens long"):
        pipeline.segment(image, " ".join(words))  # one query longer than the text encoder
    queries = [" ".join(words[i:i + 4]) for i in range(0, 400, 4)]  # 100 queries: several captions
    passes = detector.forward_passes
    result = pipeline.segment(image, queries, box_threshold=0.0, text_threshold=0.0, top_k=2)
    assert detector.forward_passes - passes > 1
    assert len(result) == 2 and set(result.labels) <= set(queries)
