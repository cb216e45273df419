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

import importlib

# Every public name is imported on first use (PEP 562), so ``import sam.files`` (which the light
# ``langsam.cli`` uses) loads no torch, and the generator's pycocotools and the video's PyAV load
# only when asked for.
_EXPORTS = {
    **dict.fromkeys(("MODEL_SPECS", "SAM2_SPECS", "SAM_SPECS", "Sam2Spec", "CheckpointError", "SamSpec",
                     "build_sam", "load_state_dict_file", "sam_model_registry", "save_checkpoint"), "build"),
    "to_rgb_uint8": "image",
    "Sam": "sam1",
    "Sam2": "sam2",
    "ImageNotSetError": "predictor",
    "SamPredictor": "predictor",
    **dict.fromkeys(("ResizeLongestSide", "ResizeSquare", "transform_for"), "transforms"),
    **dict.fromkeys(("SamAutomaticMaskGenerator", "Sam2AutomaticMaskGenerator", "make_mask_generator"),
                    "automatic_mask_generator"),
    "SamVideoPredictor": "video",
}

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
    "make_mask_generator",
    "SamAutomaticMaskGenerator",
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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
