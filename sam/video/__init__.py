"""SAM 2.1 (and SAM 3 tracker) video tracking with streamed frames.

    from sam.video import SamVideoPredictor, open_frames
    predictor = SamVideoPredictor(build_sam("sam2.1_hiera_tiny", "sam2.1_hiera_tiny.pt"))
    state = predictor.init_state("clip.mp4")
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[210, 350]], labels=[1])
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(state):
        ...  # mask_logits: (num_objects, 1, H, W); > 0 is the object

SAM 3's tracker runs on the same predictor: `SamVideoPredictor.from_sam3("sam3.pt")`. SAM 3's own
video concept inference (every instance of a text prompt, detected on every frame):
`Sam3ConceptVideoPredictor.from_checkpoint("sam3.pt")` (`sam.video.concept`).
"""

from .concept import ConceptFrame, ConceptTrackingConfig, Sam3ConceptVideoPredictor
from .frames import FrameSource, VideoLoadError, open_frames
from .predictor import SamVideoPredictor
from .state import FrameMemory, ObjectTrack, VideoState

__all__ = [
    "ConceptFrame",
    "ConceptTrackingConfig",
    "FrameMemory",
    "FrameSource",
    "ObjectTrack",
    "Sam3ConceptVideoPredictor",
    "SamVideoPredictor",
    "VideoLoadError",
    "VideoState",
    "open_frames",
]
