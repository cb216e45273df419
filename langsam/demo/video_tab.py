"""The demo's **Video** tab: a short clip and text queries give every object the text names,
tracked through the clip with stable ids (:func:`langsam.video.track_video`): an overlay video
(one colour per id) and the YouTube-VIS style JSON to download, plus a table of the objects.

Clips are limited (:data:`MAX_VIDEO_FRAMES` frames, :data:`MAX_VIDEO_SIDE` pixels on the longer
side, and the app's upload size limit) because every visitor shares one process and one model
job runs at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langsam.demo.common import TabContext, parse_queries, rounded
from langsam.demo.text_tab import CONCEPT_MODELS
from langsam.io import sanitize_name

#: Longest clip the tab tracks, in frames (10 s at 30 fps).
MAX_VIDEO_FRAMES = 300
#: Largest longer side of a clip, in pixels (720p and 1280x720 fit).
MAX_VIDEO_SIDE = 1280
VIDEO_TABLE_HEADERS = ["id", "label", "score", "first frame", "last frame", "ended at"]


def track_rows(video: Any) -> list[list[Any]]:
    """One row per tracked object (:class:`~langsam.video.TrackedVideo` after iterating), in id order."""
    return [[obj_id, track.label, rounded(track.score), track.first_frame, track.last_frame, track.ended_at]
            for obj_id, track in sorted(video.tracks.items())]


def track_clip(pipeline: Any, video_path: str, queries: list[str], folder: Path, *, detect_every: int = 10,
               box_threshold: float = 0.3, text_threshold: float = 0.25, max_frames: int = MAX_VIDEO_FRAMES,
               max_side: int = MAX_VIDEO_SIDE, model: str | None = None) -> tuple[Any, dict[str, Path]]:
    """Track ``queries`` through the clip at ``video_path``; write ``overlay.mp4`` and
    ``<clip>.tracks.json`` into ``folder`` (ours). Returns the tracked video and the paths.
    ``model="sam3"``: SAM 3 finds the objects and SAM 3's video tracker tracks them
    (``LangSAM.track(model="sam3")``; ``box_threshold`` is then SAM 3's score threshold).

    A clip that breaks part-way (cut short, damaged) gives the outputs of the frames before
    the break, and ``video.damage`` says where (see :func:`clip_status`).

    Raises:
        ValueError: unreadable clip, no frames, more than ``max_frames`` frames or a longer side
            over ``max_side`` pixels, or bad settings.
    """
    from langsam.video import JSON_NAME, OVERLAY_NAME, track_video

    if int(detect_every) < 1:
        raise ValueError(f"detect every must be at least 1 frame, got {detect_every}")
    name = Path(video_path).name
    options = dict(detect_every=int(detect_every), box_threshold=float(box_threshold),
                   text_threshold=float(text_threshold), max_frames=max_frames, max_side=max_side, name=name)
    if model == "sam3":
        video = pipeline.track(video_path, queries, model="sam3", **options)
    else:
        video = track_video(pipeline, video_path, queries, **options)
    try:
        paths = video.save(folder, ("json", "overlay"), source_name=sanitize_name(name, max_len=80))
    except ValueError as error:
        if video.damage is not error:
            raise
        paths = {"json": folder / JSON_NAME, "overlay": folder / OVERLAY_NAME}  # the frames before the break
    # Offer the JSON under the clip's (sanitised) name; the folder is always our own.
    named = folder / f"{sanitize_name(Path(video_path).stem, max_len=60)}.tracks.json"
    paths["json"] = paths["json"].replace(named)
    return video, paths


def clip_status(video: Any) -> str:
    """One line about a tracked clip for the tab's status."""
    labels = ", ".join(sorted({track.label for track in video.tracks.values()})) or "nothing"
    damage = getattr(video, "damage", None)
    frames = len(video) if damage is None else damage.frame_index
    status = (f"{len(video.tracks)} object(s) tracked over {frames} frames "
              f"(detector on {len(video.detection_frames)} of them): {labels}.")
    if damage is not None:
        status += (f" The clip is damaged or cut short at frame {damage.frame_index} of {len(video)}: "
                   "only the frames before it were tracked.")
    return status


def build_video_tab(ctx: TabContext, max_frames: int | None = None, max_side: int | None = None) -> None:
    """Lay out the Video tab inside the current ``gr.Blocks`` and wire ``/track_video``.
    ``max_frames`` / ``max_side``: the clip limits (None: :data:`MAX_VIDEO_FRAMES`,
    :data:`MAX_VIDEO_SIDE`)."""
    import gradio as gr

    max_frames = MAX_VIDEO_FRAMES if max_frames is None else int(max_frames)
    max_side = MAX_VIDEO_SIDE if max_side is None else int(max_side)

    @ctx.user_errors
    def run_video(video_path, query_text, detect_every, box_threshold, text_threshold, model=None):
        if not video_path:
            raise gr.Error("Upload a video first.", print_exception=False)
        queries = parse_queries(query_text)
        if not queries:
            raise gr.Error("Type at least one query, e.g. 'a car' or 'a car, a person'.", print_exception=False)
        folder = ctx.outputs.new_request()
        video, paths = track_clip(ctx.models.get(), video_path, queries, folder, detect_every=int(detect_every),
                                  box_threshold=box_threshold, text_threshold=text_threshold,
                                  max_frames=max_frames, max_side=max_side, model=model)
        return str(paths["overlay"]), str(paths["json"]), track_rows(video), clip_status(video)

    gr.Markdown(f"Upload a short clip (at most {max_frames} frames and {max_side} pixels on the longer side) "
                "and say what to track. The detector runs on the first frame and every N frames; each object "
                "keeps its id and colour through the clip.")
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="Video", sources=["upload"], include_audio=True, elem_id="video-input")
            queries = gr.Textbox(label="Queries", placeholder="a car, a person (comma or one per line)",
                                 elem_id="video-queries")
            detect_every = gr.Slider(1, 60, value=10, step=1, label="Detect every N frames")
            model = gr.Radio(list(CONCEPT_MODELS), value=ctx.models.concept_model, label="Model",
                             info="grounding-dino: Grounding DINO finds, SAM 2.1 tracks; sam3: SAM 3 finds and "
                                  "tracks (the box threshold is then SAM 3's score)", elem_id="video-model")
            with gr.Accordion("Thresholds", open=False):
                box_threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Box threshold")
                text_threshold = gr.Slider(0.0, 1.0, value=0.25, step=0.01, label="Text threshold")
            run = gr.Button("Track", variant="primary", elem_id="video-run")
        with gr.Column():
            overlay = gr.Video(label="Tracked objects", interactive=False, elem_id="video-overlay")
            status = gr.Markdown(elem_id="video-status")
            json_file = gr.File(label="Tracks (YouTube-VIS JSON)", interactive=False)
    table = gr.Dataframe(headers=VIDEO_TABLE_HEADERS, label="Objects", interactive=False)
    inputs = [video, queries, detect_every, box_threshold, text_threshold, model]
    run.click(run_video, inputs, [overlay, json_file, table, status], api_name="track_video", **ctx.model_event)
