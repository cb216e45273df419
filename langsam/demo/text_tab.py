"""The demo's **Text** tab: an image and text queries give a :class:`~langsam.result.Segmentation`
(modes ``grounded``, ``clip``, ``hybrid``), shown as an overlay, a gallery and a table of the
objects, with the COCO JSON and a zip of the mask PNGs to download. In clip mode a few of the
mask generator's settings can be set; left empty, the generator's defaults apply.

The concept model is a choice (Grounding DINO + SAM, or SAM 3). With SAM 3, exemplar boxes can be
given: typed as ``x0,y0,x1,y1`` lines (``:neg`` for "not like this"), or drawn by clicking two
opposite corners on the image (Gradio's ``Image.select``; Gradio 6 has no box-drawing input)."""

from __future__ import annotations

import inspect
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from langsam.demo.common import TabContext, for_display, mask_png_bytes, parse_queries, rounded
from langsam.io import atomic_write_bytes, atomic_write_json, sanitize_name

MODES = ("grounded", "clip", "hybrid")
CONCEPT_MODELS = ("grounding-dino", "sam3")
TEXT_TABLE_HEADERS = ["#", "label", "score", "mask score", "clip score", "x0", "y0", "x1", "y1", "area"]
#: Most objects shown in the gallery (the table and downloads keep all of them).
MAX_GALLERY_ITEMS = 48
#: The mask-generator settings the tab offers in clip mode (``SamAutomaticMaskGenerator`` names).
CLIP_GENERATOR_SETTINGS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh")
_MAX_POINTS_PER_SIDE = 128


# --------------------------------------------------------------------------------------------
# Plain helpers (no gradio)
# --------------------------------------------------------------------------------------------


def object_thumbnail(image: np.ndarray, mask: np.ndarray, box: np.ndarray, side: int = 256) -> Image.Image:
    """The object's bounding box (padded by 10%) with everything outside the mask dimmed."""
    height, width = mask.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    pad_x, pad_y = 0.1 * (x1 - x0) + 2, 0.1 * (y1 - y0) + 2
    left, top = max(0, int(x0 - pad_x)), max(0, int(y0 - pad_y))
    right, bottom = min(width, int(np.ceil(x1 + pad_x))), min(height, int(np.ceil(y1 + pad_y)))
    if right <= left or bottom <= top:  # degenerate box: show the whole image
        left, top, right, bottom = 0, 0, width, height
    crop = image[top:bottom, left:right].astype(np.float32)
    inside = mask[top:bottom, left:right, None]
    dimmed = np.where(inside, crop, crop * 0.25 + 255 * 0.15)
    thumbnail = Image.fromarray(np.clip(dimmed, 0, 255).astype(np.uint8))
    thumbnail.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumbnail


def object_rows(segmentation: Any) -> list[list[Any]]:
    """One table row per object, in :data:`TEXT_TABLE_HEADERS` order (box in original pixels)."""
    clip_scores = segmentation.clip_scores
    rows = []
    for index in range(len(segmentation)):
        x0, y0, x1, y1 = (round(float(v), 1) for v in segmentation.boxes[index])
        rows.append([
            index,
            segmentation.labels[index],
            rounded(segmentation.scores[index]),
            rounded(segmentation.mask_scores[index]),
            None if clip_scores is None else rounded(clip_scores[index]),
            x0, y0, x1, y1,
            int(segmentation.masks[index].sum()),
        ])
    return rows


def coco_dataset(segmentation: Any, file_name: str, image_id: int = 1) -> dict[str, Any]:
    """A complete COCO dataset dict (images, categories, annotations) for one result.

    Categories are the result's distinct labels, numbered from 1 in order of appearance,
    so the file loads with ``pycocotools.coco.COCO``.
    """
    height, width = segmentation.image_size
    category_ids = segmentation.category_ids()
    annotations = segmentation.to_coco(image_id=image_id, category_ids=category_ids)
    for number, annotation in enumerate(annotations, start=1):
        annotation.setdefault("id", number)
    return {
        "info": {"description": "langsam demo", "mode": segmentation.mode},
        "images": [{"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)}],
        "categories": [{"id": cid, "name": name} for name, cid in category_ids.items()],
        "annotations": annotations,
    }


def masks_zip_bytes(segmentation: Any) -> bytes:
    """A zip with one 8-bit PNG (0 / 255) per mask, named ``{index:03d}_{label}.png``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, (mask, label) in enumerate(zip(segmentation.masks, segmentation.labels)):
            name = f"{index:03d}_{sanitize_name(label or 'object', max_len=40)}.png"
            archive.writestr(name, mask_png_bytes(mask))
    return buffer.getvalue()


def parse_exemplar_text(text: str | None) -> list[tuple[tuple[float, float, float, float], bool]]:
    """The exemplar box field: one ``x0,y0,x1,y1`` (image pixels) per line, ``:neg`` after a box
    for a negative one; blank lines are ignored. Raises ValueError naming the bad line."""
    import argparse

    from langsam.cli.options import exemplar

    boxes = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if line.strip():
            try:
                boxes.append(exemplar(line.strip()))
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"exemplar line {number}: {error}") from None
    return boxes


def add_corner(text: str | None, corner: tuple[int, int] | None, point: tuple[int, int],
               negative: bool) -> tuple[str, tuple[int, int] | None]:
    """A click on the image: the first of two sets a corner, the second adds the box they span to
    the exemplar field. Returns the new field text and the pending corner (None once used)."""
    if corner is None:
        return text or "", (int(point[0]), int(point[1]))
    (xa, ya), (xb, yb) = corner, point
    line = f"{min(xa, xb)},{min(ya, yb)},{max(xa, xb)},{max(ya, yb)}" + (":neg" if negative else "")
    lines = [existing for existing in (text or "").splitlines() if existing.strip()] + [line]
    return "\n".join(lines), None


def clip_generator_params(points_per_side: Any = None, pred_iou_thresh: Any = None,
                          stability_score_thresh: Any = None) -> dict[str, Any]:
    """``amg_params`` for clip mode from the tab's fields; empty (None) fields are left out so the
    generator's defaults apply. Raises ValueError for values the generator cannot use."""
    params: dict[str, Any] = {}
    if points_per_side is not None:
        value = float(points_per_side)
        if not value.is_integer() or not 1 <= value <= _MAX_POINTS_PER_SIDE:
            raise ValueError(f"points per side must be a whole number from 1 to {_MAX_POINTS_PER_SIDE}, "
                             f"got {points_per_side}")
        params["points_per_side"] = int(value)
    for name, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh)):
        if value is not None:
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name.replace('_', ' ')} must be between 0 and 1, got {value}")
            params[name] = float(value)
    return params


def segment_defaults() -> dict[str, float]:
    """Threshold defaults, read from LangSAM.segment so the demo and the library agree."""
    defaults = {"box_threshold": 0.3, "text_threshold": 0.25, "clip_threshold": 0.5}
    try:
        from langsam.pipeline import DEFAULT_CLIP_THRESHOLD, LangSAM

        defaults["clip_threshold"] = float(DEFAULT_CLIP_THRESHOLD)
        parameters = inspect.signature(LangSAM.segment).parameters
    except Exception:  # pipeline not importable: the app still builds, the first run says why
        return defaults
    for name in defaults:
        default = parameters.get(name)
        if default is not None and isinstance(default.default, (int, float)):
            defaults[name] = float(default.default)
    return defaults


def generator_defaults() -> dict[str, Any]:
    """``SamAutomaticMaskGenerator``'s defaults of :data:`CLIP_GENERATOR_SETTINGS` (shown as the
    fields' placeholders); empty if the generator cannot be imported."""
    try:
        from sam.automatic_mask_generator import SamAutomaticMaskGenerator

        parameters = inspect.signature(SamAutomaticMaskGenerator).parameters
    except Exception:  # the first clip-mode run will say why
        return {}
    return {name: parameters[name].default for name in CLIP_GENERATOR_SETTINGS if name in parameters}


# --------------------------------------------------------------------------------------------
# The tab
# --------------------------------------------------------------------------------------------


def build_text_tab(ctx: TabContext) -> None:
    """Lay out the Text tab inside the current ``gr.Blocks`` and wire ``/segment_text``."""
    import gradio as gr

    defaults = segment_defaults()
    generator = generator_defaults()

    @ctx.user_errors
    def run_text(image_path, query_text, mode, box_threshold, text_threshold, clip_threshold, multimask=False,
                 max_objects=0, points_per_side=None, pred_iou_thresh=None, stability_score_thresh=None,
                 model=None, exemplar_text=""):
        image = ctx.read_upload(image_path)
        queries = parse_queries(query_text)
        exemplars = parse_exemplar_text(exemplar_text)
        if not queries and not exemplars:
            raise gr.Error("Type at least one query, e.g. 'cat' or 'cat, dog' (or give SAM 3 exemplar boxes).",
                           print_exception=False)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if model is not None and model not in CONCEPT_MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(CONCEPT_MODELS)}")
        max_objects = int(max_objects or 0)
        if max_objects < 0:
            raise ValueError(f"max objects must be 0 (all) or more, got {max_objects}")
        extra: dict[str, Any] = {}
        if mode == "clip":  # the generator settings only exist (and are only shown) in clip mode
            amg_params = clip_generator_params(points_per_side, pred_iou_thresh, stability_score_thresh)
            if amg_params:
                extra["amg_params"] = amg_params
        if exemplars:
            extra["exemplars"] = exemplars
        if model is not None:
            extra["model"] = model
        segmentation = ctx.models.get().segment(
            image, queries or None, box_threshold=float(box_threshold), text_threshold=float(text_threshold),
            mode=mode, clip_threshold=float(clip_threshold), multimask=bool(multimask),
            top_k=max_objects or None, **extra,
        )
        overlay = for_display(segmentation.overlay(image), ctx.max_display_side)
        gallery = [
            (object_thumbnail(image, segmentation.masks[i], segmentation.boxes[i]),
             f"{i}: {segmentation.labels[i]} {float(segmentation.scores[i]):.2f}")
            for i in range(min(len(segmentation), MAX_GALLERY_ITEMS))
        ]
        # Only the names come from the upload, sanitised; the folder is always our own.
        stem = sanitize_name(Path(image_path).stem, max_len=60)
        file_name = sanitize_name(Path(image_path).name, max_len=80)
        folder = ctx.outputs.new_request()
        coco_path = atomic_write_json(folder / f"{stem}.coco.json", coco_dataset(segmentation, file_name))
        zip_path = atomic_write_bytes(folder / f"{stem}_masks.zip", masks_zip_bytes(segmentation))
        found = ", ".join(sorted(set(segmentation.labels))) or "nothing"
        status = f"{len(segmentation)} object(s) in {mode} mode: {found}."
        return overlay, gallery, object_rows(segmentation), str(coco_path), str(zip_path), status

    def placeholder(name: str) -> str:
        return f"empty: generator default ({generator[name]})" if name in generator else "empty: generator default"

    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="text-image")
            queries = gr.Textbox(label="Queries", placeholder="cat, dog (comma or one per line)",
                                 elem_id="text-queries")
            model = gr.Radio(list(CONCEPT_MODELS), value=ctx.models.concept_model, label="Model",
                             info="grounding-dino: Grounding DINO boxes to SAM; sam3: SAM 3 finds and masks "
                                  "every instance itself, and takes exemplar boxes", elem_id="text-model")
            mode = gr.Radio(list(MODES), value="grounded", label="Mode",
                            info="grounded: the model's objects; clip: automatic masks ranked by "
                                 "CLIP; hybrid: the model's objects, re-scored by CLIP")
            with gr.Accordion("Exemplar boxes (SAM 3)", open=False):
                exemplar_text = gr.Textbox("", label="Boxes", lines=2, elem_id="text-exemplars",
                                           placeholder="x0,y0,x1,y1 per line, :neg for 'not like this'; or click "
                                                       "two opposite corners on the image")
                negative = gr.Checkbox(False, label="Clicked boxes are negative")
                corner = gr.State(None)
            with gr.Accordion("Thresholds", open=False):
                box_threshold = gr.Slider(0.0, 1.0, value=defaults["box_threshold"], step=0.01,
                                          label="Box threshold (grounded, hybrid)")
                text_threshold = gr.Slider(0.0, 1.0, value=defaults["text_threshold"], step=0.01,
                                           label="Text threshold (grounded, hybrid)")
                clip_threshold = gr.Slider(0.0, 1.0, value=defaults["clip_threshold"], step=0.01,
                                           label="CLIP threshold (clip, hybrid)")
                multimask = gr.Checkbox(False, label="Multimask: best of 3 SAM masks per box")
                max_objects = gr.Number(0, precision=0, minimum=0, label="Max objects (0: all)",
                                        elem_id="text-max-objects")
            # Empty fields (value None) leave the setting to the generator, as unset CLI flags do.
            with gr.Accordion("Automatic masks (clip mode)", open=False, visible=False) as generator_box:
                points_per_side = gr.Number(None, precision=0, minimum=1, maximum=_MAX_POINTS_PER_SIDE,
                                            label="Points per side", placeholder=placeholder("points_per_side"),
                                            elem_id="text-points-per-side")
                pred_iou_thresh = gr.Number(None, minimum=0.0, maximum=1.0, label="Predicted IoU threshold",
                                            placeholder=placeholder("pred_iou_thresh"), elem_id="text-pred-iou")
                stability_score_thresh = gr.Number(None, minimum=0.0, maximum=1.0,
                                                   label="Stability score threshold",
                                                   placeholder=placeholder("stability_score_thresh"),
                                                   elem_id="text-stability")
            run = gr.Button("Run", variant="primary", elem_id="text-run")
        with gr.Column():
            overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="text-overlay")
            status = gr.Markdown(elem_id="text-status")
    gallery = gr.Gallery(label="Objects", columns=8, height=220, object_fit="contain", fit_columns=False,
                         format="png")
    table = gr.Dataframe(headers=TEXT_TABLE_HEADERS, label="Objects", interactive=False)
    with gr.Row():
        coco_file = gr.File(label="COCO JSON", interactive=False)
        zip_file = gr.File(label="Mask PNGs (zip)", interactive=False)
    inputs = [image, queries, mode, box_threshold, text_threshold, clip_threshold, multimask, max_objects,
              points_per_side, pred_iou_thresh, stability_score_thresh, model, exemplar_text]
    outputs = [overlay, gallery, table, coco_file, zip_file, status]
    run.click(run_text, inputs, outputs, api_name="segment_text", **ctx.model_event)
    queries.submit(run_text, inputs, outputs, api_name=False, **ctx.model_event)
    mode.change(lambda chosen: gr.update(visible=chosen == "clip"), [mode], [generator_box], api_name=False,
                queue=False)

    def click_corner(text, pending, is_negative, evt):
        return add_corner(text, pending, evt.index, is_negative)

    # gradio finds the event data by the annotation's class; this module's annotations are strings.
    click_corner.__annotations__["evt"] = gr.SelectData

    image.select(click_corner, [exemplar_text, corner, negative], [exemplar_text, corner], api_name=False,
                 queue=False)
