"""Export SAM models to other runtimes, and run them there.

* `sam.export.onnx` - the export: graph wrappers, `export_onnx`, int8 quantisation, the manifest;
* `sam.export.runtime` - `OnnxSamPredictor`, a `SamPredictor` on onnxruntime sessions;
* `sam.export.sam3` - SAM 3's image encoder, text encoder and prompt heads, `export_sam3_onnx`;
* `sam.export.runtime_sam3` - `OnnxSam3Predictor`, a `Sam3Predictor` on onnxruntime sessions.

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
from .runtime_sam3 import OnnxSam3Predictor
from .sam3 import SAM3_MANIFEST_NAME, Sam3OnnxExport, export_sam3_onnx, read_sam3_manifest

__all__ = [
    "DECODER_NAME",
    "ENCODER_NAME",
    "MANIFEST_NAME",
    "QUANTIZED_DECODER_NAME",
    "OnnxExport",
    "OnnxSam3Predictor",
    "OnnxSamPredictor",
    "SAM3_MANIFEST_NAME",
    "Sam3OnnxExport",
    "export_decoder",
    "export_encoder",
    "export_onnx",
    "export_sam3_onnx",
    "quantize_decoder",
    "read_manifest",
    "read_sam3_manifest",
]
