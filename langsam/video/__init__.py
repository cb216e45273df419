"""Text-prompted video tracking: what the text names, followed through a video with stable ids.

    from langsam.video import track_video
    video = track_video(pipeline, "street.mp4", "a car. a person", detect_every=10)
    for frame in video: ...                       # TrackedFrame: frame_index, obj_ids, segmentation
    video.save("out/street", ("json", "overlay", "masks"))

What is where (a tracker for another model, e.g. SAM 3, adds its own module next to
``tracker.py`` and shares the other three):

* ``tracker.py``: :func:`track_video` and :class:`TrackedVideo` on SAM 2.1's video predictor,
  with the rules that start, keep and end objects (detect every N frames, IoU association,
  lost-object timeout; ``box_iou`` / ``mask_iou``).
* ``results.py``: what every tracker yields: :class:`TrackedFrame` per frame (a
  :class:`~langsam.result.Segmentation` plus object ids) and :class:`TrackInfo` per object.
* ``writers.py``: :func:`~langsam.video.writers.write_outputs` and the per-frame writers:
  YouTube-VIS JSON (:class:`VideoJsonWriter`), overlay MP4 (:class:`OverlayVideoWriter`,
  :func:`render_overlay`, :func:`track_color`), id-map PNGs (:class:`MaskPngWriter`); all
  written atomically, damaged videos written up to the break.
* ``sources.py``: :func:`open_video` (``sam.video.open_frames`` with limits said in words),
  the source's frame rate and the per-frame check.
"""

from langsam.video.results import TrackedFrame, TrackInfo
from langsam.video.sources import DEFAULT_FPS, open_video
from langsam.video.tracker import (
    DEFAULT_DETECT_EVERY,
    DEFAULT_MAX_LOST_FRAMES,
    DEFAULT_NEW_OBJECT_IOU,
    TrackedVideo,
    box_iou,
    mask_iou,
    track_video,
)
from langsam.video.writers import (
    JSON_FORMAT,
    JSON_NAME,
    MASKS_DIR,
    OUTPUTS,
    OVERLAY_NAME,
    MaskPngWriter,
    OverlayVideoWriter,
    VideoJsonWriter,
    render_overlay,
    track_color,
    write_outputs,
)

__all__ = [
    "DEFAULT_DETECT_EVERY",
    "DEFAULT_FPS",
    "DEFAULT_MAX_LOST_FRAMES",
    "DEFAULT_NEW_OBJECT_IOU",
    "JSON_FORMAT",
    "JSON_NAME",
    "MASKS_DIR",
    "OUTPUTS",
    "OVERLAY_NAME",
    "MaskPngWriter",
    "OverlayVideoWriter",
    "TrackInfo",
    "TrackedFrame",
    "TrackedVideo",
    "VideoJsonWriter",
    "box_iou",
    "mask_iou",
    "open_video",
    "render_overlay",
    "track_color",
    "track_video",
    "write_outputs",
]
