"""The demo's **Click and box** tab: interactive SAM. The image embedding is computed once when
the image is uploaded; every click (positive, negative, or two box corners) only runs the mask
decoder. The three multimask candidates are offered, best score first.

No ``from __future__ import annotations`` here: gradio finds the event-data parameter of a
handler by its annotation, which must be the real ``gr.SelectData`` class.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from langsam.demo.common import TabContext, display_scale, for_display, mask_png_bytes
from langsam.io import atomic_write_bytes

CLICK_POSITIVE, CLICK_NEGATIVE, CLICK_BOX = "positive point", "negative point", "box corner"
#: How long an idle visitor's session (and its image embedding) is kept, in seconds.
SESSION_TTL_S = 3600

_POINT_COLORS = {1: (40, 200, 70), 0: (230, 40, 40)}
_CLICK_MASK_COLOR = np.array([30, 144, 255], dtype=np.float32)


@dataclass
class ClickSession:
    """Per-visitor state of the click tab (kept in a ``gr.State``).

    The visitor's own :class:`~sam.predictor.SamPredictor` shares the pipeline's SAM model
    but holds this visitor's image embedding, so clicks of one visitor never see another
    visitor's image. All coordinates are original-image pixels.
    """

    predictor: Any
    image: np.ndarray
    points: list[list[float]] = field(default_factory=list)  # [[x, y], ...]
    labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative
    box: list[float] | None = None  # [x0, y0, x1, y1]
    pending_corner: list[float] | None = None  # [x, y] of a box's first corner
    # Undo stack, oldest first: ("point",) or ("box", the box it replaced).
    history: list[tuple] = field(default_factory=list)
    masks: np.ndarray | None = None  # (3, H, W) bool, best score first
    scores: np.ndarray | None = None  # (3,) predicted IoU, descending
    selected: int = 0

    @property
    def has_prompt(self) -> bool:
        return bool(self.points) or self.box is not None


def render_click_view(
    image: np.ndarray,
    mask: np.ndarray | None,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    box: Sequence[float] | None,
    pending_corner: Sequence[float] | None,
    max_side: int,
) -> Image.Image:
    """The click tab's view: the image (downscaled to ``max_side``) with the selected mask,
    the prompt points (green positive, red negative), the box and a half-drawn box corner.

    ``points``, ``box`` and ``pending_corner`` are in original-image pixels.
    """
    scale = display_scale(image.shape[:2], max_side)
    base = for_display(Image.fromarray(image), max_side)
    if mask is not None:
        view_mask = np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).resize(base.size, Image.Resampling.NEAREST)
        ) > 127
        pixels = np.asarray(base, dtype=np.float32).copy()
        pixels[view_mask] = pixels[view_mask] * 0.45 + _CLICK_MASK_COLOR * 0.55
        base = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(base)
    radius = max(4, round(max(base.size) / 120))
    for (x, y), label in zip(points, labels):
        cx, cy = x * scale, y * scale
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius),
                     fill=_POINT_COLORS[int(label)], outline=(255, 255, 255), width=2)
    if box is not None:
        draw.rectangle([v * scale for v in box], outline=(255, 215, 0), width=max(2, radius // 2))
    if pending_corner is not None:
        cx, cy = pending_corner[0] * scale, pending_corner[1] * scale
        draw.line((cx - 2 * radius, cy, cx + 2 * radius, cy), fill=(255, 215, 0), width=2)
        draw.line((cx, cy - 2 * radius, cx, cy + 2 * radius), fill=(255, 215, 0), width=2)
    return base


def _click_info(session: ClickSession) -> dict[str, Any]:
    return {
        "image_size": list(session.image.shape[:2]),
        "points": session.points,
        "labels": session.labels,
        "box": session.box,
        "scores": None if session.scores is None else [float(s) for s in session.scores],
        "selected": session.selected if session.masks is not None else None,
    }


def decode(session: ClickSession) -> None:
    """Run the mask decoder on the session's prompts (the embedding is already set)."""
    if not session.has_prompt:
        session.masks, session.scores, session.selected = None, None, 0
        return
    point_coords = np.array(session.points, dtype=np.float32) if session.points else None
    point_labels = np.array(session.labels, dtype=np.int64) if session.points else None
    box = np.array(session.box, dtype=np.float32) if session.box is not None else None
    masks, scores, _ = session.predictor.predict(
        point_coords=point_coords, point_labels=point_labels, box=box, multimask_output=True
    )
    order = np.argsort(-scores, kind="stable")
    session.masks, session.scores, session.selected = masks[order], scores[order], 0


def add_prompt(session: ClickSession, x: float, y: float, kind: str) -> str:
    """Add a point or a box corner at (x, y) (original pixels, clamped to the image); returns the status."""
    height, width = session.image.shape[:2]
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError("the point needs finite x and y coordinates")
    x, y = min(max(float(x), 0.0), width - 1.0), min(max(float(y), 0.0), height - 1.0)
    if kind == CLICK_BOX:
        if session.pending_corner is None:
            session.pending_corner = [x, y]
            return "First box corner set; click the opposite corner."
        (x0, y0), session.pending_corner = session.pending_corner, None
        session.history.append(("box", session.box))
        session.box = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
        return "Box set."
    if kind not in (CLICK_POSITIVE, CLICK_NEGATIVE):
        raise ValueError(f"unknown click mode {kind!r}")
    session.points.append([x, y])
    session.labels.append(1 if kind == CLICK_POSITIVE else 0)
    session.history.append(("point",))
    return f"{kind.capitalize()} at ({x:.0f}, {y:.0f})."


def build_click_tab(ctx: TabContext) -> None:
    """Lay out the Click and box tab inside the current ``gr.Blocks`` and wire its endpoints
    (``/click_set_image``, ``/click_add_point``, ``/click_set_box``, ``/click_choose``,
    ``/click_undo``, ``/click_clear``)."""
    import gradio as gr

    def click_outputs(session: ClickSession | None, status: str):
        if session is None:
            return None, session, gr.update(choices=[], value=None), None, None, status
        mask = None if session.masks is None else session.masks[session.selected]
        view = render_click_view(session.image, mask, session.points, session.labels, session.box,
                                 session.pending_corner, ctx.max_display_side)
        if session.masks is None:
            return view, session, gr.update(choices=[], value=None), None, _click_info(session), status
        choices = [(f"#{i + 1}  score {float(s):.3f}", i) for i, s in enumerate(session.scores)]
        folder = ctx.outputs.new_request()
        mask_path = atomic_write_bytes(folder / f"mask_{session.selected + 1}.png", mask_png_bytes(mask))
        return (view, session, gr.update(choices=choices, value=session.selected), str(mask_path),
                _click_info(session), status)

    def require_session(session: ClickSession | None) -> ClickSession:
        if session is None:
            raise gr.Error("Upload an image in this tab first.", print_exception=False)
        return session

    @ctx.user_errors
    def click_set_image(image_path):
        image = ctx.read_upload(image_path)
        # A predictor of this visitor's own around the shared model (or the shared onnxruntime
        # sessions): it keeps this image's embedding however many other visitors upload meanwhile.
        predictor = ctx.click_predictor()
        predictor.set_image(image)  # the one encoder run for this image
        session = ClickSession(predictor=predictor, image=image)
        height, width = image.shape[:2]
        return click_outputs(session, f"Image embedded ({width}x{height}). Click on the image to add points.")

    @ctx.user_errors
    def click_select(session, kind, evt: gr.SelectData):
        session = require_session(session)
        # evt.index is in the displayed (possibly downscaled) image's pixels.
        scale = display_scale(session.image.shape[:2], ctx.max_display_side)
        x, y = (float(v) / scale for v in evt.index[:2])
        status = add_prompt(session, x, y, kind)
        decode(session)
        return click_outputs(session, status)

    @ctx.user_errors
    def click_add_point(session, x, y, kind):
        session = require_session(session)
        if x is None or y is None:
            raise ValueError("enter both x and y")
        status = add_prompt(session, x, y, kind)
        decode(session)
        return click_outputs(session, status)

    @ctx.user_errors
    def click_set_box(session, x0, y0, x1, y1):
        session = require_session(session)
        values = [x0, y0, x1, y1]
        session.history.append(("box", session.box))
        if any(v is None for v in values):
            session.box = None
            status = "Box cleared."
        else:
            height, width = session.image.shape[:2]
            x0, x1 = sorted(min(max(float(v), 0.0), width - 1.0) for v in (x0, x1))
            y0, y1 = sorted(min(max(float(v), 0.0), height - 1.0) for v in (y0, y1))
            session.box = [x0, y0, x1, y1]
            status = "Box set."
        session.pending_corner = None
        decode(session)
        return click_outputs(session, status)

    @ctx.user_errors
    def click_undo(session):
        session = require_session(session)
        if session.pending_corner is not None:
            session.pending_corner = None
        elif session.history:
            action = session.history.pop()
            if action[0] == "point":
                session.points.pop()
                session.labels.pop()
            else:
                session.box = action[1]
        decode(session)
        return click_outputs(session, "Undone.")

    @ctx.user_errors
    def click_clear(session):
        session = require_session(session)
        session.points, session.labels, session.box, session.pending_corner = [], [], None, None
        session.history.clear()
        decode(session)
        return click_outputs(session, "Prompts cleared.")

    @ctx.user_errors
    def click_choose(session, candidate):
        session = require_session(session)
        if session.masks is None:
            raise gr.Error("Click on the image first.", print_exception=False)
        if candidate is None or not 0 <= int(candidate) < len(session.masks):
            raise ValueError(f"candidate must be between 0 and {len(session.masks) - 1}")
        session.selected = int(candidate)
        return click_outputs(session, f"Candidate #{session.selected + 1} selected.")

    state = gr.State(None, time_to_live=SESSION_TTL_S)
    gr.Markdown("Upload an image (its embedding is computed once), then click on the result "
                "image. Each click only runs the mask decoder. In box mode two clicks give "
                "opposite corners.")
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", image_mode=None,
                             sources=["upload", "clipboard"], elem_id="click-image")
            mode = gr.Radio([CLICK_POSITIVE, CLICK_NEGATIVE, CLICK_BOX], value=CLICK_POSITIVE, label="Click adds")
            with gr.Row():
                undo_button = gr.Button("Undo")
                clear_button = gr.Button("Clear")
            with gr.Accordion("Coordinates (original image pixels)", open=False):
                with gr.Row():
                    point_x = gr.Number(label="x")
                    point_y = gr.Number(label="y")
                point_button = gr.Button("Add point")
                with gr.Row():
                    box_x0 = gr.Number(label="x0")
                    box_y0 = gr.Number(label="y0")
                    box_x1 = gr.Number(label="x1")
                    box_y1 = gr.Number(label="y1")
                box_button = gr.Button("Set box (empty fields clear it)")
        with gr.Column():
            view = gr.Image(label="Click here", type="pil", format="png", interactive=False, elem_id="click-view")
            candidate = gr.Radio([], label="Candidate masks (best score first)", elem_id="click-candidates")
            status = gr.Markdown(elem_id="click-status")
            mask_file = gr.File(label="Selected mask (PNG)", interactive=False)
            info = gr.JSON(label="Prompts and scores")
    outputs = [view, state, candidate, mask_file, info, status]
    model_event = ctx.model_event
    image.upload(click_set_image, [image], outputs, api_name="click_set_image", **model_event)
    # Removing the image ends the session (and frees its embedding).
    image.clear(lambda: click_outputs(None, ""), None, outputs, api_name=False)
    view.select(click_select, [state, mode], outputs, api_name=False, **model_event)
    point_button.click(click_add_point, [state, point_x, point_y, mode], outputs, api_name="click_add_point",
                       **model_event)
    box_button.click(click_set_box, [state, box_x0, box_y0, box_x1, box_y1], outputs, api_name="click_set_box",
                     **model_event)
    undo_button.click(click_undo, [state], outputs, api_name="click_undo", **model_event)
    clear_button.click(click_clear, [state], outputs, api_name="click_clear", **model_event)
    candidate.input(click_choose, [state, candidate], outputs, api_name="click_choose")
