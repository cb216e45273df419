"""The langsam web demo: a Gradio app with a model picker and four tabs, one module each.

1. **Text** (:mod:`~langsam.demo.text_tab`): an image and one or more text queries give a
   :class:`~langsam.result.Segmentation` (modes ``grounded``, ``clip``, ``hybrid``), shown as an
   overlay, a gallery of the objects and a table, with the COCO JSON and a zip of the mask PNGs
   to download. Clip mode takes a few mask-generator settings.
2. **Click and box** (:mod:`~langsam.demo.click_tab`): interactive SAM. The image embedding is
   computed once when the image is uploaded; every click (positive, negative, or two box corners)
   only runs the mask decoder. The three multimask candidates are offered, best score first.
3. **Everything** (:mod:`~langsam.demo.everything_tab`): the automatic mask generator, with its
   main parameters as sliders.
4. **Video** (:mod:`~langsam.demo.video_tab`): a short clip and text queries give the tracked
   objects (``LangSAM.track``) as an overlay video, a table and the YouTube-VIS JSON.

:mod:`~langsam.demo.app` builds and launches the app, :mod:`~langsam.demo.models` holds the
models (built lazily, on the first request, exactly once; the SAM type can be switched from the
page among the registry's types), :mod:`~langsam.demo.common` what the tabs share.

Start it with ``langsam demo`` or ``python demos/app.py``; it listens on 127.0.0.1 only.
All heavy events share one queue slot, so two visitors never run two model jobs at the same
time. Files the app writes go into one temporary folder of its own, removed when the process
exits. gradio is imported when the app is built, so ``langsam demo --help`` answers at once and
importing this package (or ``langsam``) never imports it.
"""

from langsam.demo.app import build_app, build_parser, launch, main
from langsam.demo.click_tab import CLICK_BOX, CLICK_NEGATIVE, CLICK_POSITIVE, render_click_view
from langsam.demo.common import DEFAULT_MAX_DISPLAY_SIDE, DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_PIXELS, parse_queries
from langsam.demo.everything_tab import auto_overlay
from langsam.demo.text_tab import coco_dataset, masks_zip_bytes

__all__ = [
    "CLICK_BOX",
    "CLICK_NEGATIVE",
    "CLICK_POSITIVE",
    "DEFAULT_MAX_DISPLAY_SIDE",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_PIXELS",
    "auto_overlay",
    "build_app",
    "build_parser",
    "coco_dataset",
    "launch",
    "main",
    "masks_zip_bytes",
    "parse_queries",
    "render_click_view",
]
