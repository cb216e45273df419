"""ClipScorer and ClipMaskIndex: crops, parity with open_clip, ranking, thresholds, caching, errors.

Random tiny CLIP weights (tests/tiny_clip.py) saved as a real open_clip state dict; real photos from
skimage.data; masks from SLIC superpixels plus a few hand-made shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.segmentation import slic

from langsam.clip_scorer import (
    DEFAULT_BACKGROUND_PROMPTS,
    DEFAULT_TEMPLATES,
    ClipMaskIndex,
    ClipScorer,
    mask_crop,
    masks_from_records,
)
import tiny_clip
from tiny_clip import load_reference_clip, reference_crop, save_tiny_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["cat", "grass", "a wooden table"]


# ----------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny_clip_files):
    return ClipScorer(tiny_clip_files.model_name, pretrained=str(tiny_clip_files.weights_path), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_clip_files):
    """open_clip itself, loaded independently from the same weights file."""
    return load_reference_clip(tiny_clip_files)


@pytest.fixture(scope="module")
def photo():
    return data.chelsea()  # 300 x 451 RGB


@pytest.fixture(scope="module")
def photo_masks(photo):
    """(N, H, W) bool: 16 superpixels, one mask touching two borders, a thin vertical and a thin
    horizontal strip (padding on both axes), a mask with a hole, and one tiny (below min area) mask."""
    height, width = photo.shape[:2]
    segments = slic(photo, n_segments=16, start_label=0, compactness=10)
    masks = [segments == label for label in range(segments.max() + 1)]
    yy, xx = np.mgrid[:height, :width]
    masks.append((yy < 40) & (xx > width - 90))                                 # top-right corner
    masks.append((xx >= 200) & (xx < 212) & (yy >= 30) & (yy < 270))           # tall and thin
    masks.append((yy >= 150) & (yy < 158) & (xx >= 10) & (xx < 300))           # wide and thin
    ring = (yy - 150) ** 2 + (xx - 225) ** 2
    masks.append((ring < 80 ** 2) & (ring > 30 ** 2))                           # hole in the middle
    masks.append((yy >= 5) & (yy < 10) & (xx >= 5) & (xx < 10))                 # 25 px
    return np.stack(masks)


def reference_probabilities(reference, image, masks, queries):
    return tiny_clip.reference_probabilities(reference, image, masks, queries, DEFAULT_TEMPLATES,
                                             DEFAULT_BACKGROUND_PROMPTS)


@pytest.fixture(scope="module")
def index(scorer, photo, photo_masks):
    return scorer.build_index(photo, photo_masks)


# ----------------------------------------------------------------------------------------------------
# crops and parity


def test_crop_follows_documented_rule(scorer, reference, photo, photo_masks):
    fill = reference[3]
    assert scorer.fill == fill
    for mask in photo_masks:
        ours = np.asarray(scorer.crop(photo, mask))
        theirs = np.asarray(reference_crop(photo, mask, 0.1, fill))
        assert ours.shape == theirs.shape and ours.shape[0] == ours.shape[1]
        np.testing.assert_array_equal(ours, theirs)


def test_crop_hand_computed():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[..., 0] = np.arange(30)[None, :]
    image[..., 1] = np.arange(20)[:, None]
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:9, 10:20] = True                # box 4 x 10 -> margin round(0.1 * 10) = 1
    mask[6, 12] = False
    crop = np.asarray(mask_crop(image, mask, 0.1, (7, 8, 9)))
    assert crop.shape == (12, 12, 3)        # region rows 4..9 (6), cols 9..20 (12) -> side 12
    # region pasted at row offset (12 - 6) // 2 = 3; inside pixels keep their colour
    assert tuple(crop[3 + 1, 0 + 1]) == (10, 5, 0)
    assert tuple(crop[3 + 2, 12 - 9]) == (7, 8, 9)   # the hole at (6, 12) is filled
    assert tuple(crop[3, 0]) == (7, 8, 9)           # margin row is outside the mask
    assert tuple(crop[0, 5]) == (7, 8, 9) and tuple(crop[11, 5]) == (7, 8, 9)  # square padding


def test_probabilities_match_open_clip(scorer, reference, index, photo, photo_masks):
    kept, expected = reference_probabilities(reference, photo, photo_masks, QUERIES)
    np.testing.assert_array_equal(index.kept_index, kept)
    ours = index.probabilities(QUERIES)
    assert ours.shape == (len(kept), len(QUERIES) + 1)
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-5)
    # the test is not vacuous: the scores differ between masks and between queries
    assert ours.std(axis=0).min() > 1e-3 and ours.std(axis=1).min() > 1e-3


def test_text_embedding_is_template_average(scorer, reference):
    """Also checks the trimmed text pass (tokens up to the last end-of-text only) against
    open_clip's full 77-token encode_text, on short and long prompts."""
    model, _, tokenizer, _ = reference
    assert scorer._trim_text
    queries = ["cat", "a very long description of a small striped cat sleeping on a red sofa near the window"]
    ours = scorer.encode_text(queries)
    assert ours.shape == (2, scorer.embed_dim)
    for row, query in enumerate(queries):
        with torch.no_grad():
            per_template = model.encode_text(tokenizer([t.format(query) for t in DEFAULT_TEMPLATES]), normalize=True)
        expected = per_template.mean(0) / per_template.mean(0).norm()
        torch.testing.assert_close(ours[row], expected, atol=1e-5, rtol=0)


def test_local_dir_and_state_dict_file_load_the_same_model(tiny_clip_files, scorer, photo, photo_masks):
    from_folder = ClipScorer(tiny_clip_files.local_dir, device="cpu")
    ours, _ = scorer.embed_masks(photo, photo_masks[:3])
    theirs, _ = from_folder.embed_masks(photo, photo_masks[:3])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_crops_go_in_batches(tiny_clip_files, scorer, photo, photo_masks, monkeypatch):
    small_batches = ClipScorer(tiny_clip_files.model_name, pretrained=str(tiny_clip_files.weights_path),
                               device="cpu", batch_size=4)
    batch_sizes = []
    original = small_batches.model.encode_image

    def counting(images, *args, **kwargs):
        batch_sizes.append(images.shape[0])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(small_batches.model, "encode_image", counting)
    masks = photo_masks[:10]
    embeddings, kept = small_batches.embed_masks(photo, masks)
    assert batch_sizes == [4, 4, 2]
    whole, _ = scorer.embed_masks(photo, masks)   # batch_size 32: one pass
    torch.testing.assert_close(embeddings, whole, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(kept, np.arange(10))
    np.testing.assert_allclose(embeddings.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_min_area_skips_tiny_masks(tiny_clip_files, photo, photo_masks):
    areas = photo_masks.reshape(len(photo_masks), -1).sum(axis=1)
    threshold = int(np.sort(areas)[len(areas) // 2])   # about half the masks are too small
    strict = ClipScorer(tiny_clip_files.model_name, pretrained=str(tiny_clip_files.weights_path),
                        device="cpu", min_mask_area=threshold)
    embeddings, kept = strict.embed_masks(photo, photo_masks)
    np.testing.assert_array_equal(kept, np.flatnonzero(areas >= threshold))
    assert embeddings.shape[0] == len(kept) < len(photo_masks)


def test_score_labels_is_own_label_probability(scorer, index, photo, photo_masks):
    labels = [QUERIES[i % len(QUERIES)] for i in range(len(photo_masks))]
    scores = scorer.score_labels(photo, photo_masks, labels, queries=QUERIES)
    probabilities = index.probabilities(QUERIES)
    expected = np.zeros(len(photo_masks), dtype=np.float32)
    for row, mask_index in enumerate(index.kept_index):
        expected[mask_index] = probabilities[row, QUERIES.index(labels[mask_index])]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert scores[-1] == 0.0  # the 25-pixel mask cannot be judged

    # default queries: the distinct labels, in order of first appearance
    two = scorer.score_labels(photo, photo_masks[:4], ["grass", "cat", "grass", "cat"])
    probabilities = scorer.probabilities(index.embeddings[:4], ["grass", "cat"])
    np.testing.assert_allclose(two, probabilities[np.arange(4), [0, 1, 0, 1]], atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# ranking and thresholds


def expected_selection(probabilities, kept, threshold, top_k):
    query_probabilities = probabilities[:, :-1]
    labels = query_probabilities.argmax(axis=1)
    scores = query_probabilities.max(axis=1)
    rows = [r for r in range(len(scores)) if threshold is None or scores[r] >= threshold]
    rows.sort(key=lambda r: (-scores[r], kept[r]))
    rows = rows[:top_k] if top_k is not None else rows
    return kept[rows], labels[rows], scores[rows]


@pytest.mark.parametrize("threshold, top_k", [(None, None), ("median", None), ("median", 3), (None, 5), (1.0, None)])
def test_query_threshold_and_top_k(index, threshold, top_k):
    probabilities = index.probabilities(QUERIES)
    if threshold == "median":
        threshold = float(np.median(probabilities[:, :-1].max(axis=1)))
    masks, labels, scores = index.query(QUERIES, clip_threshold=threshold, top_k=top_k)
    expected_masks, expected_labels, expected_scores = expected_selection(
        probabilities, index.kept_index, threshold, top_k)
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-7)
    assert np.all(np.diff(scores) <= 0)                       # best first
    assert len(set(masks.tolist())) == len(masks)             # at most one label per mask
    assert set(masks.tolist()) <= set(index.kept_index.tolist())
    assert set(labels.tolist()) <= set(range(len(QUERIES)))
    if threshold is not None:
        assert np.all(scores >= threshold)
    if threshold == 1.0:
        assert len(masks) == 0


def test_queries_compete_for_masks(index):
    """Adding a query can only lower the other queries' probabilities; a mask keeps one label."""
    alone = index.probabilities(["cat"])
    together = index.probabilities(["cat", "grass"])
    assert np.all(together[:, 0] <= alone[:, 0] + 1e-7)
    np.testing.assert_allclose(alone.sum(axis=1), 1.0, atol=1e-5)
    _, labels, _ = index.query(["cat", "grass"], clip_threshold=None)
    assert len(labels) == len(index.kept_index)


def test_second_query_does_no_image_work(scorer, photo, photo_masks):
    image_calls, text_calls = [], []
    hooks = [
        scorer.model.visual.register_forward_hook(lambda *_: image_calls.append(1)),
        scorer.model.token_embedding.register_forward_hook(lambda *_: text_calls.append(1)),
    ]
    try:
        fresh = scorer.build_index(photo, photo_masks)
        built_with = len(image_calls)
        assert built_with == 1  # 20 crops, batch_size 32: one forward pass

        fresh.query(["a dog on a sofa"], clip_threshold=None)
        fresh.query(["a striped cat", "a bowl"], top_k=2)
        assert len(image_calls) == built_with
        assert len(text_calls) == 2                  # one text forward pass per query set
        fresh.query(["a striped cat"], top_k=1)      # repeated query: served from the text cache
        assert len(text_calls) == 2 and len(image_calls) == built_with
    finally:
        for hook in hooks:
            hook.remove()


def test_index_from_amg_records_matches_masks(scorer, photo, photo_masks, index):
    from pycocotools import mask as mask_utils

    records = []
    for i, mask in enumerate(photo_masks[:6]):
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
        if i % 2:
            segmentation = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation["counts"] = segmentation["counts"].decode()          # "coco_rle"
        else:
            segmentation = mask
        records.append({"segmentation": segmentation, "bbox": bbox, "area": int(mask.sum()),
                        "predicted_iou": 0.5 + i / 10, "stability_score": 0.9})
    np.testing.assert_array_equal(masks_from_records(records, photo.shape[:2]), photo_masks[:6])
    from_records = ClipMaskIndex(scorer, photo, records)
    torch.testing.assert_close(from_records.embeddings, index.embeddings[:6], atol=1e-6, rtol=0)
    np.testing.assert_allclose(from_records.mask_scores, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], atol=1e-6)
    np.testing.assert_array_equal(from_records.boxes[:, 2:] - from_records.boxes[:, :2],
                                  [[r["bbox"][2], r["bbox"][3]] for r in records])
    # boxes from plain masks follow the same inclusive convention (torchvision masks_to_boxes)
    np.testing.assert_array_equal(index.boxes[:6], from_records.boxes)
    np.testing.assert_array_equal(from_records.masks([1, 4]), photo_masks[[1, 4]])
    np.testing.assert_array_equal(index.masks(), photo_masks)


# ----------------------------------------------------------------------------------------------------
# edge cases


def test_no_masks(scorer, photo):
    empty = scorer.build_index(photo, np.zeros((0,) + photo.shape[:2], dtype=bool))
    assert len(empty) == 0 and empty.embeddings.shape == (0, scorer.embed_dim)
    masks, labels, scores = empty.query(["cat"], top_k=3)
    assert masks.shape == labels.shape == scores.shape == (0,)
    assert empty.masks().shape == (0,) + photo.shape[:2]
    assert scorer.build_index(photo, []).num_masks == 0
    assert scorer.score_labels(photo, np.zeros((0,) + photo.shape[:2], bool), []).shape == (0,)


def test_all_masks_below_min_area(scorer, photo, photo_masks):
    tiny = photo_masks[-1:].repeat(3, axis=0)
    tiny_index = scorer.build_index(photo, tiny)
    assert tiny_index.num_masks == 3 and len(tiny_index.kept_index) == 0
    masks, labels, scores = tiny_index.query(["cat"], clip_threshold=None)
    assert len(masks) == len(labels) == len(scores) == 0
    np.testing.assert_array_equal(scorer.score_labels(photo, tiny, ["cat"] * 3), np.zeros(3))


def test_single_query(index):
    probabilities = index.probabilities("cat")   # a bare string is one query
    assert probabilities.shape == (len(index.kept_index), 2)
    masks, labels, scores = index.query("cat", clip_threshold=0.5)
    np.testing.assert_array_equal(labels, 0)
    # with one query, passing 0.5 means beating the background
    np.testing.assert_array_equal(np.sort(masks), index.kept_index[probabilities[:, 0] >= 0.5])


def test_many_queries(index, reference, photo, photo_masks):
    queries = [f"object number {i}" for i in range(40)]
    probabilities = index.probabilities(queries)
    assert probabilities.shape == (len(index.kept_index), 41)
    _, expected = reference_probabilities(reference, photo, photo_masks, queries)
    np.testing.assert_allclose(probabilities, expected, atol=2e-5)
    masks, labels, _ = index.query(queries, clip_threshold=None)
    assert len(masks) == len(set(masks.tolist())) == len(index.kept_index)
    np.testing.assert_array_equal(
        labels, probabilities[:, :-1].argmax(axis=1)[np.searchsorted(index.kept_index, masks)])


def test_bfloat16_is_close_to_float32(tiny_clip_files, index, photo, photo_masks):
    half = ClipScorer(tiny_clip_files.model_name, pretrained=str(tiny_clip_files.weights_path),
                      device="cpu", dtype=torch.bfloat16)
    embeddings, _ = half.embed_masks(photo, photo_masks[:4])
    assert embeddings.dtype == torch.float32
    np.testing.assert_allclose(half.probabilities(embeddings, QUERIES), index.probabilities(QUERIES)[:4], atol=0.05)


# ----------------------------------------------------------------------------------------------------
# errors at the public boundary


def test_bad_inputs_raise_clear_value_errors(scorer, index, photo, photo_masks):
    with pytest.raises(ValueError, match="uint8"):
        scorer.embed_masks(photo.astype(np.float32), photo_masks)
    with pytest.raises(ValueError, match="HxWx3"):
        scorer.embed_masks(Image.fromarray(photo), photo_masks)
    with pytest.raises(ValueError, match=r"\(N, 300, 451\)"):
        scorer.embed_masks(photo, photo_masks[:, :100])
    with pytest.raises(ValueError, match="empty"):
        index.query([])
    with pytest.raises(ValueError, match="empty"):
        index.query(["cat", "  "])
    with pytest.raises(ValueError, match="duplicates"):
        index.query(["cat", "cat"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        index.query(["cat"], clip_threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        index.query(["cat"], top_k=0)
    with pytest.raises(ValueError, match="2 labels"):
        scorer.score_labels(photo, photo_masks[:3], ["cat", "dog"])
    with pytest.raises(ValueError, match="not one of the queries"):
        scorer.score_labels(photo, photo_masks[:2], ["cat", "dog"], queries=["cat"])
    with pytest.raises(ValueError, match="segmentation"):
        scorer.build_index(photo, [{"bbox": [0, 0, 1, 1]}])


def test_bad_model_arguments(tiny_clip_files, tmp_path):
    with pytest.raises(ValueError, match="valid names: .*ViT-B-32"):
        ClipScorer("ViT-Nope-99", pretrained=None)
    with pytest.raises(ValueError, match="known tags: .*laion2b_s34b_b79k"):
        ClipScorer("ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="could not load CLIP weights file"):
        ClipScorer("ViT-B-32", pretrained=str(tiny_clip_files.weights_path))   # wrong architecture
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not load CLIP weights file"):
        ClipScorer(tiny_clip_files.model_name, pretrained=str(garbage))
    with pytest.raises(ValueError, match="no such folder"):
        ClipScorer(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="templates"):
        ClipScorer(tiny_clip_files.model_name, pretrained=None, templates=["no placeholder"])


def test_import_is_lazy():
    code = "import sys, langsam.clip_scorer; print('open_clip' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"
