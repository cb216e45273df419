"""The demo's **Everything** tab: SAM's automatic mask generator, with its main parameters as
sliders; the masks are drawn in their own colours and listed largest first."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from langsam.demo.common import TabContext, for_display, rounded

AUTO_TABLE_HEADERS = ["#", "area", "predicted iou", "stability", "x0", "y0", "x1", "y1"]


def auto_overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """The image with each automatic mask tinted in its own colour, largest first so small
    masks stay visible on top, and each mask's outline drawn in white."""
    pixels = image.astype(np.float32)
    outline = np.zeros(image.shape[:2], dtype=bool)
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        # Golden-ratio hue steps give neighbouring masks clearly different colours.
        hue = (index * 0.618033988749895) % 1.0
        color = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.95), dtype=np.float32) * 255
        pixels[mask] = pixels[mask] * (1 - alpha) + color * alpha
        edge = mask.copy()
        edge[1:-1, 1:-1] = mask[1:-1, 1:-1] & ~(
            mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        )
        outline |= edge
    pixels[outline] = 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def build_everything_tab(ctx: TabContext) -> None:
    """Lay out the Everything tab inside the current ``gr.Blocks`` and wire ``/auto_masks``."""
    import gradio as gr

    @ctx.user_errors
    def run_auto(image_path, points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh,
                 crop_n_layers):
        image = ctx.read_upload(image_path)
        records = ctx.models.get().auto_masks(
            image,
            points_per_side=int(points_per_side),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            box_nms_thresh=float(box_nms_thresh),
            crop_n_layers=int(crop_n_layers),
        )
        records = sorted(records, key=lambda r: -int(r["area"]))
        overlay = for_display(auto_overlay(image, [r["segmentation"] for r in records]), ctx.max_display_side)
        rows = []
        for index, record in enumerate(records):
            x, y, w, h = (round(float(v), 1) for v in record["bbox"])
            rows.append([index, int(record["area"]), rounded(record["predicted_iou"]),
                         rounded(record["stability_score"]), x, y, round(x + w, 1), round(y + h, 1)])
        return overlay, rows, f"{len(records)} mask(s)."

    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="auto-image")
            points = gr.Slider(1, 64, value=16, step=1, label="Points per side")
            iou = gr.Slider(0.0, 1.0, value=0.88, step=0.01, label="Predicted IoU threshold")
            stability = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="Stability score threshold")
            nms = gr.Slider(0.0, 1.0, value=0.7, step=0.01, label="Box NMS threshold")
            crops = gr.Slider(0, 2, value=0, step=1, label="Crop layers")
            run = gr.Button("Generate masks", variant="primary", elem_id="auto-run")
        with gr.Column():
            view = gr.Image(label="Masks", type="pil", format="png", interactive=False, elem_id="auto-overlay")
            status = gr.Markdown()
    table = gr.Dataframe(headers=AUTO_TABLE_HEADERS, label="Masks", interactive=False)
    run.click(run_auto, [image, points, iou, stability, nms, crops], [view, table, status], api_name="auto_masks",
              **ctx.model_event)
