"""Export SAM models to other runtimes: `sam.export.onnx` (ONNX graphs and an onnxruntime
`SamPredictor`). Nothing here is imported by `sam` itself; onnx and onnxruntime load only when
an export or a session needs them (the optional extra `langsam[export]`)."""

from .onnx import (
    DECODER_NAME,
    ENCODER_NAME,
    MANIFEST_NAME,
    QUANTIZED_DECODER_NAME,
    OnnxExport,
    OnnxSamPredictor,
    export_decoder,
    export_encoder,
    export_onnx,
    quantize_decoder,
    read_manifest,
)

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
