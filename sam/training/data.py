"""Segmentation datasets for evaluation and fine-tuning.

Three on-disk formats load into one `SegmentationDataset` (a list of `ImageRecord`s, each with
its `ObjectRecord`s):

* COCO instances: an image folder plus an instances JSON with RLE (compressed or not) or
  polygon masks (`load_coco`);
* SA-1B JSON: one JSON per image, as Meta's SA-1B files and ``langsam auto-masks`` write them
  (`load_sa1b`);
* a folder of images with one PNG per object (`load_png_folder`)::

      root/images/<name>.jpg              any image format Pillow reads; sub-folders allowed
      root/masks/<name>/<object>.png      one PNG per object, non-zero pixels = the object

  The category of a mask PNG comes from its file name: ``mask_003_a dog.png`` (what ``langsam
  segment`` writes) and ``a dog_3.png`` are both "a dog"; ``7.png`` is "object".

`load_dataset` picks the format from the path. Everything that can be checked from the
annotation files is checked when a dataset loads; decoded masks are checked when first read.
A bad annotation raises `AnnotationError` (a `ValueError`) naming the file and the annotation
id; with ``strict=False`` it is skipped with a warning instead.

Frames: masks and boxes are in original-image pixels, (H, W) as the image is displayed (EXIF
orientation applied, as ``langsam`` loads images), unless the annotations were made on the
stored pixels, which is then detected from the sizes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
#: Polygon vertices may lie this many pixels outside the image (rounding in annotation tools).
POLYGON_TOLERANCE = 1.0
FORMATS = ("auto", "coco", "sa1b", "png")
DEFAULT_CATEGORY = "object"

# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class AnnotationError(ValueError):
    """An annotation (or the image it refers to) that cannot be used; the message names the
    annotation file and the annotation id."""


@dataclass(frozen=True)
class ObjectRecord:
    """One annotated object. Exactly one of `segmentation` (COCO polygons or RLE, as in the
    file) and `png` (a mask PNG) is set; `mask()` decodes either to (H, W) bool."""

    annotation_id: int | str
    category: str
    source: str  # the file the annotation comes from, for error messages
    height: int
    width: int
    segmentation: Any = None
    png: Path | None = None
    iscrowd: bool = False

    def describe(self) -> str:
        """"<file>: annotation <id>", or just the file where it is the annotation (a mask PNG)."""
        if str(self.annotation_id) == self.source:
            return self.source
        return f"{self.source}: annotation {self.annotation_id!r}"

    def rle(self) -> dict:
        """The mask as compressed COCO RLE ({"size": [H, W], "counts": bytes})."""
        from pycocotools import mask as mask_utils

        if self.png is not None:
            return mask_utils.encode(np.asfortranarray(self.mask().astype(np.uint8)))
        segmentation = self.segmentation
        try:
            if isinstance(segmentation, list):  # polygons
                return mask_utils.merge(mask_utils.frPyObjects(segmentation, self.height, self.width))
            if isinstance(segmentation["counts"], list):  # uncompressed RLE
                return mask_utils.frPyObjects(segmentation, self.height, self.width)
            counts = segmentation["counts"]
            return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        except (TypeError, ValueError, KeyError, UnicodeError) as error:
            raise AnnotationError(f"{self.describe()}: the segmentation cannot be decoded ({error})") from error

    def mask(self) -> np.ndarray:
        """(H, W) bool in original-image pixels. Raises AnnotationError for an unreadable,
        wrongly sized or empty mask."""
        if self.png is not None:
            mask = _read_png_mask(self.png, self.describe())
        else:
            from pycocotools import mask as mask_utils

            rle = self.rle()
            try:
                mask = mask_utils.decode(rle).astype(bool)
            except (TypeError, ValueError) as error:
                raise AnnotationError(f"{self.describe()}: the RLE mask cannot be decoded ({error})") from error
        if mask.shape != (self.height, self.width):
            raise AnnotationError(
                f"{self.describe()}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                f"{self.width}x{self.height}"
            )
        if not mask.any():
            raise AnnotationError(f"{self.describe()}: mask is empty (no object pixel)")
        return mask


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, its (displayed) size, and its objects."""

    image_id: int
    path: Path
    file_name: str  # as the annotation file names it (COCO file_name)
    height: int
    width: int
    objects: tuple[ObjectRecord, ...]
    source: str


def _box_from_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (4,) float xyxy, inclusive pixel indices (SAM's own box convention)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float xyxy in pixel indices (first and last object column and
    row, as SAM's automatic mask generator boxes its masks)."""
    if len(masks) == 0:
        return np.zeros((0, 4))
    return np.stack([_box_from_mask(mask) for mask in masks])


class SegmentationDataset:
    """Images with instance masks, from any of the supported formats.

    ``dataset[i]`` is an `ImageRecord`; `load_image(i)` gives its (H, W, 3) uint8 RGB pixels
    and `object_masks(i)` its usable objects with their (N, H, W) bool masks.
    """

    def __init__(self, images: Sequence[ImageRecord], categories: Sequence[str], name: str,
                 strict: bool = True) -> None:
        self.images = list(images)
        self.categories = list(categories)
        self.name = name
        self.strict = strict

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.images[index]

    def __iter__(self):
        return iter(self.images)

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.name!r}, images={len(self)}, objects={self.num_objects}, "
                f"categories={len(self.categories)})")

    @property
    def num_objects(self) -> int:
        """Objects that prompts can target (crowd regions excluded)."""
        return sum(1 for image in self.images for obj in image.objects if not obj.iscrowd)

    def subset(self, indices: Iterable[int], name: str | None = None) -> "SegmentationDataset":
        return SegmentationDataset([self.images[i] for i in indices], self.categories, name or self.name, self.strict)

    def split(self, val_fraction: float, seed: int = 0) -> tuple["SegmentationDataset", "SegmentationDataset"]:
        """A seeded random split by image into (train, val); `val_fraction` in (0, 1). Both
        parts get at least one image."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if len(self) < 2:
            raise ValueError(f"cannot split {self.name}: it has {len(self)} image(s), at least 2 are needed")
        order = np.random.default_rng(seed).permutation(len(self))
        val_count = min(len(self) - 1, max(1, int(round(val_fraction * len(self)))))
        val, train = sorted(order[:val_count].tolist()), sorted(order[val_count:].tolist())
        return self.subset(train, f"{self.name} (train split)"), self.subset(val, f"{self.name} (val split)")

    # ------------------------------------------------------------------ pixels
    def load_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image `index`, oriented like its annotations."""
        return load_record_image(self.images[index])

    def object_masks(self, index: int, include_crowd: bool = False) -> tuple[list[ObjectRecord], np.ndarray]:
        """The objects of image `index` and their masks (N, H, W) bool, original-image pixels.

        Crowd regions are left out unless `include_crowd`. A mask that cannot be used raises
        AnnotationError, or, for a dataset loaded with ``strict=False``, is skipped with a warning.
        """
        record = self.images[index]
        objects, masks = [], []
        for obj in record.objects:
            if obj.iscrowd and not include_crowd:
                continue
            try:
                masks.append(obj.mask())
            except AnnotationError as error:
                if self.strict:
                    raise
                logger.warning("skipping bad annotation: %s", error)
                continue
            objects.append(obj)
        stacked = np.stack(masks) if masks else np.zeros((0, record.height, record.width), dtype=bool)
        return objects, stacked

    # ------------------------------------------------------------------ COCO ground truth
    def to_coco(self) -> dict[str, Any]:
        """The dataset as a COCO instances dict (RLE masks, category ids 1..K in `categories`
        order, fresh annotation ids), the ground truth for COCO mask AP."""
        from pycocotools import mask as mask_utils

        category_ids = {name: index for index, name in enumerate(self.categories, start=1)}
        images, annotations = [], []
        for record in self.images:
            images.append({"id": record.image_id, "file_name": record.file_name,
                           "height": record.height, "width": record.width})
            for obj in record.objects:
                try:
                    rle = obj.rle()
                    area = float(mask_utils.area(rle))
                    if area == 0:
                        raise AnnotationError(f"{obj.describe()}: mask is empty (no object pixel)")
                except AnnotationError as error:
                    if self.strict:
                        raise
                    logger.warning("skipping bad annotation: %s", error)
                    continue
                counts = rle["counts"]
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": record.image_id,
                    "category_id": category_ids[obj.category],
                    "segmentation": {"size": [int(s) for s in rle["size"]],
                                     "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(obj.iscrowd),
                })
        categories = [{"id": index, "name": name} for name, index in category_ids.items()]
        return {"images": images, "annotations": annotations, "categories": categories}


# ================================================================================ loading
def load_dataset(path: str | Path, images: str | Path | None = None, format: str = "auto",
                 strict: bool = True) -> SegmentationDataset:
    """Load a dataset in any supported format.

    path: a COCO instances JSON, an SA-1B JSON (or a folder of them), or a PNG-mask folder
    (with ``images/`` and ``masks/``). images: the image folder for COCO and SA-1B (default:
    the JSON's folder). format: "auto" (detected), "coco", "sa1b" or "png".
    """
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if format == "auto":
        format = detect_format(path)
    if format == "coco":
        return load_coco(path, images, strict=strict)
    if format == "sa1b":
        return load_sa1b(path, images, strict=strict)
    if images is not None:
        raise ValueError("a PNG-mask folder has its own images/ folder; do not pass images")
    return load_png_folder(path, strict=strict)


def detect_format(path: Path) -> str:
    """"coco", "sa1b" or "png" for a dataset path (ValueError if it is none of them)."""
    if path.is_dir():
        if (path / "masks").is_dir() and (path / "images").is_dir():
            return "png"
        if any(path.glob("*.json")):
            return "sa1b"
        raise ValueError(f"{path} is neither a PNG-mask folder (images/ and masks/) nor a folder of SA-1B JSON files")
    data = _read_json(path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and "image" in data and "annotations" in data:
        return "sa1b"
    raise ValueError(f"{path} is neither a COCO instances file (images, annotations, categories) "
                     f"nor an SA-1B file (image, annotations)")


def load_coco(annotation_file: str | Path, images: str | Path | None = None, strict: bool = True) -> SegmentationDataset:
    """COCO instances: `annotation_file` (JSON) and the `images` folder its file names are
    relative to (default: the JSON's folder)."""
    annotation_file = Path(annotation_file)
    source = annotation_file.name
    image_dir = Path(images) if images is not None else annotation_file.parent
    data = _read_json(annotation_file)
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: not a COCO instances file (expected a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{source}: not a COCO instances file: {key!r} is missing or not a list")

    categories: dict[Any, str] = {}
    for entry in data["categories"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{source}: category {entry.get('id') if isinstance(entry, dict) else entry!r} "
                                  f"has an empty name")
        if name in categories.values():
            raise AnnotationError(f"{source}: two categories are named {name!r}")
        categories[entry.get("id")] = name

    entries: dict[Any, dict] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or not {"id", "file_name", "height", "width"} <= set(entry):
            raise AnnotationError(f"{source}: image entry {entry!r:.80} lacks id, file_name, height or width")
        if isinstance(entry["id"], bool) or not isinstance(entry["id"], int):
            raise AnnotationError(f"{source}: image id {entry['id']!r} is not an integer")
        entries[entry["id"]] = entry

    objects: dict[Any, list[ObjectRecord]] = {image_id: [] for image_id in entries}
    for annotation in data["annotations"]:
        annotation_id = annotation.get("id") if isinstance(annotation, dict) else None
        where = f"{source}: annotation {annotation_id!r}"
        if not isinstance(annotation, dict) or annotation_id is None:
            raise AnnotationError(f"{source}: annotation {annotation!r:.80} has no id")
        image = entries.get(annotation.get("image_id"))
        if image is None:
            problem = f"{where}: refers to image {annotation.get('image_id')!r}, which is not in 'images'"
            _fail_or_warn(strict, problem)
            continue
        category = categories.get(annotation.get("category_id"))
        if category is None:
            problem = (f"{where}: empty category: category_id {annotation.get('category_id')!r} is not in "
                       f"'categories'")
            _fail_or_warn(strict, problem)
            continue
        height, width = int(image["height"]), int(image["width"])
        try:
            _check_segmentation(annotation.get("segmentation"), height, width, where)
        except AnnotationError as error:
            _fail_or_warn(strict, str(error))
            continue
        objects[image["id"]].append(ObjectRecord(
            annotation_id=annotation_id, category=category, source=source, height=height, width=width,
            segmentation=annotation["segmentation"], iscrowd=bool(annotation.get("iscrowd", 0)),
        ))

    records = []
    for image_id, entry in entries.items():
        path = image_dir / entry["file_name"]
        if not path.is_file():
            problem = f"{source}: image {image_id!r} ({entry['file_name']}): missing image, no file at {path}"
            _fail_or_warn(strict, problem)
            continue
        records.append(ImageRecord(
            image_id=int(image_id), path=path, file_name=str(entry["file_name"]), height=int(entry["height"]),
            width=int(entry["width"]), objects=tuple(objects[image_id]), source=source,
        ))
    logger.info("loaded %s: %d images, %d annotations", source, len(records), sum(len(r.objects) for r in records))
    return SegmentationDataset(records, list(categories.values()), source, strict)


def load_sa1b(path: str | Path | Sequence[str | Path], images: str | Path | None = None,
              strict: bool = True) -> SegmentationDataset:
    """SA-1B JSON: one file, a folder of ``*.json`` files, or a list of files. Each holds
    ``{"image": {file_name, height, width}, "annotations": [{id, segmentation (RLE), ...}]}``.
    Images are looked up relative to `images` (default: each JSON's folder). All objects get
    the category "object"."""
    if isinstance(path, (str, Path)):
        path = Path(path)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        name = path.name
    else:
        files = [Path(p) for p in path]
        name = "SA-1B files"
    if not files:
        raise AnnotationError(f"{path}: no SA-1B JSON files found")
    records = []
    for file in files:
        source = file.name
        data = _read_json(file)
        image = data.get("image") if isinstance(data, dict) else None
        if not isinstance(image, dict) or not isinstance(data.get("annotations"), list):
            raise AnnotationError(f"{source}: not an SA-1B file (expected 'image' and 'annotations')")
        if not {"file_name", "height", "width"} <= set(image):
            raise AnnotationError(f"{source}: the 'image' entry lacks file_name, height or width")
        height, width = int(image["height"]), int(image["width"])
        objects = []
        for position, annotation in enumerate(data["annotations"]):
            annotation_id = annotation.get("id", position) if isinstance(annotation, dict) else position
            where = f"{source}: annotation {annotation_id!r}"
            segmentation = annotation.get("segmentation") if isinstance(annotation, dict) else None
            try:
                _check_segmentation(segmentation, height, width, where)
            except AnnotationError as error:
                _fail_or_warn(strict, str(error))
                continue
            objects.append(ObjectRecord(annotation_id=annotation_id, category=DEFAULT_CATEGORY, source=source,
                                        height=height, width=width, segmentation=segmentation))
        image_path = (Path(images) if images is not None else file.parent) / image["file_name"]
        if not image_path.is_file():
            _fail_or_warn(strict, f"{source}: missing image, no file at {image_path}")
            continue
        records.append(ImageRecord(image_id=len(records) + 1, path=image_path, file_name=str(image["file_name"]),
                                   height=height, width=width, objects=tuple(objects), source=source))
    return SegmentationDataset(records, [DEFAULT_CATEGORY], name, strict)


def load_png_folder(root: str | Path, strict: bool = True) -> SegmentationDataset:
    """A folder with ``images/<name>.<ext>`` and ``masks/<name>/<object>.png`` (see the module
    docstring). Image sizes are read from the file headers."""
    root = Path(root)
    image_root, mask_root = root / "images", root / "masks"
    if not image_root.is_dir() or not mask_root.is_dir():
        raise AnnotationError(f"{root}: a PNG-mask dataset needs the folders images/ and masks/")
    by_key: dict[str, Path] = {}
    for path in sorted(image_root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            key = path.relative_to(image_root).with_suffix("").as_posix()
            if key in by_key:
                raise AnnotationError(f"{root}: two images share the name {key!r} ({by_key[key].name}, {path.name}); "
                                      f"masks/{key}/ cannot tell them apart")
            by_key[key] = path
    mask_dirs = {folder.relative_to(mask_root).as_posix(): folder
                 for folder in sorted(mask_root.rglob("*")) if folder.is_dir() and any(folder.glob("*.png"))}
    for key in sorted(set(mask_dirs) - set(by_key)):
        _fail_or_warn(strict, f"masks/{key}: missing image, no images/{key}.<ext> for these masks")

    categories: list[str] = []
    records = []
    for key, path in by_key.items():
        width, height = _displayed_size(path)
        objects = []
        folder = mask_dirs.get(key)
        for mask_path in sorted(folder.glob("*.png")) if folder is not None else []:
            annotation_id = f"masks/{key}/{mask_path.name}"
            try:
                mask_width, mask_height = _png_size(mask_path, annotation_id)
                if (mask_width, mask_height) != (width, height):
                    raise AnnotationError(f"{annotation_id}: mask is {mask_width}x{mask_height} (WxH) but the image "
                                          f"is {width}x{height}")
            except AnnotationError as error:
                _fail_or_warn(strict, str(error))
                continue
            category = category_from_filename(mask_path.stem)
            if category not in categories:
                categories.append(category)
            objects.append(ObjectRecord(annotation_id=annotation_id, category=category, source=annotation_id,
                                        height=height, width=width, png=mask_path))
        records.append(ImageRecord(image_id=len(records) + 1, path=path, file_name=path.relative_to(image_root).as_posix(),
                                   height=height, width=width, objects=tuple(objects), source=f"images/{key}"))
    return SegmentationDataset(records, categories or [DEFAULT_CATEGORY], root.name, strict)


def category_from_filename(stem: str) -> str:
    """``mask_003_a dog`` -> "a dog", ``a dog_3`` -> "a dog", ``cat`` -> "cat", ``7`` -> "object"."""
    match = re.fullmatch(r"mask_\d+_(.+)", stem)
    if match:
        return match.group(1)
    match = re.fullmatch(r"(.+?)[_-]\d+", stem)
    if match:
        return match.group(1)
    return DEFAULT_CATEGORY if re.fullmatch(r"\d*", stem) else stem


# ================================================================================ checks
def _fail_or_warn(strict: bool, problem: str) -> None:
    if strict:
        raise AnnotationError(problem)
    logger.warning("skipping bad annotation: %s", problem)


def _check_segmentation(segmentation: Any, height: int, width: int, where: str) -> None:
    """Metadata checks of a COCO segmentation (polygons or RLE) against the image size."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise AnnotationError(f"{where}: the polygon list is empty")
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                raise AnnotationError(f"{where}: malformed polygon (expected a list of at least 3 x, y pairs)")
            coords = np.asarray(polygon, dtype=float).reshape(-1, 2)
            if not np.isfinite(coords).all():
                raise AnnotationError(f"{where}: polygon has NaN or infinite coordinates")
            low, high = -POLYGON_TOLERANCE, np.array([width, height]) + POLYGON_TOLERANCE
            outside = (coords < low).any(axis=1) | (coords > high).any(axis=1)
            if outside.any():
                x, y = coords[np.argmax(outside)]
                raise AnnotationError(f"{where}: polygon outside the image: point ({x:g}, {y:g}) is outside "
                                      f"the {width}x{height} image")
        return
    if isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2 or [int(s) for s in size] != [height, width]:
            raise AnnotationError(f"{where}: mask of wrong size: the RLE is {size!r} (H, W) but the image is "
                                  f"[{height}, {width}]")
        return
    raise AnnotationError(f"{where}: no usable segmentation (expected polygons or an RLE with size and counts)")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path.name}: not valid JSON ({error})") from error


def _displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError) as error:
        raise AnnotationError(f"{path}: cannot read the image ({error})") from error
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _png_size(path: Path, where: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as error:
        raise AnnotationError(f"{where}: cannot read the mask PNG ({error})") from error


def _read_png_mask(path: Path, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L") if image.mode in ("P", "RGBA", "LA") else image)
    except (OSError, UnidentifiedImageError) as error:
        raise AnnotationError(f"{where}: cannot read the mask PNG ({error})") from error
    return pixels.any(axis=2) if pixels.ndim == 3 else pixels != 0


def load_record_image(record: ImageRecord) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of `record`, oriented to match its annotations: EXIF
    orientation is applied when that gives the annotated size, else the stored pixels are used."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(record.path) as image:
            stored = (image.height, image.width)
            oriented = ImageOps.exif_transpose(image) if (record.height, record.width) != stored else image
            if (oriented.height, oriented.width) != (record.height, record.width):
                raise AnnotationError(
                    f"{record.source}: image {record.image_id!r} ({record.file_name}): the file is "
                    f"{oriented.width}x{oriented.height} but the annotations say {record.width}x{record.height}"
                )
            return _to_rgb(oriented)
    except (OSError, UnidentifiedImageError) as error:
        raise AnnotationError(f"{record.source}: image {record.image_id!r} ({record.file_name}): "
                              f"cannot read {record.path} ({error})") from error


def _to_rgb(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image).astype(np.float64)
        top = pixels.max() if pixels.size else 1.0
        gray = np.clip(pixels / (top if top > 0 else 1.0) * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = np.full((image.height, image.width, 3), 255, dtype=np.float64)
        rgba = np.asarray(image).astype(np.float64)
        alpha = rgba[:, :, 3:] / 255.0
        return (rgba[:, :, :3] * alpha + background * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


__all__ = [
    "AnnotationError",
    "FORMATS",
    "ImageRecord",
    "ObjectRecord",
    "SegmentationDataset",
    "boxes_from_masks",
    "category_from_filename",
    "detect_format",
    "load_coco",
    "load_dataset",
    "load_png_folder",
    "load_record_image",
    "load_sa1b",
]
