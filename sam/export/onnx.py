"""Export SAM (SAM 1 and SAM 2 / 2.1) to ONNX: the graph wrappers, the export, int8
quantisation and the manifest. `sam.export.runtime.OnnxSamPredictor` runs what this writes.

`export_onnx(model, out_dir)` writes two graphs and a manifest:

- `encoder.onnx`, the image encoder with its normalisation (and, for SAM 1, the padding to
  1024x1024) inside the graph:
  - SAM 1: input `image` (1, 3, h, w) float32 RGB in [0, 255], the image resized so that its
    longest side is 1024 (`ResizeLongestSide`; h and w are dynamic); output `image_embeddings`
    (1, 256, 64, 64).
  - SAM 2: input `image` (1, 3, 1024, 1024) float32 RGB in [0, 1], the image stretched to the
    square (`ResizeSquare`); outputs `image_embed` (1, 256, 64, 64) and the two high-resolution
    levels `high_res_feats_0` (1, 32, 256, 256) and `high_res_feats_1` (1, 64, 128, 128), as
    `Sam2.encode_image` returns them.
- `decoder.onnx`, the prompt encoder and the mask decoder with the upscaling to the original
  image. Inputs: the encoder's outputs, `point_coords` (1, N, 2) xy in the model-input frame
  (N dynamic), `point_labels` (1, N) float32 (1 foreground, 0 background, -1 padding, 2 and 3
  the top-left and bottom-right box corners), `mask_input` (1, 1, 256, 256) low-res logits,
  `has_mask_input` (1,) 1.0 or 0.0, and `orig_im_size` (2,) float32 (H, W). Outputs: `masks`
  (1, M, H, W) logits in the original frame, `iou_predictions` (1, M) and `low_res_masks`
  (1, M, 256, 256); SAM 2 adds `object_score_logits` (1, 1). M = 4 (the single-mask token
  followed by the three multimask tokens) unless exported with `single_mask=True`, which keeps
  the one mask `multimask_output=False` gives (SAM 1: token 0; SAM 2: token 0 unless it is
  unstable, then the best multimask token) and skips upscaling the others.
- optionally `decoder.int8.onnx`, the decoder with int8 weights (`onnxruntime.quantization`).
- `sam_onnx.json`, what a runtime needs to prepare inputs (family, sizes, mask threshold).

The upscaling samples the low-res logits exactly where PyTorch's `F.interpolate` does (the
sample positions are computed as its CPU kernel computes them, with gathers), so the full-size
logits agree with `SamPredictor`'s to ~1e-5. `exact_upscale=False` uses onnxruntime's Resize
instead: about three times faster on that step, within ~5e-4 (it rounds the positions of an
arbitrary scale differently).

The point layout follows Meta's SAM 1 ONNX decoder: a box is two points labelled 2 and 3, and
without a box a padding point (label -1) closes the list. SAM 1 puts the box corners after the
clicks, SAM 2 before them and always adds the padding point. `OnnxSamPredictor`
(`sam.export.runtime`) builds these inputs, so it takes exactly `SamPredictor`'s arguments.

The export uses PyTorch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript,
and keeps `orig_im_size` and the number of points dynamic. Nothing here is imported by `sam`;
onnx and onnxruntime are imported only when a function needs them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.common import LayerNorm2d

logger = logging.getLogger(__name__)

__all__ = [
    "DECODER_NAME",
    "ENCODER_NAME",
    "MANIFEST_NAME",
    "MIN_OPSET",
    "QUANTIZED_DECODER_NAME",
    "DecoderGraph",
    "EncoderGraph",
    "OnnxExport",
    "export_decoder",
    "export_encoder",
    "export_onnx",
    "quantize_decoder",
    "read_manifest",
]

ENCODER_NAME = "encoder.onnx"
DECODER_NAME = "decoder.onnx"
QUANTIZED_DECODER_NAME = "decoder.int8.onnx"
MANIFEST_NAME = "sam_onnx.json"
MANIFEST_FORMAT = 1
MIN_OPSET = 17
DEFAULT_OPSET = 17

# Labels of the decoder's point list (the SAM 2 prompt encoder's names; SAM 1 uses the same
# embeddings for its box corners).
PADDING_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 2, 3


# ============================================================================================
# Graphs: small nn.Modules that call the model's own modules in an exportable form
# ============================================================================================


class _StaticLayerNorm2d(nn.Module):
    """LayerNorm2d with its channel count held as a Python int: the TorchScript exporter needs
    `normalized_shape` to be a constant, and LayerNorm2d reads it off the input's shape."""

    def __init__(self, norm: LayerNorm2d) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps
        self.num_channels = int(norm.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _exportable_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of `model` in eval mode with every LayerNorm2d made exportable (same
    parameters, same arithmetic). The caller's model is left as it is."""
    clone = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, LayerNorm2d):
                setattr(module, name, _StaticLayerNorm2d(child))
            else:
                replace(child)

    replace(clone)
    return clone


class EncoderGraph(nn.Module):
    """`model.encode_image` with tuple outputs (SAM 2's dict becomes three tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.family = getattr(model, "family", "sam1")

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.encode_image(image)
        if self.family == "sam2":
            return features["image_embed"], features["high_res_feats"][0], features["high_res_feats"][1]
        return (features,)


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder + upscaling, with the prompts as fixed-layout tensors (see
    the module docstring). The arithmetic is the model's own: the point embedding is the prompt
    encoder's (random-Fourier position of the pixel centre, replaced by `not_a_point_embed` for
    padding, plus the label's learned embedding), the mask prompt either goes through
    `mask_downscaling` or is replaced by `no_mask_embed`, selected by `has_mask_input`."""

    def __init__(self, model: nn.Module, single_mask: bool = False, exact_upscale: bool = True) -> None:
        super().__init__()
        self.family = getattr(model, "family", "sam1")
        self.exact_upscale = exact_upscale
        self.model = model
        if self.family == "sam2":
            self.prompt_encoder = model.sam_prompt_encoder
            self.mask_decoder = model.sam_mask_decoder
        else:
            self.prompt_encoder = model.prompt_encoder
            self.mask_decoder = model.mask_decoder
        self.single_mask = single_mask
        self.image_size = int(model.image_size)
        height, width = self.prompt_encoder.input_image_size
        self.register_buffer("coord_scale", torch.tensor([1.0 / width, 1.0 / height]).view(1, 1, 2), False)
        # The dense positional encoding depends on no input: computed once, stored as a constant.
        with torch.no_grad():
            self.register_buffer("dense_pe", self.prompt_encoder.get_dense_pe().detach().clone(), False)

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """(1, N, 2) xy in the model-input frame, (1, N) labels -> (1, N, C) sparse embeddings."""
        encoder = self.prompt_encoder
        pe_layer = encoder.pe_layer
        normalised = (point_coords + 0.5) * self.coord_scale
        embedding = pe_layer._encode(normalised.to(pe_layer.positional_encoding_gaussian_matrix.dtype))
        labels = point_labels[..., None]
        embedding = torch.where(labels == PADDING_LABEL, encoder.not_a_point_embed.weight, embedding)
        for label, table in enumerate(encoder.point_embeddings):
            embedding = embedding + torch.where(labels == label, table.weight, 0.0)
        return embedding

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """(1, 1, 256, 256) logits and a (1,) flag -> (1, C, 64, 64) dense embedding."""
        encoder = self.prompt_encoder
        has_mask = has_mask_input.reshape(1, 1, 1, 1)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask * encoder.mask_downscaling(mask_input) + (1.0 - has_mask) * no_mask

    def upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(1, M, 256, 256) logits -> (1, M, H, W) in the original frame, as the model's
        `postprocess_masks` (SAM 1: to the padded square, crop the padding, then to (H, W))."""
        size = orig_im_size.to(torch.int64)
        resize = resize_bilinear if self.exact_upscale else _plain_resize
        if self.family == "sam2":
            return resize(low_res, size[0], size[1])
        # An exact 4x upscale: onnxruntime's Resize samples where PyTorch does.
        square = self.image_size
        masks = F.interpolate(low_res, (square, square), mode="bilinear", align_corners=False)
        # ResizeLongestSide.get_preprocess_shape in double precision, as Python computes it.
        size64 = orig_im_size.to(torch.float64)
        scale = self.image_size / torch.max(size64)
        input_size = torch.floor(size64 * scale + 0.5).to(torch.int64)
        masks = masks[..., : input_size[0], : input_size[1]]
        return resize(masks, size[0], size[1])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.family == "sam2":
            image_embed, feat_s0, feat_s1, point_coords, point_labels, mask_input, has_mask_input, orig_im_size = inputs
        else:
            image_embed, point_coords, point_labels, mask_input, has_mask_input, orig_im_size = inputs
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_mask(mask_input, has_mask_input)
        if self.family == "sam2":
            low_res, iou, _, object_score = self.mask_decoder.predict_masks(
                image_embed, self.dense_pe, sparse, dense, [feat_s0, feat_s1]
            )
            if self.single_mask:
                low_res, iou = self.mask_decoder.dynamic_multimask_via_stability_select(low_res, iou)
            return self.upscale(low_res, orig_im_size), iou, low_res, object_score
        low_res, iou, _, _ = self.mask_decoder.predict_masks(image_embed, self.dense_pe, sparse, dense)
        if self.single_mask:
            low_res, iou = low_res[:, :1], iou[:, :1]
        return self.upscale(low_res, orig_im_size), iou, low_res


def _linear_taps(in_size: torch.Tensor, out_size: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each of `out_size` outputs along one axis: the two input indices and their weights of
    a half-pixel bilinear resize from `in_size`, computed as PyTorch's CPU kernel does: scale
    in float32, the source position `scale * (i + 0.5) - 0.5` rounded once (the kernel fuses
    the multiply-add), clamped at 0."""
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    positions = torch.arange(out_size, dtype=torch.int64).to(torch.float64)
    source = (scale.to(torch.float64) * (positions + 0.5) - 0.5).to(torch.float32)
    source = torch.clamp(source, min=0.0)
    last = in_size - 1
    first_index = torch.minimum(torch.floor(source).to(torch.int64), last)
    weight = torch.clamp(source - first_index.to(torch.float32), 0.0, 1.0)
    second_index = torch.minimum(first_index + 1, last)
    return first_index, second_index, 1.0 - weight, weight


def resize_bilinear(x: torch.Tensor, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """`F.interpolate(x, (height, width), mode="bilinear", align_corners=False)` for a
    (B, C, h, w) tensor, written with gathers so that the exported graph samples exactly where
    PyTorch does. (onnxruntime's Resize computes the sample positions of an arbitrary scale in
    another order; on mask logits that moved results by up to 5e-4. It costs about three times
    Resize's time: measured 215 vs 62 ms for four 1024x1024 masks on one core.)"""
    shape = torch._shape_as_tensor(x)
    rows0, rows1, row_w0, row_w1 = _linear_taps(shape[2], height)
    cols0, cols1, col_w0, col_w1 = _linear_taps(shape[3], width)
    # Along the width first, on the input's few rows; then along the height: five passes over
    # the full-size output instead of thirteen.
    widened = col_w0 * x.index_select(3, cols0) + col_w1 * x.index_select(3, cols1)
    return row_w0[:, None] * widened.index_select(2, rows0) + row_w1[:, None] * widened.index_select(2, rows1)


def _plain_resize(x: torch.Tensor, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """`F.interpolate` as it is: onnxruntime's Resize (fast; see `resize_bilinear`)."""
    return F.interpolate(x, (height, width), mode="bilinear", align_corners=False)


def _io_names(family: str) -> dict[str, list[str]]:
    features = ["image_embed", "high_res_feats_0", "high_res_feats_1"] if family == "sam2" else ["image_embeddings"]
    decoder_outputs = ["masks", "iou_predictions", "low_res_masks"]
    if family == "sam2":
        decoder_outputs.append("object_score_logits")
    prompts = ["point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
    return {"features": features, "decoder_inputs": features + prompts, "decoder_outputs": decoder_outputs}


# ============================================================================================
# Export
# ============================================================================================


@dataclass
class OnnxExport:
    """What `export_onnx` wrote: the folder, its files and the manifest; `max_abs_error` holds the
    largest |onnxruntime - PyTorch| of each checked output when `verify=True`."""

    directory: Path
    encoder: Path | None
    decoder: Path | None
    quantized_decoder: Path | None
    manifest: dict[str, Any]
    max_abs_error: dict[str, float] = field(default_factory=dict)


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    return opset


def _torch_onnx_export(graph: nn.Module, args: tuple, path: Path, opset: int, input_names: list[str],
                       output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about traced shape arithmetic and its own deprecation; the graphs
        # are checked against PyTorch below (verify=True) and in the tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, str(partial), dynamo=False, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    _deduplicate_constants(partial)
    os.replace(partial, path)


def _deduplicate_constants(path: Path) -> None:
    """Make equal constant tensors one: constant folding writes the decoder's positional
    encoding once per transformer layer (three 4 MiB copies for the same values)."""
    import onnx

    model = onnx.load(str(path))
    first_by_content: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            if len(tensor.raw_data) >= 4096:
                key = (tensor.data_type, tuple(tensor.dims), tensor.raw_data)
                if key in first_by_content:
                    renamed[node.output[0]] = first_by_content[key]
                    continue
                first_by_content[key] = node.output[0]
        kept.append(node)
    if not renamed:
        return
    for node in kept:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(path))


def _example_image(model: nn.Module) -> torch.Tensor:
    size = int(model.image_size)
    generator = torch.Generator().manual_seed(0)
    if getattr(model, "family", "sam1") == "sam2":
        return torch.rand(1, 3, size, size, generator=generator)
    # A landscape example, so that the traced padding is not the identity.
    return torch.rand(1, 3, size * 3 // 4, size, generator=generator) * 255


def export_encoder(model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model`'s image encoder (with normalisation; SAM 1 also pads) as ONNX to `path`.
    `model` is a `sam.Sam` or `sam.Sam2`; it is copied, never changed."""
    opset = _check_opset(opset)
    path = Path(path)
    clone = _exportable_copy(model)
    family = getattr(clone, "family", "sam1")
    names = _io_names(family)
    dynamic = {} if family == "sam2" else {"image": {2: "height", 3: "width"}}
    _torch_onnx_export(EncoderGraph(clone), (_example_image(clone),), path, opset, ["image"], names["features"],
                       dynamic)
    return path


def _example_prompts(model: nn.Module, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    size = float(model.image_size)
    coords = torch.tensor([[[0.3 * size, 0.4 * size], [0.6 * size, 0.2 * size], [0.0, 0.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])
    mask_input = torch.zeros(1, 1, 256, 256)
    has_mask = torch.zeros(1)
    orig_im_size = torch.tensor([600.0, 800.0])
    return (*features, coords, labels, mask_input, has_mask, orig_im_size)


def export_decoder(model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                   single_mask: bool = False, exact_upscale: bool = True) -> Path:
    """Write `model`'s prompt encoder + mask decoder + upscaling as ONNX to `path` (inputs and
    outputs in the module docstring). `single_mask=True` keeps only the mask that
    `multimask_output=False` gives. `exact_upscale=False` upscales with onnxruntime's Resize:
    about three times faster on that step, full-size logits within ~5e-4 of PyTorch's instead
    of ~1e-5 (see `resize_bilinear`)."""
    opset = _check_opset(opset)
    path = Path(path)
    clone = _exportable_copy(model)
    family = getattr(clone, "family", "sam1")
    names = _io_names(family)
    with torch.no_grad():
        features = EncoderGraph(clone)(_example_image(clone))
    graph = DecoderGraph(clone, single_mask=single_mask, exact_upscale=exact_upscale)
    dynamic = {
        "point_coords": {1: "num_points"},
        "point_labels": {1: "num_points"},
        "masks": {2: "height", 3: "width"},
    }
    _torch_onnx_export(graph, _example_prompts(clone, features), path, opset, names["decoder_inputs"],
                       names["decoder_outputs"], dynamic)
    return path


def quantize_decoder(source: str | os.PathLike, destination: str | os.PathLike, block_size: int = 32) -> Path:
    """Write a copy of an exported decoder whose weight matrices are stored as 8-bit integers
    (`onnxruntime.quantization`'s weight-only `MatMulNBitsQuantizer`, one scale per block of
    `block_size` input channels); activations stay float32.

    Weight-only int8 rather than `quantize_dynamic`: on the CPUs measured, dynamically quantised
    activations made the decoder slower, not faster, and moved mask logits several times more.
    The result needs onnxruntime (`MatMulNBits` is one of its contrib operators). The
    positional-encoding matrix (2 x 128) and the small MLP heads (Gemm) stay float32.
    """
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as error:
        raise ImportError(f"int8 quantisation needs onnx and onnxruntime ({error}); "
                          "pip install 'langsam[export]'") from error
    source, destination = Path(source), Path(destination)
    model = onnx.load(str(source))
    weights = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    # Only real weight matrices: both sides at least a block wide (not the 2 x 128 Fourier matrix).
    targets = [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and len(weights.get(node.input[1], ())) == 2
        and min(weights[node.input[1]]) >= block_size
    ]
    if not targets:
        raise ValueError(f"{os.fspath(source)!r} has no weight matrix to quantise; is it a decoder.onnx?")
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=False,
                                     nodes_to_include=targets)
    # The quantizer logs every node it skips at INFO on its own handler.
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    partial = destination.with_name(destination.name + ".partial")
    quantizer.model.save_model_to_file(str(partial))
    os.replace(partial, destination)
    return destination


def _manifest(model: nn.Module, opset: int, single_mask: bool, files: dict[str, str | None]) -> dict[str, Any]:
    family = getattr(model, "family", "sam1")
    if family == "sam2":
        prompt_encoder, decoder = model.sam_prompt_encoder, model.sam_mask_decoder
    else:
        prompt_encoder, decoder = model.prompt_encoder, model.mask_decoder
    manifest = {
        "format": MANIFEST_FORMAT,
        "family": family,
        "model_type": getattr(model, "model_type", None),
        "image_size": int(model.image_size),
        "embed_dim": int(prompt_encoder.embed_dim),
        "image_embedding_size": [int(v) for v in prompt_encoder.image_embedding_size],
        "mask_input_size": [int(v) for v in prompt_encoder.mask_input_size],
        "mask_threshold": float(model.mask_threshold),
        "opset": opset,
        "single_mask": bool(single_mask),
        "files": files,
        "names": _io_names(family),
    }
    if family == "sam2":
        manifest["dynamic_multimask"] = {
            "enabled": bool(decoder.dynamic_multimask_via_stability),
            "stability_delta": float(decoder.dynamic_multimask_stability_delta),
            "stability_thresh": float(decoder.dynamic_multimask_stability_thresh),
        }
    return manifest


def export_onnx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    single_mask: bool = False,
    exact_upscale: bool = True,
    quantize: bool = False,
    encoder: bool = True,
    decoder: bool = True,
    verify: bool = True,
) -> OnnxExport:
    """Export a `sam.Sam` or `sam.Sam2` to `out_dir` (created if needed): `encoder.onnx`,
    `decoder.onnx`, optionally `decoder.int8.onnx`, and `sam_onnx.json`.

    opset: ONNX opset (>= 17). single_mask: the decoder returns only the `multimask_output=False`
    mask. exact_upscale: sample the full-size masks exactly where PyTorch does (False: onnxruntime's
    Resize, faster, logits within ~5e-4). quantize: also write the int8 decoder. verify: run the graphs once with onnxruntime
    on a synthetic image and prompts and record the largest difference from PyTorch in
    `OnnxExport.max_abs_error` (logged).
    """
    if not (encoder or decoder):
        raise ValueError("nothing to export: encoder and decoder are both off")
    if quantize and not decoder:
        raise ValueError("quantize applies to the decoder, which is not being exported")
    opset = _check_opset(opset)
    if not hasattr(model, "encode_image") or not hasattr(model, "decode"):
        raise ValueError(f"expected a sam.Sam or sam.Sam2 model, got {type(model).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {os.fspath(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    encoder_path = export_encoder(model, out / ENCODER_NAME, opset) if encoder else None
    decoder_path = export_decoder(model, out / DECODER_NAME, opset, single_mask, exact_upscale) if decoder else None
    quantized = quantize_decoder(decoder_path, out / QUANTIZED_DECODER_NAME) if quantize else None
    files = {
        "encoder": ENCODER_NAME if encoder else None,
        "decoder": DECODER_NAME if decoder else None,
        "quantized_decoder": QUANTIZED_DECODER_NAME if quantize else None,
    }
    manifest = _manifest(model, opset, single_mask, files)
    manifest["exact_upscale"] = bool(exact_upscale)
    partial = out / (MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(partial, out / MANIFEST_NAME)
    result = OnnxExport(out, encoder_path, decoder_path, quantized, manifest)
    if verify:
        result.max_abs_error = _verify(model, result)
        logger.info("onnxruntime vs PyTorch, largest absolute differences: %s", result.max_abs_error)
    return result


def _verify(model: nn.Module, export: OnnxExport) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| per output on a synthetic image and prompts."""
    import onnxruntime as ort

    clone = _exportable_copy(model)
    family = getattr(clone, "family", "sam1")
    names = _io_names(family)
    errors: dict[str, float] = {}
    with torch.no_grad():
        image = _example_image(clone)
        features = EncoderGraph(clone)(image)
        if export.encoder is not None:
            session = ort.InferenceSession(str(export.encoder), providers=["CPUExecutionProvider"])
            outputs = session.run(None, {"image": image.numpy()})
            for name, ours, theirs in zip(names["features"], outputs, features):
                errors[name] = float(np.abs(ours - theirs.numpy()).max())
        if export.decoder is not None:
            prompts = _example_prompts(clone, features)
            expected = DecoderGraph(clone, export.manifest["single_mask"], exact_upscale=True)(*prompts)
            session = ort.InferenceSession(str(export.decoder), providers=["CPUExecutionProvider"])
            feed = {name: value.numpy() for name, value in zip(names["decoder_inputs"], prompts)}
            for name, ours, theirs in zip(names["decoder_outputs"], session.run(None, feed), expected):
                errors[name] = float(np.abs(ours - theirs.numpy()).max())
    return errors


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The `sam_onnx.json` of an export folder, checked."""
    folder = Path(directory)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ValueError(f"{os.fspath(folder)!r} is not a folder; pass the --out folder of 'langsam export onnx'")
    if not path.is_file():
        raise ValueError(f"{os.fspath(folder)!r} has no {MANIFEST_NAME}: not a folder written by 'langsam export onnx'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {os.fspath(path)!r}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a manifest of format {MANIFEST_FORMAT}; export the model again")
    return manifest
