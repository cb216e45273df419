"""``langsam segment``: segment what text queries name in many images.

Per image: masks, an overlay and a ``result.json`` record (written last: it marks the image as
done for ``--skip-existing``); per run: one COCO ``annotations.json``. With ``--ray`` the images
are segmented by workers on a Ray cluster (:func:`_render` runs there) and this process writes
the same files (:func:`_write_files`), so either engine can resume the other's run.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

from langsam.cli.batch import (ANNOTATIONS_NAME, OVERLAY_NAME, RECORD_NAME, Item, RunReport,
    add_input_arguments, collect_items, encode_image, prepare_out, print_summary, process_items, read_json,
    set_pixel_limit)
from langsam.cli.options import (EXIT_FAILURES, EXIT_OK, UsageError, add_generator_arguments,
    add_model_arguments, add_ray_arguments, exemplar, fraction, generator_flag, generator_params_from_args,
    model_kwargs_from_args, number, output_list, ray_options_from_args, validate_model_arguments)

NAME = "segment"
MODES = ("grounded", "clip", "hybrid")
SAVE_CHOICES = ("masks", "overlay", "coco", "json")
#: Version of the per-image record layout; a record of another version is redone on resume.
RECORD_FORMAT = 1

EPILOG = """\
outputs (under --out):
  <image>/mask_NNN_<query>.png  one mask per object (white = object), NNN = object index
  <image>/overlay.jpg       the image with every mask, box and label drawn on it
  <image>/result.json       per-image record: queries, boxes, scores, RLE masks; written
                            last, so it marks the image as done for --skip-existing
  annotations.json          COCO instances file for the whole run (categories = queries,
                            RLE segmentations, bbox, area, score), loadable by pycocotools
  <image> is the image's path relative to the common input folder, made safe
  (a/cat.jpg -> a_cat); equal names in different folders never overwrite each other.

exit status: 0 all images processed, 1 some images failed (reported on stderr, the run
goes on), 2 usage error (nothing was loaded).

examples:
  langsam segment photos/ --text "a dog" --text "a ball" --out results/
  langsam segment 'shots/**/*.jpg' --queries-file queries.txt --out results/ --save masks,coco
  langsam segment cat.jpg --text cat --mode hybrid --box-threshold 0.25 --out results/
  langsam segment cat.jpg --text cat --mode clip --points-per-side 16 --out results/
  langsam segment photos/ --text "a dog" --model sam3 --sam3-checkpoint sam3.pt --out results/
  langsam segment cat.jpg --model sam3 --exemplar 10,20,200,240 --exemplar 300,40,380,90:neg --out results/
  langsam segment photos/ --text person --out results/ --skip-existing   # resume a run
  LANGSAM_DEVICE=cuda langsam segment photos/ --text car --sam-type vit_h --out results/
  langsam segment photos/ --text car --out results/ --ray --workers 2     # Ray, this machine
  langsam segment s3://bucket/photos/ --text car --out results/ --ray auto --gpus-per-worker 1
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``langsam segment`` and its options."""
    parser = commands.add_parser(
        NAME, help="segment what text queries name in many images",
        description="Segment every object the text queries name in each input image; write masks,\n"
                    "overlays, per-image JSON and one COCO annotations file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(parser)
    queries = parser.add_argument_group("queries")
    queries.add_argument("--text", "-t", action="append", default=[], metavar="QUERY",
                         help="what to find, e.g. 'a dog'; repeat for several queries (one detector pass for all)")
    queries.add_argument("--queries-file", metavar="FILE",
                         help="a UTF-8 text file with one query per line (blank lines and lines starting "
                              "with # are ignored)")
    queries.add_argument("--exemplar", action="append", type=exemplar, default=[], metavar="X0,Y0,X1,Y1[:neg]",
                         help="--model sam3 only: an exemplar box in image pixels, positive (more like this) or "
                              "with :neg negative (not like this); repeatable. They join every query, or stand "
                              "alone without --text (objects labelled 'exemplar')")
    settings = parser.add_argument_group("detection")
    settings.add_argument("--mode", choices=MODES, default="grounded",
                          help="grounded: the concept model's objects (Grounding DINO boxes -> SAM, or SAM 3's "
                               "instances with --model sam3); clip: SAM auto masks ranked by CLIP; hybrid: "
                               "grounded, re-scored by CLIP (default grounded)")
    settings.add_argument("--box-threshold", type=fraction, default=None, metavar="P",
                          help="minimum object score: Grounding DINO's box score, or SAM 3's presence x query "
                               "score (default 0.3)")
    settings.add_argument("--text-threshold", type=fraction, default=None, metavar="P",
                          help="minimum detector text-token score (default 0.25)")
    settings.add_argument("--clip-threshold", type=fraction, default=None, metavar="P",
                          help="minimum CLIP probability in clip/hybrid mode (default: the pipeline's)")
    settings.add_argument("--top-k", type=number(int, 1), default=None, metavar="K",
                          help="keep at most K objects per image, best first (default: all)")
    add_generator_arguments(parser, "mask generator (--mode clip only)",
                            "SamAutomaticMaskGenerator parameters for the masks CLIP ranks in --mode clip\n"
                            "(the same flags as 'langsam auto-masks'); unset ones keep the generator's defaults")
    add_model_arguments(parser)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--save", type=output_list(SAVE_CHOICES), default=frozenset(SAVE_CHOICES), metavar="LIST",
                           help="comma-separated outputs: masks, overlay, coco, json, or all (default all). "
                                "The per-image result.json is always written: it marks the image as done")
    add_ray_arguments(parser)
    parser.set_defaults(handler=run, parser=parser)
    return parser


# ============================================================================================
# The run
# ============================================================================================


def run(args: argparse.Namespace) -> int:
    """Run ``langsam segment`` with parsed ``args``; returns the exit status."""
    parser = args.parser
    queries = _collect_queries(args)
    amg_params = _generator_params(args)
    validate_model_arguments(parser, args)
    _check_concept_options(args, queries)
    ray_options = ray_options_from_args(args)
    items = collect_items(args.inputs, allow_uris=ray_options is not None)
    out_dir = prepare_out(args.out)
    max_pixels = set_pixel_limit(args.max_pixels)
    settings = _settings(args, queries, amg_params)
    from langsam.pipeline import EXEMPLAR_LABEL

    labels = queries or [EXEMPLAR_LABEL]  # exemplars alone: one category
    category_ids = {query: index for index, query in enumerate(labels, start=1)}

    from langsam.io import safe_join

    report = RunReport(total=len(items))
    records: dict[str, dict[str, Any]] = {}
    todo: list[Item] = []
    for item in items:
        record = None
        if args.skip_existing:
            record = _finished_record(safe_join(out_dir, item.key, RECORD_NAME), item, settings)
        if record is None:
            todo.append(item)
        else:
            records[item.key] = record
            report.skipped += 1
            report.objects.update(obj["label"] for obj in record["objects"])

    def finish(item: Item, record: dict[str, Any], files: dict[str, bytes]) -> None:
        _write_files(out_dir, item.key, record, files)
        records[item.key] = record
        report.objects.update(obj["label"] for obj in record["objects"])

    render = partial(_render_image, queries=queries, segment_kwargs=_segment_kwargs(args, amg_params),
                     settings=settings, category_ids=category_ids, save=args.save)
    process_items(args, todo, command=NAME, mode=args.mode, render=render, finish=finish, ray_options=ray_options,
                  max_pixels=max_pixels, report=report, postfix=lambda report: {"objects": sum(report.objects.values())})

    annotations_path = None
    if "coco" in args.save:
        coco = _build_coco(items, records, labels, category_ids)
        annotations_path = safe_join(out_dir, ANNOTATIONS_NAME)
        from langsam.io import atomic_write_json

        atomic_write_json(annotations_path, coco, indent=None)
    if not args.quiet:
        lines = ["objects per query:"] + [f"  {query}: {report.objects[query]}" for query in labels]
        if annotations_path is not None:
            lines.append(f"COCO annotations: {annotations_path}")
        print_summary(NAME, report, lines)
    return EXIT_FAILURES if report.failures else EXIT_OK


def _collect_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.text)
    if args.queries_file is not None:
        try:
            lines = Path(args.queries_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --queries-file {args.queries_file!r}: {error}") from None
        queries += [line for line in lines if not line.strip().startswith("#")]
    from langsam.detector import parse_queries

    if not any(query.strip(" .") for query in queries):
        if args.exemplar:
            return []  # SAM 3 with exemplar boxes alone (checked in _check_concept_options)
        raise UsageError("no queries: pass --text 'a dog' (repeatable) or --queries-file FILE")
    # The pipeline labels objects with its own normalisation of the queries (spaces collapsed,
    # outer dots stripped, case-insensitive duplicates dropped); categories must use the same.
    return parse_queries(queries)


def _check_concept_options(args: argparse.Namespace, queries: list[str]) -> None:
    """``--model`` / ``--exemplar`` combinations the pipeline would refuse on every image."""
    from langsam.pipeline import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    if model == "sam3" and args.mode == "clip":
        raise UsageError("--mode clip ranks SAM's automatic masks with CLIP and uses no concept model; "
                         "use --mode grounded or hybrid with --model sam3")
    if args.exemplar and model != "sam3":
        raise UsageError("--exemplar boxes need --model sam3 (Grounding DINO takes text only)")
    if not queries and args.mode == "hybrid":
        raise UsageError("--mode hybrid checks each mask against its query with CLIP: pass --text")


def _generator_params(args: argparse.Namespace) -> dict[str, Any]:
    """The mask-generator flags the user set; only ``--mode clip`` runs the generator."""
    amg_params = generator_params_from_args(args)
    if amg_params and args.mode != "clip":
        flags = ", ".join(generator_flag(name) for name in amg_params)
        raise UsageError(f"{flags}: mask-generator settings apply to --mode clip only (got --mode {args.mode})")
    return amg_params


def _settings(args: argparse.Namespace, queries: list[str], amg_params: dict[str, Any]) -> dict[str, Any]:
    """What decides an image's objects; a finished image is reused only if these match."""
    settings = {
        "queries": queries,
        "mode": args.mode,
        "box_threshold": args.box_threshold,
        "text_threshold": args.text_threshold,
        "clip_threshold": args.clip_threshold,
        "top_k": args.top_k,
        "models": {key: value for key, value in model_kwargs_from_args(args).items() if key != "device"},
        "outputs": sorted(args.save),
    }
    if amg_params:  # absent when unset, so records of runs on the generator's defaults stay valid
        settings["generator"] = amg_params
    if args.exemplar:  # likewise absent without exemplars
        settings["exemplars"] = [[list(box), positive] for box, positive in args.exemplar]
    return settings


def _segment_kwargs(args: argparse.Namespace, amg_params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``LangSAM.segment`` (unset options keep the pipeline's defaults)."""
    kwargs: dict[str, Any] = {"mode": args.mode}
    for name in ("box_threshold", "text_threshold", "clip_threshold", "top_k"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if amg_params:
        kwargs["amg_params"] = dict(amg_params)
    if args.exemplar:
        kwargs["exemplars"] = list(args.exemplar)
    return kwargs


def _finished_record(record_path: Path, item: Item, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an image finished earlier with the same settings, else None (redo it)."""
    record = read_json(record_path)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or record.get("settings") != settings:
        return None
    if not isinstance(record.get("image"), dict) or record["image"].get("file_name") != item.file_name:
        return None  # the folder belongs to another input that mapped to the same name
    return record


def _render_image(pipeline, image, file_name: str, source: str, *, queries, segment_kwargs, settings, category_ids,
                  save) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Segment one image and encode its record and files (here or on a Ray worker; writes nothing)."""
    result = pipeline.segment(image, queries or None, **segment_kwargs)
    return _render(file_name, source, image, result, settings, category_ids, save)


# ============================================================================================
# Outputs
# ============================================================================================


def _render(file_name: str, source: str, image, result, settings, category_ids,
            save: frozenset[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One image's record and its files (``{name: encoded bytes}``: masks, overlay); writes nothing."""
    import numpy as np
    from PIL import Image

    from langsam.io import sanitize_name

    annotations = result.to_coco(image_id=0, category_ids=category_ids) if len(result) else []
    objects = []
    files: dict[str, bytes] = {}
    for index in range(len(result)):
        label = result.labels[index]
        mask_file = None
        if "masks" in save:
            mask_file = f"mask_{index:03d}_{sanitize_name(label, max_len=60)}.png"
            mask = np.asarray(result.masks[index], dtype=bool)
            files[mask_file] = encode_image(Image.fromarray(mask.astype(np.uint8) * 255), "PNG")
        annotation = annotations[index]
        objects.append({
            "index": index,
            "label": label,
            "score": float(result.scores[index]),
            "mask_score": float(result.mask_scores[index]),
            "clip_score": None if result.clip_scores is None else float(result.clip_scores[index]),
            "box_xyxy": [float(v) for v in result.boxes[index]],
            "bbox": [float(v) for v in annotation["bbox"]],
            "area": float(annotation["area"]),
            "segmentation": annotation["segmentation"],
            "mask_file": mask_file,
        })
    if "overlay" in save:
        files[OVERLAY_NAME] = encode_image(result.overlay(image), "JPEG", quality=90)
    height, width = image.shape[:2]
    record = {
        "format": RECORD_FORMAT,
        "image": {"file_name": file_name, "path": source, "height": int(height), "width": int(width)},
        "settings": settings,
        "objects": objects,
    }
    return record, files


def _write_files(out_dir: Path, key: str, record: dict[str, Any], files: dict[str, bytes]) -> None:
    """Write one image's files atomically, remove the ones an earlier run left, and (last) its record."""
    from langsam.io import atomic_write_bytes, atomic_write_json, safe_join

    folder = safe_join(out_dir, key)
    record_path = safe_join(folder, RECORD_NAME)
    previous = read_json(record_path)
    # Until the new record exists the image counts as unfinished, even if the run stops midway.
    record_path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(safe_join(folder, name), data)
    _remove_stale(folder, previous, set(files))
    # Written whatever --save says, and last: it marks the image as done for --skip-existing.
    atomic_write_json(record_path, record)


def _remove_stale(folder: Path, previous: Any, written: set[str]) -> None:
    """Delete files an earlier run of this image wrote (per its record) that this run did not."""
    from langsam.io import safe_join

    if not isinstance(previous, dict):
        return
    old_files = [obj.get("mask_file") for obj in previous.get("objects", []) if isinstance(obj, dict)]
    old_files.append(OVERLAY_NAME)
    for name in old_files:
        if isinstance(name, str) and name not in written:
            try:
                safe_join(folder, name).unlink(missing_ok=True)
            except (ValueError, OSError):
                pass


def _build_coco(items: list[Item], records: dict[str, dict[str, Any]], queries: list[str],
                category_ids: dict[str, int]) -> dict[str, Any]:
    """One COCO instances file for every finished image of the run (fresh or resumed)."""
    images, annotations = [], []
    for image_id, item in enumerate((item for item in items if item.key in records), start=1):
        record = records[item.key]
        info = record["image"]
        images.append({"id": image_id, "file_name": info["file_name"], "height": info["height"],
                       "width": info["width"], "langsam_output": item.key})
        for obj in record["objects"]:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids[obj["label"]],
                "segmentation": obj["segmentation"],
                "bbox": obj["bbox"],
                "area": obj["area"],
                "score": obj["score"],
                "iscrowd": 0,
            })
    return {
        "info": {"description": "langsam segment", "queries": queries},
        "images": images,
        "categories": [{"id": category_ids[query], "name": query, "supercategory": "query"} for query in queries],
        "annotations": annotations,
    }
