"""``langsam auto-masks``: SAM's automatic masks (everything, no text) as SA-1B style JSON.

With ``--ray`` the masks are generated and encoded by workers on a Ray cluster
(:func:`_render` runs there) and this process writes the same files (:func:`_write_files`).
"""

from __future__ import annotations

import argparse
import re
from functools import partial
from pathlib import Path
from typing import Any

from langsam.cli.batch import (OVERLAY_NAME, Item, RunReport, add_input_arguments, collect_items,
    encode_image, prepare_out, print_summary, process_items, read_json, set_pixel_limit)
from langsam.cli.options import (EXIT_FAILURES, EXIT_OK, add_device_argument, add_generator_arguments,
    add_ray_arguments, add_sam_type_argument, env_default, generator_params_from_args, ray_options_from_args,
    validate_model_arguments)

NAME = "auto-masks"

EPILOG = """\
outputs (under --out):
  <image>.json        SA-1B style: {"image": {file_name, height, width},
                      "annotations": [{id, segmentation (COCO RLE), bbox (xywh), area,
                      predicted_iou, stability_score, point_coords, crop_box}]};
                      written last, so it marks the image as done for --skip-existing
  <image>_masks/NNN.png  with --png: one mask per annotation (NNN = its id), plus
                      <image>_masks/overlay.jpg

Mask-generator options left unset keep SamAutomaticMaskGenerator's defaults.
exit status: 0 all images processed, 1 some images failed, 2 usage error.

examples:
  langsam auto-masks photos/ --out masks/
  langsam auto-masks img.jpg --out masks/ --checkpoint sam_vit_h_4b8939.pth --png
  langsam auto-masks photos/ --out masks/ --points-per-side 16 --pred-iou-thresh 0.9 --crop-n-layers 1
  langsam auto-masks gs://bucket/photos/ --out masks/ --ray auto --workers 8 --gpus-per-worker 1
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam auto-masks`` and its options."""
    parser = commands.add_parser(
        NAME, help="SAM automatic masks (everything, no text) in SA-1B JSON",
        description="Run SamAutomaticMaskGenerator on each image and write SA-1B style JSON.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(parser)
    model = parser.add_argument_group("model options")
    add_sam_type_argument(model, "--model-type", "--sam-type", default_text="auto with --checkpoint, else sam2.1_hiera_small")
    # Same destination and environment variable as the shared --sam-checkpoint; SAM's own name first.
    model.add_argument("--checkpoint", "--sam-checkpoint", dest="sam_checkpoint", metavar="PATH",
                       default=env_default("sam_checkpoint"),
                       help="local SAM checkpoint; default: the official weights for --model-type "
                            "[LANGSAM_SAM_CHECKPOINT]")
    add_device_argument(model)
    add_generator_arguments(parser, "mask generator (SamAutomaticMaskGenerator parameters)")
    parser.add_argument("--png", action="store_true", help="also write one PNG per mask and an overlay per image")
    add_ray_arguments(parser)
    parser.set_defaults(handler=run, parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``langsam auto-masks`` with parsed ``args``; returns the exit status."""
    parser = args.parser
    if args.sam_type is None:
        from langsam.pipeline import DEFAULT_SAM_TYPE

        args.sam_type = "auto" if args.sam_checkpoint is not None else DEFAULT_SAM_TYPE
    validate_model_arguments(parser, args)
    ray_options = ray_options_from_args(args)
    items = collect_items(args.inputs, allow_uris=ray_options is not None)
    out_dir = prepare_out(args.out)
    max_pixels = set_pixel_limit(args.max_pixels)
    amg_params = generator_params_from_args(args)

    from langsam.io import safe_join

    report = RunReport(total=len(items))
    todo = []
    for item in items:
        done = read_json(safe_join(out_dir, item.key + ".json")) if args.skip_existing else None
        if isinstance(done, dict) and isinstance(done.get("annotations"), list):
            report.skipped += 1
            report.objects["masks"] += len(done["annotations"])
        else:
            todo.append(item)

    def finish(item: Item, document: dict[str, Any], files: dict[str, bytes]) -> None:
        _write_files(out_dir, item.key, document, files)
        report.objects["masks"] += len(document["annotations"])

    process_items(args, todo, command=NAME, mode=NAME, render=partial(_render_image, amg_params=amg_params, png=args.png),
                  finish=finish, ray_options=ray_options, max_pixels=max_pixels, report=report,
                  postfix=lambda report: {"masks": report.objects["masks"]})
    if not args.quiet:
        print_summary(NAME, report, [f"masks: {report.objects['masks']}"])
    return EXIT_FAILURES if report.failures else EXIT_OK


def _render_image(pipeline, image, file_name: str, source: str, *, amg_params, png: bool
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One image's masks as its SA-1B document and files (here or on a Ray worker; writes nothing)."""
    # coco_rle: masks leave the generator already compressed, as SA-1B stores them.
    masks = pipeline.auto_masks(image, output_mode="coco_rle", **amg_params)
    return _render(file_name, image, masks, png)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> JSON types."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _render(file_name: str, image, masks: list[dict[str, Any]], png: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The SA-1B document of one image and, with ``png``, its mask PNGs and overlay
    (``{name inside <key>_masks/: encoded bytes}``); writes nothing."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    height, width = image.shape[:2]
    annotations = []
    for index, mask in enumerate(masks, start=1):
        rle = mask["segmentation"]
        counts = rle["counts"]
        annotations.append({
            "id": index,
            "segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "bbox": _plain(mask["bbox"]),
            "area": int(mask["area"]),
            "predicted_iou": float(mask["predicted_iou"]),
            "stability_score": float(mask["stability_score"]),
            "point_coords": _plain(mask["point_coords"]),
            "crop_box": _plain(mask["crop_box"]),
        })
    files: dict[str, bytes] = {}
    if png:
        binary = [mask_utils.decode({"size": a["segmentation"]["size"],
                                     "counts": a["segmentation"]["counts"].encode("ascii")}).astype(bool)
                  for a in annotations]
        for annotation, mask in zip(annotations, binary):
            files[f"{annotation['id']:03d}.png"] = encode_image(Image.fromarray(mask.astype(np.uint8) * 255), "PNG")
        files[OVERLAY_NAME] = encode_image(_overlay(image, binary), "JPEG", quality=90)
    document = {
        "image": {"image_id": 1, "file_name": file_name, "height": int(height), "width": int(width)},
        "annotations": annotations,
    }
    return document, files


def _write_files(out_dir: Path, key: str, document: dict[str, Any], files: dict[str, bytes]) -> None:
    """Write ``<key>.json`` (last) and ``files`` under ``<key>_masks/``, removing masks an earlier
    run of this image left there."""
    from langsam.io import atomic_write_bytes, atomic_write_json, safe_join

    json_path = safe_join(out_dir, key + ".json")
    json_path.unlink(missing_ok=True)  # unfinished until rewritten
    if files:
        # "<key>_masks" can never equal another image's "<key>.json" (or its folder).
        folder = safe_join(out_dir, key + "_masks")
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            atomic_write_bytes(safe_join(folder, name), data)
        for stale in folder.glob("*.png"):  # masks of an earlier run of this image that had more
            if re.fullmatch(r"\d{3,}\.png", stale.name) and stale.name not in files:
                stale.unlink(missing_ok=True)
    atomic_write_json(json_path, document, indent=None)


def _overlay(image, masks: list) -> Any:
    """Every mask in its own colour at half opacity (colours fixed by mask order, seed 0)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.utils import draw_segmentation_masks

    if not masks:
        return Image.fromarray(image)
    rng = np.random.default_rng(0)
    colours = [tuple(int(c) for c in rng.integers(40, 256, size=3)) for _ in masks]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    drawn = draw_segmentation_masks(canvas, torch.from_numpy(np.stack(masks)), alpha=0.5, colors=colours)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())
