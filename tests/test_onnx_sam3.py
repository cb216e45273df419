"""SAM 3's ONNX export (sam.export.sam3, `langsam export onnx --sam-type sam3`) against the PyTorch
model it came from, on the tiny random SAM 3 of sam3_factory (its presence, scoring and mask
layers are rescaled there, so scores spread and masks are textured).

The export is made once per module through the command line, from Meta's `sam3.pt` layout, so the
loading, export, check and manifest code is the code a user runs. Every ONNX output is compared with
`Sam3Predictor` on the same image and prompts: features and scores within 1e-4, boxes within 1e-4
of the normalised frame, masks IoU >= 0.99 and neither empty nor full.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from sam3_factory import save_tiny_sam3, save_tiny_sam3_lite_text
from skimage import data

import sam.export.sam3 as sam3_export
from sam.export import SAM3_MANIFEST_NAME, OnnxSam3Predictor, export_sam3_onnx, read_sam3_manifest
from sam.export.sam3 import HEADS_NAME, IMAGE_ENCODER_NAME, TEXT_ENCODER_NAME, RealRopeAttention, apply_rope_real
from sam.sam3 import Sam3Predictor, load_sam3
from sam.sam3.backbone import RopeAttention, apply_rope, axial_rope

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4
EXEMPLARS = [((60, 40, 260, 330), True), ((300, 280, 470, 500), False)]  # xyxy in the 512x512 photo


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """`langsam ...` in this process, with its stdout and stderr."""
    from langsam.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("sam3_onnx") / "out"
    status, stdout, stderr = _cli(["export", "onnx", "--sam-type", "sam3", "--checkpoint", str(checkpoints["meta"]),
                                   "--out", str(out)])
    assert status == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()  # 512 x 512 RGB


@pytest.fixture(scope="module")
def torch_predictor(checkpoints, photo):
    predictor = Sam3Predictor(load_sam3(checkpoints["meta"]))
    predictor.set_image(photo)
    return predictor


@pytest.fixture(scope="module")
def onnx_predictor(exported, photo):
    predictor = OnnxSam3Predictor(exported[0])
    predictor.set_image(photo)
    return predictor


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_real_rope_equals_complex(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    # The tiny model's window table and the released global one (72 x 72 tokens, 64 channels per head).
    for head_dim, grid, scale in ((16, 6, 1.0), (64, 72, 24 / 72)):
        table = axial_rope(head_dim, grid, scale)
        x = torch.randn(2, 3, grid * grid, head_dim, generator=generator)
        expected = apply_rope(x, table)
        ours = apply_rope_real(x, table.real, table.imag)
        assert (expected - x).abs().max() > 0.5  # the rotation is not the identity
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    # The swapped attention module, on the same weights.
    attention = RopeAttention(32, 2, 6, 1.0, 10000.0).eval()
    tokens = torch.randn(2, 6, 6, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(RealRopeAttention(attention)(tokens), attention(tokens), atol=1e-6, rtol=0)
        # Attention in blocks of queries (36 tokens in blocks of 10: three full, one partial).
        monkeypatch.setattr(sam3_export, "QUERY_BLOCK", 10)
        torch.testing.assert_close(RealRopeAttention(attention)(tokens), attention(tokens), atol=1e-6, rtol=0)


def test_image_encoder_with_uneven_grids(tmp_path, monkeypatch):
    """A token grid (14 x 14) that is not a multiple of the position table's (8 x 8) nor of the
    window (6): the tiled positions are cropped and the windows padded. Traced as written, the
    tiling's ceil division became ONNX's truncating one and the graph did not load. The global
    block attends in blocks of 64 queries (196 tokens: three full blocks and a partial one), as
    the released 72 x 72 map does in blocks of 1024."""
    import onnxruntime as ort

    monkeypatch.setattr(sam3_export, "QUERY_BLOCK", 64)

    from sam.sam3 import Sam3Config, Sam3Image

    torch.manual_seed(0)
    config = Sam3Config(image_size=196, pretrain_image_size=112, window_size=6, vit_dim=32, vit_depth=2, vit_heads=2,
                        vit_mlp_dim=64, global_blocks=(1,), d_model=32, num_heads=4, ffn_dim=64, text_width=32,
                        text_layers=1, text_heads=2, text_mlp_dim=64, text_output_dim=16, geometry_layers=1,
                        encoder_layers=1, decoder_layers=1, num_queries=4)
    model = Sam3Image(config).eval()
    export = export_sam3_onnx(model, tmp_path, text_encoder=False, heads=False)
    pixels = torch.rand(1, 3, 196, 196, generator=torch.Generator().manual_seed(1)) * 2 - 1
    levels = ort.InferenceSession(str(export.image_encoder)).run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        expected = model.encode_image(pixels).feats
    assert [level.shape[-1] for level in levels] == [56, 28, 14]
    for ours, reference in zip(levels, expected):
        assert reference.std() > 0.1
        np.testing.assert_allclose(ours, reference.numpy(), atol=ATOL, rtol=0)


def test_cli_writes_graphs_and_manifest(exported, torch_predictor):
    out, stdout = exported
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [IMAGE_ENCODER_NAME, TEXT_ENCODER_NAME, HEADS_NAME, SAM3_MANIFEST_NAME])
    manifest = read_sam3_manifest(out)
    config = torch_predictor.model.config
    assert manifest["family"] == "sam3" and manifest["opset"] == 17
    assert manifest["config"] == json.loads(json.dumps(config.to_dict()))
    assert manifest["feature_shapes"] == [[32, 48, 48], [32, 24, 24], [32, 12, 12]]
    assert manifest["files"] == {"image_encoder": IMAGE_ENCODER_NAME, "text_encoder": TEXT_ENCODER_NAME,
                                 "heads": HEADS_NAME}
    # The check it printed is the real one: every output of the three graphs within 1e-4 of PyTorch.
    errors = dict(part.rsplit(" ", 1) for part in stdout.split("|ONNX - PyTorch|: ")[1].strip().split(", "))
    assert set(errors) == {*manifest["names"]["image_encoder_outputs"], *manifest["names"]["text_encoder_outputs"],
                           *manifest["names"]["heads_outputs"]}
    assert max(float(value) for value in errors.values()) < ATOL


def test_image_features_match(torch_predictor, onnx_predictor):
    ours, theirs = onnx_predictor._features.feats, torch_predictor._features.feats
    assert len(ours) == len(theirs) == 3
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert b.std() > 0.1
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"level {level}")
    assert onnx_predictor.image_passes == 1


@pytest.mark.parametrize("prompt", [dict(text="an astronaut"), dict(text="a flag", exemplars=EXEMPLARS),
                                    dict(exemplars=EXEMPLARS[:1])], ids=["text", "text+exemplars", "exemplar"])
def test_predictions_match(torch_predictor, onnx_predictor, prompt):
    """Text only (the heads graph gets one masked-out box where PyTorch has none), text with a
    positive and a negative exemplar, and an exemplar alone."""
    everything = torch_predictor.predict(threshold=0.0, **prompt)
    threshold = float(np.median(everything.scores))  # keeps about half: the cut is exercised
    expected = torch_predictor.predict(threshold=threshold, **prompt)
    result = onnx_predictor.predict(threshold=threshold, **prompt)
    assert 0 < len(expected) < len(everything) and everything.scores.max() - everything.scores.min() > 0.1
    assert len(result) == len(expected) and result.labels == expected.labels
    np.testing.assert_allclose(result.presence, expected.presence, atol=ATOL)
    np.testing.assert_allclose(result.scores, expected.scores, atol=ATOL)
    np.testing.assert_allclose(result.boxes / 512, expected.boxes / 512, atol=ATOL)  # normalised frame
    fill = expected.masks.mean(axis=(1, 2))
    assert (fill > 0.01).all() and (fill < 0.99).all(), fill
    assert min(_iou(a, b) for a, b in zip(result.masks, expected.masks)) >= 0.99


def test_batched_queries_match(torch_predictor, onnx_predictor):
    """predict_many runs the heads graph once on three prompts (its batch axis is dynamic)."""
    texts = ["a helmet", "a rocket", "the flag of a country"]
    expected = torch_predictor.predict_many(texts, threshold=0.0)
    results = onnx_predictor.predict_many(texts, threshold=0.0)
    assert np.ptp([e.scores.mean() for e in expected]) > 1e-3  # the three prompts differ
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result.scores, reference.scores, atol=ATOL)
        np.testing.assert_allclose(result.boxes / 512, reference.boxes / 512, atol=ATOL)


def test_langsam_runs_on_the_onnx_predictor(torch_predictor, onnx_predictor, photo):
    """`LangSAM(model="sam3", sam3_model=OnnxSam3Predictor(...))`: the concept backend on onnxruntime,
    compared with what the PyTorch predictor gives for the same queries."""
    from langsam import LangSAM
    from sam3_langsam_support import expected_segment

    pipeline = LangSAM(model="sam3", sam3_model=onnx_predictor.fork(), device="cpu")
    result = pipeline.segment(photo, "an astronaut. a flag", box_threshold=0.2)
    expected = expected_segment(torch_predictor, photo, ["an astronaut", "a flag"], 0.2)
    assert 0 < len(result) == len(expected["scores"]) and result.labels == expected["labels"]
    assert set(result.labels) == {"an astronaut", "a flag"}
    np.testing.assert_allclose(result.scores, expected["scores"], atol=ATOL)
    # Segmentation clips boxes to the image.
    np.testing.assert_allclose(result.boxes / 512, np.clip(expected["boxes"], 0, 512) / 512, atol=ATOL)
    assert min(_iou(a, b) for a, b in zip(result.masks, expected["masks"])) >= 0.99


def test_lite_text_encoder_exports(tmp_path):
    """LiteText's MobileCLIP encoder (RepMixer convolutions with batch norm, bidirectional attention)
    exports too. Its batch norms also guard the export's own check: run with the model left in
    training mode after the export, they would use batch statistics and differ by whole units."""
    from sam.sam3.text import tokenize

    model = load_sam3(save_tiny_sam3_lite_text(tmp_path)["transformers"])
    export = export_sam3_onnx(model, tmp_path / "onnx", image_encoder=False, heads=False)
    assert export.max_abs_error["text_features"] < ATOL and export.heads is None
    import onnxruntime as ort

    ids = tokenize(["a dog", "a photo of three cats"])
    features, valid = ort.InferenceSession(str(export.text_encoder)).run(None, {"token_ids": ids.numpy()})
    with torch.no_grad():
        expected, expected_valid = model.encode_text(ids)
    assert expected[expected_valid].std() > 0.1 and (valid == expected_valid.numpy()).all()
    np.testing.assert_allclose(features, expected.numpy(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="holds no heads.onnx"):
        OnnxSam3Predictor(tmp_path / "onnx")


def test_large_graphs_keep_weights_beside(checkpoints, torch_predictor, tmp_path, monkeypatch):
    """The released ViT (1.8 GB) comes near protobuf's 2 GiB cap, so large graphs are written with
    their weights in one side file; here the cap is lowered so the tiny encoder takes that path."""
    import onnxruntime as ort

    monkeypatch.setattr(sam3_export, "_PROTOBUF_LIMIT", 2**16)
    export = export_sam3_onnx(torch_predictor.model, tmp_path, text_encoder=False, heads=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [IMAGE_ENCODER_NAME, IMAGE_ENCODER_NAME + ".data", SAM3_MANIFEST_NAME])
    assert (tmp_path / IMAGE_ENCODER_NAME).stat().st_size < 2**18 < (tmp_path / (IMAGE_ENCODER_NAME + ".data")).stat().st_size
    assert export.max_abs_error["image_feats_0"] < ATOL
    pixels = torch_predictor.preprocess(data.astronaut())
    levels = ort.InferenceSession(str(export.image_encoder)).run(None, {"pixels": pixels.numpy()})
    for ours, expected in zip(levels, torch_predictor._features.feats):
        np.testing.assert_allclose(ours, expected.numpy(), atol=ATOL, rtol=0)


def test_bad_inputs(exported, checkpoints, tiny_sam_checkpoint, onnx_predictor, tmp_path, monkeypatch):
    out = exported[0]
    with pytest.raises(ValueError, match="has no sam3_onnx.json"):
        OnnxSam3Predictor(tmp_path)
    with pytest.raises(RuntimeError, match="set_image"):
        OnnxSam3Predictor(out).predict(text="a dog")
    with pytest.raises(ValueError, match="non-empty phrase"):
        onnx_predictor.predict(text=" ")
    with pytest.raises(ValueError, match="inside the 512x512 image"):
        onnx_predictor.predict(exemplars=[((10, 10, 600, 50), True)])
    with pytest.raises(ValueError, match="expected a SAM 3 image model"):
        export_sam3_onnx(torch.nn.Linear(2, 2), tmp_path / "x")

    base = ["export", "onnx", "--sam-type", "sam3", "--out", str(tmp_path / "o")]
    status, _, stderr = _cli([*base, "--checkpoint", str(tiny_sam_checkpoint)])
    assert status == 1 and "cannot load the SAM 3 model" in stderr and "looks like a SAM 1 checkpoint" in stderr
    status, _, stderr = _cli([*base, "--checkpoint", str(tmp_path / "none.pt")])
    assert status == 2 and "does not exist" in stderr
    status, _, stderr = _cli([*base, "--checkpoint", str(checkpoints["meta"]), "--quantize"])
    assert status == 2 and "--quantize applies to SAM 1 / SAM 2" in stderr
    status, _, stderr = _cli(["export", "onnx", "--sam-type", "vit_b", "--out", str(tmp_path / "o"), "--no-text-encoder"])
    assert status == 2 and "--no-text-encoder applies to SAM 3" in stderr
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the optional extra is not installed
    status, _, stderr = _cli([*base, "--checkpoint", str(checkpoints["meta"])])
    assert status == 1 and "pip install 'langsam[export]'" in stderr
    assert not (tmp_path / "o").exists()
