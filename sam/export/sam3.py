"""Export SAM 3's concept model (`sam.sam3.Sam3Image`) to ONNX: the image encoder, the text
encoder and the text/exemplar-prompt heads. `sam.export.runtime_sam3.OnnxSam3Predictor` runs
what this writes, with `Sam3Predictor`'s API.

`export_sam3_onnx(model, out_dir)` writes three graphs and a manifest:

- `image_encoder.onnx`: the Perception Encoder ViT and the FPN neck. Input `pixels`
  (1, 3, S, S) float32, the image resized to S x S (S = `config.image_size`, 1008 for the
  released model) and scaled to [-1, 1] as `Sam3Predictor.preprocess` does. Outputs the
  backbone levels the heads use, finest first: `image_feats_0..K-1`, (1, d, S/14 * s, S/14 * s)
  for the neck's scale factors s (released: 4, 2, 1 -> 288, 144, 72 px maps of 256 channels).
- `text_encoder.onnx`: the text encoder (CLIP, or LiteText's MobileCLIP). Input `token_ids`
  (B, L) int64, CLIP BPE ids zero-padded to L = `config.context_length` (32;
  `sam.sam3.text.tokenize` makes them); outputs `text_features` (B, L, d) and `text_valid`
  (B, L) bool.
- `heads.onnx`: the geometry (exemplar) encoder, the DETR fusion encoder and query decoder
  with the presence token, the scoring head and the segmentation head, as `Sam3Image.decode`.
  Inputs: the image levels (batch 1), `text_features` / `text_valid` (B, L, ...), `boxes`
  (B, N, 4) cxcywh in [0, 1] of the model-input square, `box_labels` (B, N) int64 (1
  positive, 0 negative) and `box_valid` (B, N) bool; B and N are dynamic, N >= 1. A text-only
  prompt is one box with `box_valid` False: every consumer of a prompt token masks it out,
  so it gives what `decode` gives for an empty box list (the cls token still joins the
  prompt, Meta's behaviour). Outputs `logits` (B, Q) query logits, `presence` (B,) presence
  logits, `boxes_out` (B, Q, 4) cxcywh in [0, 1] and `mask_logits` (B, Q, h, w) at the finest
  level.
- `sam3_onnx.json`: the family ("sam3"), the config, the file and tensor names.

The ViT's rotary position embedding multiplies complex64 tables (`freqs_cis`), which neither
the TorchScript exporter nor ONNX has a type for. The export swaps each ViT attention for
`RealRopeAttention`: the same weights, and the rotation written with the tables' real and
imaginary parts (cos and sin) on even/odd channel pairs. `apply_rope_real` equals
`sam.sam3.backbone.apply_rope` to float32 rounding (tests/test_onnx_sam3.py). The geometry
encoder's ROI-align gets its boxes as one (batch index, box) tensor instead of a per-image list
(`_encode_boxes_traceable`), which keeps the batch axis dynamic. The model itself is not changed:
both swaps live in the export's copy.

Everything else exports as it is: SDPA with boolean and additive masks, ROI-align (ONNX RoiAlign,
half-pixel, adaptive sampling), GroupNorm, einsum. Sine position maps and the box-bias grid depend
only on the fixed image size and are folded to constants. A graph whose weights pass 1 GiB (the
released ViT, 1.8 GB, and text encoder, 1.4 GB) keeps them in one side file, `<graph>.onnx.data`.
onnx and onnxruntime are imported only when a function needs them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS_NAME",
    "IMAGE_ENCODER_NAME",
    "SAM3_MANIFEST_NAME",
    "TEXT_ENCODER_NAME",
    "HeadsGraph",
    "ImageEncoderGraph",
    "RealRopeAttention",
    "Sam3OnnxExport",
    "TextEncoderGraph",
    "apply_rope_real",
    "export_sam3_onnx",
    "read_sam3_manifest",
    "sam3_io_names",
]

IMAGE_ENCODER_NAME = "image_encoder.onnx"
TEXT_ENCODER_NAME = "text_encoder.onnx"
HEADS_NAME = "heads.onnx"
SAM3_MANIFEST_NAME = "sam3_onnx.json"
SAM3_MANIFEST_FORMAT = 1
MIN_OPSET = 17
DEFAULT_OPSET = 17
# Queries per attention block in the exported ViT (see RealRopeAttention).
QUERY_BLOCK = 1024
# protobuf caps one file at 2 GiB; larger graphs keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**26


# ============================================================================================
# Real-valued RoPE
# ============================================================================================


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope(x, cos + i sin)` without complex numbers: channel pairs (2j, 2j + 1) of
    x (B, heads, N, D) are rotated by the angle whose cos and sin are cos[:, j], sin[:, j] (N, D/2):
    (a, b) -> (a cos - b sin, a sin + b cos)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class RealRopeAttention(nn.Module):
    """`sam.sam3.backbone.RopeAttention` with its complex table held as two real ones (the same
    `qkv` and `proj` modules, shared, not copied), attending in blocks of `QUERY_BLOCK` queries
    over maps larger than that."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.num_heads = attention.num_heads
        self.qkv = attention.qkv
        self.proj = attention.proj
        table = attention.freqs_cis.to(torch.complex64)
        self.register_buffer("rope_cos", table.real.detach().clone().contiguous(), persistent=False)
        self.register_buffer("rope_sin", table.imag.detach().clone().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        if window:  # the plain partition: the exported graph keeps the simplest layout ops
            from ..sam3.backbone import window_partition, window_unpartition

            size = x.shape[1:3]
            windows, padded = window_partition(x, window)
            return window_unpartition(self.forward(windows), window, padded, size)
        batch, height, width, dim = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = apply_rope_real(q, self.rope_cos, self.rope_sin)
        k = apply_rope_real(k, self.rope_cos, self.rope_sin)
        tokens = height * width
        if tokens <= QUERY_BLOCK:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # onnxruntime materialises the attention matrix: over the released 72 x 72 global map
            # that is 16 x 5184^2 floats, 1.7 GB. Blocks of queries (each row's softmax is its own)
            # keep it to a fifth.
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, start : start + QUERY_BLOCK], k, v)
                             for start in range(0, tokens, QUERY_BLOCK)], dim=2)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, dim))


def _encode_boxes_traceable(self, boxes: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """`GeometryEncoder._encode_boxes` with ROI-align given one (B * N, 5) tensor of (batch
    index, x0, y0, x1, y1) rows: the form torchvision turns the per-image box list into itself,
    so the result is the same, but the traced graph keeps B dynamic (unbinding the batch into a
    list would fix B at the traced size)."""
    from torchvision.ops import roi_align

    from ..sam3.layers import TWO_PI, box_cxcywh_to_xyxy, sine_features

    batch, count = boxes.shape[0], boxes.shape[1]
    embed = self.boxes_direct_project(boxes)
    height, width = feats.shape[-2:]
    scale = boxes.new_tensor([width, height, width, height])
    xyxy = (box_cxcywh_to_xyxy(boxes) * scale).float()
    image_index = torch.arange(batch, dtype=xyxy.dtype)[:, None, None].expand(batch, count, 1)
    rois = torch.cat((image_index, xyxy), dim=-1).reshape(-1, 5)
    pooled = roi_align(feats, rois, self.roi_size)
    embed = embed + self.boxes_pool_project(pooled).view(batch, count, self.d_model)
    cx, cy, w, h = boxes.unbind(-1)
    half = self.d_model // 2
    pos = torch.cat(
        (sine_features(cy * TWO_PI, half), sine_features(cx * TWO_PI, half), h[..., None], w[..., None]), dim=-1
    )
    embed = embed + self.boxes_pos_enc_project(pos)
    return embed + self.label_embed(labels.long())


def _fixed_position_embedding(trunk: nn.Module, grid: int) -> None:
    """Hold the ViT's tiled position grid for the fixed (grid, grid) token map as a constant. Traced,
    `tiled_pos_embed`'s ceil division `-(-height // side)` becomes ONNX's truncating integer
    division: with a grid that is not a multiple of the pretraining one (e.g. 36 tokens on a
    24-token table) the tile count came out 1 instead of 2."""
    trunk.register_buffer("export_pos_embed", trunk.tiled_pos_embed(grid, grid).detach().clone(), persistent=False)
    trunk.tiled_pos_embed = types.MethodType(lambda self, height, width: self.export_pos_embed, trunk)


def _exportable_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of `model` in eval mode with every RoPE attention made real-valued, the
    geometry encoder's ROI-align made batch-dynamic (`_encode_boxes_traceable`) and the ViT's
    position grid held as a constant (`_fixed_position_embedding`). The caller's model is left as
    it is."""
    from ..sam3.backbone import RopeAttention

    # Swap the attention before casting: `.to(dtype=float32)` would drop the tables' imaginary parts.
    clone = copy.deepcopy(model).to(device="cpu").eval()

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, RopeAttention):
                setattr(module, name, RealRopeAttention(child))
            else:
                replace(child)

    replace(clone)
    clone.geometry_encoder._encode_boxes = types.MethodType(_encode_boxes_traceable, clone.geometry_encoder)
    config = clone.config
    _fixed_position_embedding(clone.backbone.vision_backbone.trunk, config.image_size // config.patch_size)
    return clone.to(dtype=torch.float32)


# ============================================================================================
# Graphs
# ============================================================================================


class ImageEncoderGraph(nn.Module):
    """`Sam3Image.encode_image` -> the feature levels as a tuple (positions are constants of the
    image size, rebuilt inside the heads graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.encode_image(pixels).feats)


class TextEncoderGraph(nn.Module):
    """`Sam3Image.encode_text`: token ids (B, L) -> (features (B, L, d), valid (B, L))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_text(token_ids)


class HeadsGraph(nn.Module):
    """`Sam3Image.decode` on the image levels (batch 1), one prompt per row of the text and box
    inputs, with the sine positions of each level stored as constants."""

    def __init__(self, model: nn.Module, level_shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        from ..sam3.layers import sine_grid

        self.model = model
        d_model = int(model.config.d_model)
        for index, (height, width) in enumerate(level_shapes):
            self.register_buffer(f"pos_{index}", sine_grid(height, width, d_model)[None], persistent=False)
        self.levels = len(level_shapes)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from ..sam3.model import ImageFeatures

        feats = list(inputs[: self.levels])
        text, text_valid, boxes, box_labels, box_valid = inputs[self.levels :]
        batch = text.shape[0]
        feats = [feat.expand(batch, -1, -1, -1) for feat in feats]
        pos = [getattr(self, f"pos_{i}").expand(batch, -1, -1, -1) for i in range(self.levels)]
        out = self.model.decode(ImageFeatures(feats, pos), text, text_valid, boxes, box_labels, box_valid)
        return out["logits"], out["presence"], out["boxes"], out["masks"]


def sam3_io_names(levels: int) -> dict[str, list[str]]:
    features = [f"image_feats_{i}" for i in range(levels)]
    return {
        "image_encoder_inputs": ["pixels"],
        "image_encoder_outputs": features,
        "text_encoder_inputs": ["token_ids"],
        "text_encoder_outputs": ["text_features", "text_valid"],
        "heads_inputs": [*features, "text_features", "text_valid", "boxes", "box_labels", "box_valid"],
        "heads_outputs": ["logits", "presence", "boxes_out", "mask_logits"],
    }


# ============================================================================================
# Export
# ============================================================================================


@dataclass
class Sam3OnnxExport:
    """What `export_sam3_onnx` wrote: the folder, its graphs and the manifest; `max_abs_error`
    holds the largest |onnxruntime - PyTorch| of each checked output when `verify=True`."""

    directory: Path
    image_encoder: Path | None
    text_encoder: Path | None
    heads: Path | None
    manifest: dict[str, Any]
    max_abs_error: dict[str, float] = field(default_factory=dict)


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    return opset


def _parameter_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _export_graph(graph: nn.Module, args: tuple, path: Path, opset: int, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> Path:
    """torch.onnx.export (TorchScript-based, as `sam.export.onnx`) to `path`, written in a
    temporary folder beside it and moved in when complete. A graph whose weights come near
    protobuf's 2 GiB limit (the released ViT is 1.8 GB in float32) keeps them in one side file,
    `path.name + '.data'`, which must stay beside the graph."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    # The exporter restores the wrapper's train/eval mode afterwards, recursively: a wrapper left
    # in training mode would put the model's batch norms (LiteText's) into training mode too.
    graph.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, args, str(scratch / path.name), dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        if _parameter_bytes(graph) > _PROTOBUF_LIMIT // 2:
            model = onnx.load(str(scratch / path.name))  # also reads any side files the exporter wrote
            for stale in (path, path.with_name(path.name + ".data")):
                stale.unlink(missing_ok=True)
            onnx.save_model(model, str(scratch / "final.onnx"), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
            os.replace(scratch / (path.name + ".data"), path.with_name(path.name + ".data"))
            os.replace(scratch / "final.onnx", path)
        else:
            path.with_name(path.name + ".data").unlink(missing_ok=True)
            os.replace(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _example_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A synthetic preprocessed image, two token rows (one short, one longer) and two exemplar
    rows (two boxes; the second row's second box invalid): batch and box count are not 1, so the
    traced graph keeps both dynamic."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
    tokens = torch.zeros(2, config.context_length, dtype=torch.int64)
    start, end = 49406, 49407
    tokens[0, :4] = torch.tensor([start, 320, 1929, end])
    tokens[1, :6] = torch.tensor([start, 320, 1746, 539, 2368, end])
    tokens = tokens.clamp(max=_vocab_size(model) - 1)
    boxes = torch.tensor([[[0.4, 0.5, 0.3, 0.4], [0.7, 0.3, 0.2, 0.2]],
                          [[0.5, 0.5, 0.6, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    labels = torch.tensor([[1, 0], [1, 1]], dtype=torch.int64)
    valid = torch.tensor([[True, True], [True, False]])
    return pixels, tokens, (boxes, labels, valid)


def _vocab_size(model: nn.Module) -> int:
    language = model.backbone.language_backbone
    for module in language.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return int(model.config.vocab_size)


def export_sam3_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    image_encoder: bool = True,
    text_encoder: bool = True,
    heads: bool = True,
    verify: bool = True,
) -> Sam3OnnxExport:
    """Export a `sam.sam3.Sam3Image` to `out_dir` (created if needed): `image_encoder.onnx`,
    `text_encoder.onnx`, `heads.onnx` (any of them can be left out) and `sam3_onnx.json`.
    verify: run each written graph once with onnxruntime on synthetic inputs and record the
    largest difference from PyTorch in `Sam3OnnxExport.max_abs_error` (logged)."""
    from ..sam3.model import Sam3Image

    if not isinstance(model, Sam3Image):
        raise ValueError(f"expected a SAM 3 image model (sam.sam3.Sam3Image), got {type(model).__name__}")
    if not (image_encoder or text_encoder or heads):
        raise ValueError("nothing to export: the image encoder, text encoder and heads are all off")
    opset = _check_opset(opset)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {os.fspath(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    clone = _exportable_copy(model)
    pixels, tokens, prompts = _example_inputs(clone)
    with torch.no_grad():
        feats = ImageEncoderGraph(clone)(pixels)
        text = TextEncoderGraph(clone)(tokens)
    names = sam3_io_names(len(feats))
    written: dict[str, Path | None] = {"image_encoder": None, "text_encoder": None, "heads": None}
    if image_encoder:
        written["image_encoder"] = _export_graph(
            ImageEncoderGraph(clone), (pixels,), out / IMAGE_ENCODER_NAME, opset,
            names["image_encoder_inputs"], names["image_encoder_outputs"], {},
        )
    if text_encoder:
        written["text_encoder"] = _export_graph(
            TextEncoderGraph(clone), (tokens,), out / TEXT_ENCODER_NAME, opset,
            names["text_encoder_inputs"], names["text_encoder_outputs"],
            {"token_ids": {0: "batch"}, "text_features": {0: "batch"}, "text_valid": {0: "batch"}},
        )
    if heads:
        graph = HeadsGraph(clone, [tuple(f.shape[-2:]) for f in feats])
        dynamic = {name: {0: "batch"} for name in ["text_features", "text_valid", *names["heads_outputs"]]}
        for name in ("boxes", "box_labels", "box_valid"):
            dynamic[name] = {0: "batch", 1: "num_boxes"}
        written["heads"] = _export_graph(
            graph, (*feats, *text, *prompts), out / HEADS_NAME, opset, names["heads_inputs"],
            names["heads_outputs"], dynamic,
        )
    files = {key: (path.name if path is not None else None) for key, path in written.items()}
    manifest = _manifest(clone, opset, [list(f.shape[1:]) for f in feats], files, names)
    partial = out / (SAM3_MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(partial, out / SAM3_MANIFEST_NAME)
    result = Sam3OnnxExport(out, written["image_encoder"], written["text_encoder"], written["heads"], manifest)
    if verify:
        result.max_abs_error = _verify(clone, result, pixels, tokens, prompts)
        logger.info("onnxruntime vs PyTorch, largest absolute differences: %s", result.max_abs_error)
    return result


def _manifest(model: nn.Module, opset: int, level_shapes: list[list[int]], files: dict[str, str | None],
              names: dict[str, list[str]]) -> dict[str, Any]:
    config = model.config.to_dict()
    return {
        "format": SAM3_MANIFEST_FORMAT,
        "family": "sam3",
        "model_type": "sam3",
        "image_size": int(model.config.image_size),
        "context_length": int(model.config.context_length),
        "num_queries": int(model.config.num_queries),
        "feature_shapes": level_shapes,
        "opset": opset,
        "files": files,
        "names": names,
        "config": json.loads(json.dumps(config)),
    }


def _verify(model: nn.Module, export: Sam3OnnxExport, pixels: torch.Tensor, tokens: torch.Tensor,
            prompts: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| per output, on the synthetic inputs the graphs were traced on."""
    import onnxruntime as ort

    names = export.manifest["names"]
    errors: dict[str, float] = {}
    model.eval()

    def run(path: Path, feed: dict[str, np.ndarray], expected: tuple[torch.Tensor, ...], output_names: list[str]):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, ours, theirs in zip(output_names, session.run(output_names, feed), expected):
            errors[name] = float(np.abs(ours.astype(np.float64) - theirs.numpy().astype(np.float64)).max())

    with torch.no_grad():
        feats = ImageEncoderGraph(model)(pixels)
        text = TextEncoderGraph(model)(tokens)
        if export.image_encoder is not None:
            run(export.image_encoder, {"pixels": pixels.numpy()}, feats, names["image_encoder_outputs"])
        if export.text_encoder is not None:
            run(export.text_encoder, {"token_ids": tokens.numpy()}, text, names["text_encoder_outputs"])
        if export.heads is not None:
            graph = HeadsGraph(model, [tuple(f.shape[-2:]) for f in feats])
            inputs = (*feats, *text, *prompts)
            expected = graph(*inputs)
            feed = {name: value.numpy() for name, value in zip(names["heads_inputs"], inputs)}
            run(export.heads, feed, expected, names["heads_outputs"])
    return errors


def read_sam3_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The `sam3_onnx.json` of an export folder, checked."""
    folder = Path(directory)
    path = folder / SAM3_MANIFEST_NAME
    if not folder.is_dir():
        raise ValueError(f"{os.fspath(folder)!r} is not a folder; pass the --out folder of 'langsam export onnx'")
    if not path.is_file():
        raise ValueError(f"{os.fspath(folder)!r} has no {SAM3_MANIFEST_NAME}: not a SAM 3 folder written by "
                         "'langsam export onnx --sam-type sam3'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {os.fspath(path)!r}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SAM3_MANIFEST_FORMAT or manifest.get("family") != "sam3":
        raise ValueError(f"{os.fspath(path)!r} is not a SAM 3 manifest of format {SAM3_MANIFEST_FORMAT}; export again")
    return manifest
