"""What every ``langsam`` command and the demo's launcher share.

* the model options (``--model``, ``--sam3-checkpoint``, ``--sam-type``, ``--sam-checkpoint``,
  ``--detector``, ``--detector-size``, ``--clip-model``, ``--clip-pretrained``, ``--device``), the ``LANGSAM_*`` environment variables
  that set their defaults, their validation, and building a :class:`~langsam.pipeline.LangSAM`
  from them;
* the mask-generator options (one flag per ``SamAutomaticMaskGenerator`` parameter), used by
  ``langsam auto-masks`` and by ``langsam segment --mode clip``;
* the cluster options (``--ray [ADDRESS]``, ``--workers``, ``--gpus-per-worker``,
  ``--cpus-per-worker``, ``--batch-size``) of the batch commands, which run on Ray Data
  (:mod:`langsam.distributed`) when ``--ray`` is given;
* small argument parsers, the exit statuses and the two errors every command may raise.

Importing this module imports nothing heavy: the SAM registry (and with it torch) is read only
when a ``--sam-type`` value is checked or ``--help`` lists the types, and ``LangSAM`` only when
the models are built. ``langsam.demo`` imports this module for its own ``main``; nothing here
imports the demo or a command module.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "AMG_OPTIONS",
    "EXIT_FAILURES",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "MODEL_ENVIRONMENT",
    "ModelLoadError",
    "RAY_ONLY_OPTIONS",
    "UsageError",
    "add_device_argument",
    "add_generator_arguments",
    "add_model_arguments",
    "add_ray_arguments",
    "add_sam_type_argument",
    "env_default",
    "exemplar",
    "exit_status",
    "fraction",
    "generator_flag",
    "generator_params_from_args",
    "load_pipeline",
    "model_kwargs_from_args",
    "number",
    "ray_address",
    "ray_options_from_args",
    "sam_types",
    "validate_model_arguments",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Stopped by SIGTERM (128 + 15, the shell's convention), e.g. by ``kill``, ``docker stop`` or systemd.
EXIT_TERMINATED = 143

#: Smallest ``--detector-size``: below this Grounding DINO's last feature map is a few pixels.
MIN_DETECTOR_SIZE = 64

_DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
#: ``--ray`` values: a new local cluster, the running one, or a head node's address.
_RAY_ADDRESS_PATTERN = re.compile(r"^(local|auto|ray://\S+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")

#: argparse ``dest`` of each model option -> the environment variable that sets its default.
#: These are also the ``LangSAM(...)`` keyword names, and the settings ``langsam.demo.build_app``
#: accepts, so one ``export`` configures every command and the demo.
MODEL_ENVIRONMENT = {
    "model": "LANGSAM_MODEL",
    "sam3_checkpoint": "LANGSAM_SAM3_CHECKPOINT",
    "sam_type": "LANGSAM_SAM_TYPE",
    "sam_checkpoint": "LANGSAM_SAM_CHECKPOINT",
    "detector": "LANGSAM_DETECTOR",
    "detector_size": "LANGSAM_DETECTOR_SIZE",
    "clip_model": "LANGSAM_CLIP_MODEL",
    "clip_pretrained": "LANGSAM_CLIP_PRETRAINED",
    "device": "LANGSAM_DEVICE",
}


def exit_status(exit_: SystemExit) -> int:
    """The exit status a ``SystemExit`` from argparse (``--help``, a usage error) stands for."""
    if exit_.code is None:
        return EXIT_OK
    return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


class UsageError(ValueError):
    """A command-line mistake found before any model loads (exit status 2)."""


class ModelLoadError(Exception):
    """A model could not be built or loaded (exit status 1, the run stops)."""


# ============================================================================================
# Small parsers (argparse ``type=`` functions)
# ============================================================================================


def choice_list(allowed: tuple[str, ...], what: str):
    """An argparse type for a comma-separated list of `allowed` words (lower-cased, duplicates
    dropped, order kept); `what` names them in the error."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(item.strip().lower() for item in text.split(",") if item.strip()))
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(empty)'}; "
                                             f"choose from {','.join(allowed)}")
        return items

    parse.__name__ = what
    return parse


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def number(kind: Callable[[str], Any], minimum: float) -> Callable[[str], Any]:
    """A parser for an ``int`` or ``float`` of at least ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# ============================================================================================
# Model options
# ============================================================================================


def output_list(choices: Sequence[str]) -> Callable[[str], frozenset[str]]:
    """An argparse type for ``--save a,b`` (or ``all``): the chosen names of ``choices``."""

    def parse(text: str) -> frozenset[str]:
        items = {item.strip().lower() for item in text.split(",") if item.strip()}
        if "all" in items:
            return frozenset(choices)
        unknown = sorted(items - set(choices))
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown output {', '.join(unknown) or '(empty)'}; choose from {','.join(choices)} or all"
            )
        return frozenset(items)

    return parse


def sam_types() -> list[str]:
    """The valid ``--sam-type`` values, read from SAM's registry (``sam.build``; imports torch)."""
    from sam.build import valid_model_types

    return list(valid_model_types())


def env_default(dest: str) -> str | None:
    """The value of ``dest``'s ``LANGSAM_*`` variable (see :data:`MODEL_ENVIRONMENT`), None if unset or blank."""
    value = os.environ.get(MODEL_ENVIRONMENT[dest], "").strip()
    return value or None


class _RegistryTypes:
    """The registry's SAM types as text, read only when turned into a string (help output)."""

    def __str__(self) -> str:
        return ", ".join(sam_types())


class _SamTypeAction(argparse.Action):
    """Stores ``--sam-type``. Its help names ``%(sam_types)s``, which reads the registry only when
    the help text is formatted, so parsing and usage errors never wait for torch to import.
    (Python 3.14 formats every help string once when the option is added.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sam_types = _RegistryTypes()

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_sam_type_argument(group: Any, *flags: str, default_text: str) -> None:
    """Add the SAM type option (``flags``, e.g. ``"--sam-type"``) to ``group``; its default comes
    from ``LANGSAM_SAM_TYPE``. Check the value with :func:`validate_model_arguments`."""
    group.add_argument(*flags, dest="sam_type", metavar="TYPE", action=_SamTypeAction,
                       default=env_default("sam_type"),
                       help="SAM model type from the registry: %(sam_types)s ('auto' infers the size from "
                            f"the checkpoint); default {default_text} [LANGSAM_SAM_TYPE]")


def add_model_arguments(parser: argparse.ArgumentParser, *, sam: bool = True, detector: bool = True,
                        clip: bool = True, concept: bool = True) -> argparse._ArgumentGroup:
    """Add the model options shared by ``langsam segment`` and ``langsam demo`` to ``parser``.

    Each option's default comes from the environment variable in :data:`MODEL_ENVIRONMENT`
    (read when this function runs), else from :class:`langsam.LangSAM`'s own default, so
    an unset option is simply not passed on. Call :func:`validate_model_arguments` after
    parsing and :func:`model_kwargs_from_args` to get ``LangSAM(**kwargs)`` keywords.
    ``concept``: also ``--model`` and ``--sam3-checkpoint`` (with ``detector``), for the commands
    that can run SAM 3 as the concept model.
    """
    group = parser.add_argument_group(
        "model options", "each option also reads the environment variable named in its help"
    )
    if detector and concept:
        group.add_argument("--model", dest="model", metavar="MODEL", default=env_default("model"),
                           help="the concept model: grounding-dino (Grounding DINO boxes -> SAM masks) or sam3 "
                                "(SAM 3 finds and masks every instance itself; takes --exemplar boxes); default "
                                "grounding-dino [LANGSAM_MODEL]")
        group.add_argument("--sam3-checkpoint", dest="sam3_checkpoint", metavar="PATH",
                           default=env_default("sam3_checkpoint"),
                           help="SAM 3 weights for --model sam3: Meta's sam3.pt or a transformers save_pretrained "
                                "folder; default: the registry's 'sam3' download [LANGSAM_SAM3_CHECKPOINT]")
    if sam:
        add_sam_type_argument(group, "--sam-type", default_text="sam2.1_hiera_small")
        group.add_argument("--sam-checkpoint", dest="sam_checkpoint", metavar="PATH",
                           default=env_default("sam_checkpoint"),
                           help="local SAM checkpoint (official .pth or .safetensors); default: the official "
                                "weights for --sam-type, downloaded once to the cache [LANGSAM_SAM_CHECKPOINT]")
    if detector:
        group.add_argument("--detector", dest="detector", metavar="ID_OR_DIR", default=env_default("detector"),
                           help="Grounding DINO: a Hugging Face hub id or a save_pretrained folder; default "
                                "IDEA-Research/grounding-dino-tiny [LANGSAM_DETECTOR]")
        # A string default (from the environment) goes through `type` too, so it is checked the same way.
        group.add_argument("--detector-size", dest="detector_size", metavar="N",
                           type=number(int, MIN_DETECTOR_SIZE), default=env_default("detector_size"),
                           help=f"longest image side, in pixels, fed to Grounding DINO (at least "
                                f"{MIN_DETECTOR_SIZE}): smaller is faster, larger finds smaller objects; default: "
                                "the released preprocessing [LANGSAM_DETECTOR_SIZE]")
    if clip:
        group.add_argument("--clip-model", dest="clip_model", metavar="NAME", default=env_default("clip_model"),
                           help="open_clip architecture for --mode clip/hybrid; default ViT-B-32 [LANGSAM_CLIP_MODEL]")
        group.add_argument("--clip-pretrained", dest="clip_pretrained", metavar="TAG_OR_PATH",
                           default=env_default("clip_pretrained"),
                           help="open_clip pretrained tag or a local weights file; default laion2b_s34b_b79k "
                                "[LANGSAM_CLIP_PRETRAINED]")
    add_device_argument(group)
    return group


def add_device_argument(group: Any) -> None:
    group.add_argument("--device", dest="device", metavar="DEVICE", default=env_default("device"),
                       help="cpu, cuda, cuda:N or mps; default: cuda, else mps, else cpu [LANGSAM_DEVICE]")


def validate_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the model options (also the ones that came from the environment) without loading
    anything; a mistake ends in ``parser.error`` (exit status 2)."""
    sam_type = getattr(args, "sam_type", None)
    if sam_type is not None:
        valid = sam_types()
        if sam_type not in valid:
            parser.error(f"unknown SAM type {sam_type!r}; choose one of {', '.join(valid)}")
    checkpoint = getattr(args, "sam_checkpoint", None)
    if checkpoint is not None and not Path(checkpoint).is_file():
        parser.error(f"SAM checkpoint {checkpoint!r} is not a file")
    if sam_type == "auto" and checkpoint is None:
        parser.error("SAM type 'auto' infers the model size from a checkpoint: pass --sam-checkpoint PATH")
    model = getattr(args, "model", None)
    from langsam.pipeline import CONCEPT_MODELS  # no torch: numpy and PIL only

    if model is not None and model not in CONCEPT_MODELS:
        parser.error(f"unknown --model {model!r}; choose one of {', '.join(CONCEPT_MODELS)}")
    sam3_checkpoint = getattr(args, "sam3_checkpoint", None)
    if sam3_checkpoint is not None and not Path(sam3_checkpoint).exists():
        parser.error(f"SAM 3 checkpoint {sam3_checkpoint!r} does not exist")
    device = getattr(args, "device", None)
    if device is not None and not _DEVICE_PATTERN.match(device):
        parser.error(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")


def model_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``LangSAM(...)`` from parsed model options; unset ones are left out
    so the pipeline's defaults apply."""
    kwargs = {}
    for dest in MODEL_ENVIRONMENT:
        value = getattr(args, dest, None)
        if value is not None:
            kwargs[dest] = value
    return kwargs


def load_pipeline(args: argparse.Namespace, mode: str) -> Any:
    """Build ``LangSAM`` from the model options and load every model ``mode`` needs now, so a
    missing or broken model stops the run once, with one clear message (:class:`ModelLoadError`),
    instead of failing image after image. ``mode``: ``grounded``, ``hybrid``, ``clip``, or
    anything else for SAM alone."""
    from langsam.pipeline import LangSAM

    try:
        pipeline = LangSAM(**model_kwargs_from_args(args))
        if hasattr(pipeline, "load_models"):
            pipeline.load_models(mode)
        else:  # a stand-in pipeline (tests) with the two models only
            pipeline.predictor
            if mode in ("grounded", "hybrid"):
                pipeline.detector.load()
    except (ValueError, RuntimeError, OSError, ImportError) as error:
        raise ModelLoadError(f"cannot load the models: {error}") from error
    return pipeline


def exemplar(text: str) -> tuple[tuple[float, float, float, float], bool]:
    """An ``--exemplar`` value: ``x0,y0,x1,y1`` (pixels) for a positive box, ``x0,y0,x1,y1:neg``
    for a negative one (``:pos`` is accepted too)."""
    coords, _, sign = text.partition(":")
    sign = sign.strip().lower() or "pos"
    try:
        values = tuple(float(v) for v in coords.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or sign not in ("pos", "neg") or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 in pixels, optionally followed by :neg, got {text!r}")
    if values[2] <= values[0] or values[3] <= values[1]:
        raise argparse.ArgumentTypeError(f"exemplar box {text!r} is empty: needs x1 > x0 and y1 > y0")
    return values, sign == "pos"


# ============================================================================================
# Mask-generator options (langsam auto-masks, langsam segment --mode clip)
# ============================================================================================

#: (parameter, type, help) for every SamAutomaticMaskGenerator parameter the commands expose.
#: The flag is the parameter with dashes (``--points-per-side``).
AMG_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("points_per_side", number(int, 1), "points sampled along one side of the image (default 32)"),
    ("points_per_batch", number(int, 1), "points run through the model at once; more is faster, needs more memory "
                                         "(default 64)"),
    ("pred_iou_thresh", number(float, 0.0), "keep masks whose predicted IoU is above this (default 0.88)"),
    ("stability_score_thresh", number(float, 0.0), "keep masks whose stability score is above this (default 0.95)"),
    ("stability_score_offset", number(float, 0.0), "logit offset used for the stability score (default 1.0)"),
    ("box_nms_thresh", fraction, "box IoU above which duplicate masks are removed (default 0.7)"),
    ("crop_n_layers", number(int, 0), "extra layers of image crops to run on (default 0)"),
    ("crop_nms_thresh", fraction, "box IoU for removing duplicates between crops (default 0.7)"),
    ("crop_overlap_ratio", fraction, "overlap of neighbouring crops, as a fraction of the crop (default 512/1500)"),
    ("crop_n_points_downscale_factor", number(int, 1),
     "points per side are divided by this in each crop layer (default 1)"),
    ("min_mask_region_area", number(int, 0), "remove holes and islands smaller than this many pixels (default 0)"),
)


def generator_flag(name: str) -> str:
    """``points_per_side`` -> ``--points-per-side``."""
    return "--" + name.replace("_", "-")


def add_generator_arguments(parser: argparse.ArgumentParser, title: str,
                            description: str | None = None) -> argparse._ArgumentGroup:
    """Add one flag per :data:`AMG_OPTIONS` entry (default None: the generator's own default)."""
    group = parser.add_argument_group(title, description)
    for name, kind, text in AMG_OPTIONS:
        group.add_argument(generator_flag(name), dest=name, type=kind, default=None, metavar="X", help=text)
    return group


def generator_params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``SamAutomaticMaskGenerator`` keyword arguments of the flags the user set (in
    :data:`AMG_OPTIONS` order); unset ones are left out so the generator's defaults apply."""
    return {name: getattr(args, name) for name, _, _ in AMG_OPTIONS if getattr(args, name, None) is not None}


# ============================================================================================
# Cluster options (langsam segment / auto-masks --ray)
# ============================================================================================


def ray_address(text: str) -> str:
    """A ``--ray`` value: ``local``, ``auto``, ``ray://HOST:PORT`` or ``HOST:PORT``.

    ``--ray`` takes an optional value, so ``--ray photos/`` would swallow an input; anything
    that is not an address is refused with a hint instead of being mistaken for one."""
    if not _RAY_ADDRESS_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"expected local, auto, ray://HOST:PORT or HOST:PORT, got {text!r} (to start a local cluster "
            "put --ray after the inputs, or write --ray local)")
    return text


#: What ``--batch-size`` means for the image commands, whose local runs decode images ahead.
BATCH_HELP = ("locally: images decoded ahead in a background thread while the models run; with --ray: images per "
              "call of a worker (default 1)")


def add_ray_arguments(parser: argparse.ArgumentParser, *, batch_help: str = BATCH_HELP) -> argparse._ArgumentGroup:
    """Add ``--ray [ADDRESS]``, ``--workers``, ``--gpus-per-worker``, ``--cpus-per-worker`` and
    ``--batch-size`` (which also means something locally: ``batch_help``) to ``parser``."""
    group = parser.add_argument_group(
        "cluster (Ray Data; needs pip install \"langsam[distributed]\")",
        "every other option means the same on a cluster as locally, and the outputs are the same files")
    group.add_argument("--ray", nargs="?", const="local", default=None, type=ray_address, metavar="ADDRESS",
                       help="run on a Ray cluster: no ADDRESS (or 'local') starts one on this machine, 'auto' "
                            "joins the running one (RAY_ADDRESS or 'ray start'), ray://HOST:PORT a remote head. "
                            "Inputs may then also be URIs pyarrow reads (s3://, gs://, hdfs://)")
    group.add_argument("--workers", type=number(int, 1), default=None, metavar="N",
                       help="model replicas (Ray actors), each loads the models once (default: as many as the "
                            "cluster's GPUs, or its CPUs less one, allow)")
    group.add_argument("--gpus-per-worker", type=number(float, 0.0), default=None, metavar="G",
                       help="GPUs per worker, fractions share a GPU (default 1 if the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-worker", type=number(float, 0.0), default=None, metavar="C",
                       help="CPUs per worker; also its torch threads (default 1)")
    group.add_argument("--batch-size", type=number(int, 1), default=1, metavar="N", help=batch_help)
    group.add_argument("--ray-max-retries", type=number(int, 0), default=None, metavar="N",
                       help="times an image is tried again after its worker process died during it (a crash, "
                            "an out-of-memory kill, a lost node) before it is reported as failed (default 2)")
    return group


#: The cluster-only flags: given without --ray they would be silently ignored, so they are refused.
RAY_ONLY_OPTIONS = ("workers", "gpus_per_worker", "cpus_per_worker", "ray_max_retries")


def ray_options_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """``{"address", "workers", "gpus_per_worker", "cpus_per_worker", "batch_size", "max_retries"}``
    for a ``--ray`` run (None values: the cluster, or the default, decides), or None for a local run. Raises
    :class:`UsageError` for a cluster-only flag without ``--ray``."""
    if getattr(args, "ray", None) is None:
        given = [generator_flag(name) for name in RAY_ONLY_OPTIONS if getattr(args, name, None) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: cluster options need --ray [ADDRESS]")
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # before any folder is made or model loaded
        raise UsageError('--ray needs Ray Data, which is not installed: pip install "langsam[distributed]"')
    return {"address": args.ray, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
            "cpus_per_worker": args.cpus_per_worker, "batch_size": args.batch_size,
            "max_retries": getattr(args, "ray_max_retries", None)}
