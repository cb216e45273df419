"""Segment Anything: checkpoint-exact implementations of Meta's SAM (ViT-B/L/H) and SAM 2 / 2.1 (Hiera).

Layout, one place per capability:

* `build` - THE registry table (name -> family, architecture, URL, SHA-256, size), `build_sam`;
  `checkpoint` - safe checkpoint reading;
* `modeling` - the blocks every family shares (prompt encoder, two-way transformer, the one
  mask decoder);
* one package per model family: `sam1` (ViT encoder, `Sam`), `sam2` (Hiera, neck, memory,
  `Sam2`), `sam3` (SAM 3's image model);
* `video` - frame sources, tracking state and the trackers (SAM 2.1's; SAM 3's joins it);
* `transforms`, `image`, `predictor` (`SamPredictor`, both families), `automatic_mask_generator`
  + `amg_utils`, `training`, `evaluation`, `export` (ONNX export apart from its runtime).

Nothing here imports `langsam`.
"""

from .build import (
    MODEL_SPECS,
    SAM2_SPECS,
    SAM_SPECS,
    Sam2Spec,
    CheckpointError,
    SamSpec,
    build_sam,
    load_state_dict_file,
    sam_model_registry,
    save_checkpoint,
)
from .image import to_rgb_uint8
from .sam1 import Sam
from .sam2 import Sam2
from .predictor import ImageNotSetError, SamPredictor
from .transforms import ResizeLongestSide, ResizeSquare, transform_for

__all__ = [
    "MODEL_SPECS",
    "SAM2_SPECS",
    "SAM_SPECS",
    "ResizeSquare",
    "Sam2",
    "Sam2Spec",
    "transform_for",
    "CheckpointError",
    "ImageNotSetError",
    "ResizeLongestSide",
    "Sam",
    "Sam2AutomaticMaskGenerator",
    "SamAutomaticMaskGenerator",
    "make_mask_generator",
    "SamPredictor",
    "SamSpec",
    "SamVideoPredictor",
    "build_sam",
    "load_state_dict_file",
    "sam_model_registry",
    "save_checkpoint",
    "to_rgb_uint8",
]


def __getattr__(name: str):
    # The generator pulls in pycocotools; import it only when asked for.
    if name in ("SamAutomaticMaskGenerator", "Sam2AutomaticMaskGenerator", "make_mask_generator"):
        from . import automatic_mask_generator

        return getattr(automatic_mask_generator, name)
    if name == "SamVideoPredictor":  # video frames need PyAV; import it only when asked for
        from .video import SamVideoPredictor

        return SamVideoPredictor
    raise AttributeError(f"module 'sam' has no attribute {name!r}")
