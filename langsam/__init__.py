"""langsam: text-prompted image segmentation (Grounding DINO boxes -> Segment Anything masks,
or SAM 3 alone with ``LangSAM(model="sam3")``).

    import langsam
    result = langsam.segment("dog.jpg", "a dog. a ball.")
    result.overlay().save("overlay.jpg")

Importing this package loads no model and imports neither torch models, transformers,
open_clip nor gradio; those load on first use.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Detections",
    "GroundingDinoDetector",
    "ImageLoadError",
    "LangSAM",
    "Segmentation",
    "load_image",
    "segment",
    "__version__",
]

# name -> submodule that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "LangSAM": "langsam.pipeline",
    "Segmentation": "langsam.result",
    "GroundingDinoDetector": "langsam.detector",
    "Detections": "langsam.detector",
    "ImageLoadError": "langsam.io",
    "load_image": "langsam.io",
}

if TYPE_CHECKING:  # pragma: no cover
    from langsam.detector import Detections, GroundingDinoDetector
    from langsam.io import ImageLoadError, load_image
    from langsam.pipeline import LangSAM
    from langsam.result import Segmentation

_default_pipeline = None
_default_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'langsam' has no attribute {name!r}")


def segment(image: Any, text: str | list[str], **kwargs: Any) -> "Segmentation":
    """Segment ``text`` in ``image`` with a default :class:`LangSAM` built (once) on first call.

    Keyword arguments go to :meth:`LangSAM.segment` (``box_threshold``, ``text_threshold``,
    ``mode``, ``multimask`` ...). Build your own ``LangSAM(...)`` to choose models or device.
    """
    global _default_pipeline
    with _default_lock:
        if _default_pipeline is None:
            from langsam.pipeline import LangSAM

            _default_pipeline = LangSAM()
        pipeline = _default_pipeline
    return pipeline.segment(image, text, **kwargs)
