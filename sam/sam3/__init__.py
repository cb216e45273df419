"""SAM 3 (Meta, 2025) concept segmentation: every instance of a noun phrase and/or exemplar boxes.

Checkpoint-exact with Meta's `sam3.pt` image model (the detector); written for this package.

- `layers.py`    attention with nn.MultiheadAttention names, MLP, sine positions, box ops
- `backbone.py`  Perception Encoder ViT (windowed + global attention, 2D RoPE) and the FPN neck
- `text.py`      CLIP text encoder + open_clip's BPE tokenizer
- `geometry.py`  the exemplar (box) encoder; its cls token always joins the prompt
- `detr.py`      fusion encoder and query decoder (presence token, box refinement, box RPB)
- `heads.py`     dot-product scoring and the segmentation head
- `model.py`     Sam3Config, Sam3Image: encode_image / encode_text / decode
- `build.py`     build_sam3 / load_sam3 for Meta's and transformers' layouts, converters
- `predictor.py` Sam3Predictor: set_image once, predict(text=..., exemplars=...) many times
- `interactive.py` Sam3Interactive (second neck + SAM 2.1 heads, Meta's `tracker.sam_*`) and
  Sam3InteractivePredictor: SamPredictor's point / box / mask prompts on the same image pass
- `tracker.py`   Sam3Tracker: SAM 2.1's video tracker on SAM 3's ViT (Meta's `tracker.*`, transformers'
  `Sam3TrackerVideoModel`), run by `sam.video.SamVideoPredictor`; load_sam3_tracker

Where the two references differ, this follows Meta: a text-only prompt still runs the geometry
encoder (transformers' `Sam3Model` skips it unless given a box; pass one padded box, label -10, to
make it match), masks are resized as logits before the sigmoid, and the default threshold is 0.5.
"""

from .build import build_sam3, load_sam3, load_sam3_interactive, load_sam3_interactive_predictor
from .interactive import Sam3Interactive, Sam3InteractivePredictor
from .model import ImageFeatures, ImageTerms, Sam3Config, Sam3Image
from .predictor import Sam3Prediction, Sam3Predictor
from .tracker import Sam3Tracker, load_sam3_tracker

__all__ = [
    "ImageFeatures", "ImageTerms", "Sam3Config", "Sam3Image", "Sam3Interactive", "Sam3InteractivePredictor", "Sam3Prediction",
    "Sam3Predictor", "Sam3Tracker", "build_sam3", "load_sam3", "load_sam3_interactive", "load_sam3_interactive_predictor",
    "load_sam3_tracker",
]
