"""Export SAM models to other runtimes, and run them there.

* `sam.export.onnx` - the export: graph wrappers, `export_onnx`, int8 quantisation, the manifest;
* `sam.export.runtime` - `OnnxSamPredictor`, a `SamPredictor` on onnxruntime sessions.

Nothing here is imported by `sam` itself; onnx and onnxruntime load only when an export or a
session needs them (the optional extra `langsam[export]`)."""

from .onnx import (
    DECODER_NAME,
    ENCODER_NAME,
    MANIFEST_NAME,
    QUANTIZED_DECODER_NAME,
    OnnxExport,
    export_decoder,
    export_encoder,
    export_onnx,
    quantize_decoder,
    read_manifest,
)
from .runtime import OnnxSamPredictor

__all__ = [
    "DECODER_NAME",
    "ENCODER_NAME",
    "MANIFEST_NAME",
    "QUANTIZED_DECODER_NAME",
    "OnnxExport",
    "OnnxSamPredictor",
    "export_decoder",
    "export_encoder",
    "export_onnx",
    "quantize_decoder",
    "read_manifest",
]
