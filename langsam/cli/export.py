"""``langsam export onnx``: write SAM's image encoder and prompt encoder + mask decoder as ONNX
(:mod:`sam.export.onnx`), for onnxruntime and other ONNX runtimes; with ``--sam-type sam3``, SAM 3's
image encoder, text encoder and text/exemplar-prompt heads (:mod:`sam.export.sam3`).

onnx and onnxruntime are an optional extra: imported only when the command runs, and a missing
install is one clear message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from langsam.cli.options import (
    EXIT_FAILURES,
    EXIT_OK,
    ModelLoadError,
    UsageError,
    add_sam_type_argument,
    env_default,
    number,
    validate_model_arguments,
)

NAME = "export"
FORMATS = ("onnx",)

EPILOG = """\
outputs (under --out):
  encoder.onnx       image -> image embedding (SAM 2: + two high-resolution feature maps);
                     normalisation (and SAM 1's padding) inside the graph
  decoder.onnx       embedding + points (dynamic count, box corners labelled 2 and 3) + mask
                     prompt + orig_im_size -> masks at the original size, IoU scores, low-res
                     masks
  decoder.int8.onnx  with --quantize: the decoder with 8-bit weights
  sam_onnx.json      what a runtime needs: model family, sizes, input and output names

with --sam-type sam3 (SAM 3's concept model; --checkpoint: Meta's sam3.pt or a transformers folder):
  image_encoder.onnx  pixels (1, 3, 1008, 1008) in [-1, 1] -> the backbone feature levels
  text_encoder.onnx   token ids (B, 32) -> text features and their valid mask (not with --no-text-encoder)
  heads.onnx          features + text + exemplar boxes -> query logits, presence, boxes, mask logits
  sam3_onnx.json      the config, file and tensor names
  (--encoder-only: the two encoders; --decoder-only: the heads)

Run them from Python with sam.export.OnnxSamPredictor(OUT), which has SamPredictor's API
(SAM 3: sam.export.OnnxSam3Predictor(OUT), with Sam3Predictor's API).
exit status: 0 written (and checked), 1 export or model failure, 2 usage error.

examples:
  langsam export onnx --sam-type vit_b --out sam_vit_b_onnx/
  langsam export onnx --sam-checkpoint my_finetune.pth --out onnx/ --quantize
  langsam export onnx --sam-type sam2.1_hiera_tiny --out sam21_tiny_onnx/ --single-mask
  langsam export onnx --sam-type sam3 --checkpoint sam3.pt --out sam3_onnx/
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam export`` (format ``onnx``) and its options."""
    parser = commands.add_parser(
        NAME, help="export SAM to ONNX (encoder, decoder, optional int8 decoder)",
        description="Export a SAM model (SAM 1, SAM 2 / 2.1, or SAM 3's concept model) for other runtimes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=FORMATS, help="export format (onnx)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if needed)")
    model = parser.add_argument_group("model options")
    add_sam_type_argument(model, "--sam-type", "--model-type", default_text="auto with --sam-checkpoint, else vit_b")
    model.add_argument("--sam-checkpoint", "--checkpoint", dest="sam_checkpoint", metavar="PATH",
                       default=env_default("sam_checkpoint"),
                       help="local SAM checkpoint (SAM 3: Meta's sam3.pt or a transformers save_pretrained "
                            "folder); default: the official weights for --sam-type, downloaded once "
                            "[LANGSAM_SAM_CHECKPOINT]")
    graph = parser.add_argument_group("graphs")
    graph.add_argument("--opset", type=number(int, 17), default=17, metavar="N", help="ONNX opset, >= 17 (default 17)")
    graph.add_argument("--single-mask", action="store_true",
                       help="the decoder returns only the mask multimask_output=False gives (faster); default: "
                            "all four candidates")
    graph.add_argument("--fast-upscale", dest="exact_upscale", action="store_false",
                       help="upscale masks with onnxruntime's Resize: about 3x faster on that step, full-size "
                            "logits within ~5e-4 of PyTorch (default: sampled exactly as PyTorch, ~1e-5)")
    graph.add_argument("--quantize", action="store_true", help="also write decoder.int8.onnx (8-bit weights)")
    parts = graph.add_mutually_exclusive_group()
    parts.add_argument("--encoder-only", action="store_true", help="write only the encoder")
    parts.add_argument("--decoder-only", action="store_true", help="write only the decoder")
    graph.add_argument("--no-text-encoder", dest="text_encoder", action="store_false",
                       help="SAM 3: leave out text_encoder.onnx (the heads then take text features computed "
                            "elsewhere)")
    graph.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the check of the graphs against PyTorch with onnxruntime")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(handler=run, parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``langsam export onnx`` with parsed ``args``; returns the exit status."""
    if args.sam_type is None:
        args.sam_type = "auto" if args.sam_checkpoint is not None else "vit_b"
    sam3 = args.sam_type == SAM3_TYPE
    if sam3:
        _check_sam3_arguments(args)
    else:
        validate_model_arguments(args.parser, args)
        if not args.text_encoder and args.sam_type != "auto":
            raise UsageError("--no-text-encoder applies to SAM 3 (--sam-type sam3) only")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if args.quantize and args.encoder_only:
        raise UsageError("--quantize applies to the decoder; it cannot go with --encoder-only")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        print(f"langsam export: error: ONNX export needs onnx and onnxruntime ({error}); install them with: "
              "pip install 'langsam[export]'", file=sys.stderr)
        return EXIT_FAILURES

    model = _load_sam3(args) if sam3 else _load_model(args)
    if _is_sam3(model):  # also --sam-type auto with a sam3.pt
        return _export_sam3(args, model, out)
    if not args.text_encoder:
        raise UsageError("--no-text-encoder applies to SAM 3 only; this checkpoint is SAM 1 / SAM 2")
    from sam.export import export_onnx

    try:
        result = export_onnx(
            model, out, opset=args.opset, single_mask=args.single_mask, exact_upscale=args.exact_upscale,
            quantize=args.quantize,
            encoder=not args.decoder_only, decoder=not args.encoder_only, verify=args.verify,
        )
    except (ValueError, RuntimeError, OSError) as error:
        print(f"langsam export: error: the export failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURES
    if not args.quiet:
        _print_summary(result)
    return EXIT_OK


SAM3_TYPE = "sam3"
# SAM 1 / SAM 2 decoder options that SAM 3's heads do not have.
_NOT_SAM3 = {"single_mask": "--single-mask", "exact_upscale": "--fast-upscale", "quantize": "--quantize"}


def _reject_decoder_options(args: argparse.Namespace) -> None:
    for dest, flag in _NOT_SAM3.items():
        if getattr(args, dest) != args.parser.get_default(dest):
            raise UsageError(f"{flag} applies to SAM 1 / SAM 2's mask decoder, not to SAM 3's heads")


def _check_sam3_arguments(args: argparse.Namespace) -> None:
    _reject_decoder_options(args)
    if args.sam_checkpoint is not None and not Path(args.sam_checkpoint).exists():
        args.parser.error(f"SAM 3 checkpoint {args.sam_checkpoint!r} does not exist")
    if args.decoder_only and not args.text_encoder:
        raise UsageError("--decoder-only writes no text encoder; --no-text-encoder goes with a full or --encoder-only export")


def _is_sam3(model) -> bool:
    from sam.sam3 import Sam3Image

    return isinstance(model, Sam3Image)


def _load_sam3(args: argparse.Namespace):
    from sam.sam3 import load_sam3

    from langsam.weights import resolve_sam_checkpoint

    try:
        checkpoint = (Path(args.sam_checkpoint) if args.sam_checkpoint is not None
                      else resolve_sam_checkpoint(SAM3_TYPE, None))
        return load_sam3(checkpoint)
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"cannot load the SAM 3 model: {error}") from error


def _export_sam3(args: argparse.Namespace, model, out: Path) -> int:
    _reject_decoder_options(args)  # again for --sam-type auto, which finds SAM 3 in the file
    from sam.export import export_sam3_onnx

    try:
        result = export_sam3_onnx(
            model, out, opset=args.opset, image_encoder=not args.decoder_only,
            text_encoder=args.text_encoder and not args.decoder_only, heads=not args.encoder_only, verify=args.verify,
        )
    except (ValueError, RuntimeError, OSError) as error:
        print(f"langsam export: error: the export failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURES
    if not args.quiet:
        _print_summary(result, (result.image_encoder, result.text_encoder, result.heads))
    return EXIT_OK


def _load_model(args: argparse.Namespace):
    from sam import build_sam

    from langsam.weights import resolve_sam_checkpoint

    try:
        checkpoint = resolve_sam_checkpoint(args.sam_type, args.sam_checkpoint)
        return build_sam(args.sam_type, checkpoint=checkpoint)
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"cannot load the SAM model: {error}") from error


def _print_summary(result, paths=None) -> None:
    manifest = result.manifest
    print(f"exported {manifest.get('model_type') or manifest['family']} ({manifest['family']}, opset "
          f"{manifest['opset']}) to {result.directory}")
    if paths is None:
        paths = (result.encoder, result.decoder, result.quantized_decoder)
    for path in paths:
        if path is not None:
            size = sum(part.stat().st_size for part in path.parent.glob(path.name + "*"))  # with its .data file
            print(f"  {path.name:<18} {size / 2**20:8.1f} MiB")
    if result.max_abs_error:
        worst = ", ".join(f"{name} {error:.1e}" for name, error in result.max_abs_error.items())
        print(f"checked with onnxruntime, largest |ONNX - PyTorch|: {worst}")
