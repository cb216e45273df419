"""Image loading, safe output paths and atomic writes.

Every image that enters langsam goes through :func:`load_image`, which returns one
canonical form: an ``(H, W, 3)`` ``uint8`` RGB array in *displayed* orientation (EXIF
rotation applied). Everything that leaves langsam is written with the ``atomic_*``
helpers under a folder the user chose, joined with :func:`safe_join`.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The one atomic-write implementation lives in sam (the lowest layer); langsam re-exports it.
from sam.files import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSource",
    "atomic_save_image",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "iter_image_files",
    "load_image",
    "safe_join",
    "sanitize_name",
    "unique_stem",
]

#: Largest image (width * height) :func:`load_image` accepts by default: 100 megapixels,
#: roughly a 12000 x 8000 photo. Checked from the file header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 100_000_000

#: File suffixes (lower case) that :func:`iter_image_files` picks up when walking folders.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

#: The Pillow decoders :func:`load_image` lets open a file: the everyday photo and raster formats,
#: decoded by Pillow's own code. Formats whose plugins call outside programs (EPS and PDF via
#: Ghostscript, ...) or that are rarely what a user meant are refused before any decoder runs.
#: (Pillow's JPEG decoder also opens MPO, the multi-picture JPEG many cameras and phones write.)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

_GLOB_CHARS = set("*?[")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}
# File-system limit is 255 bytes per component; keep room for suffixes like "_12.mask.png".
_MAX_NAME_BYTES = 200


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message names the input and why."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load ``source`` as an ``(H, W, 3)`` uint8 RGB array in displayed orientation.

    Args:
        source: a file path (``str`` or ``os.PathLike``), a ``PIL.Image.Image`` or a numpy
            array of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` with dtype
            uint8, uint16 (full 16-bit range), bool, or float in ``[0, 1]``.
            EXIF orientation of files and PIL images is applied. Alpha is composited onto
            white. PIL modes L, LA, P, PA, 1, RGBA, CMYK, YCbCr, I;16, I and F are converted.
        max_pixels: refuse images with more than this many pixels (``None``: no limit of
            ours; Pillow's own decompression-bomb guard still applies to files).

    Returns:
        A new, C-contiguous ``(H, W, 3)`` uint8 array (never a view of the caller's data).

    Raises:
        ImageLoadError: missing, empty, corrupt, truncated, non-image or too large input,
            or an array of an unsupported shape or dtype.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, "array", max_pixels)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, "PIL image", max_pixels)
        return _pil_to_rgb(_exif_transpose(source, "PIL image"), "PIL image")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), max_pixels)
    raise ImageLoadError(
        f"cannot load an image from {type(source).__name__}: pass a file path, a PIL image or "
        "an (H, W, 3) uint8 numpy array"
    )


def _load_path(path: Path, max_pixels: int | None) -> np.ndarray:
    name = str(path)
    if not path.exists():
        raise ImageLoadError(f"{name}: file not found")
    if path.is_dir():
        raise ImageLoadError(f"{name}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:  # lazy: reads the header only
                _check_pixels(image.width, image.height, name, max_pixels)
                image.load()
                rgb = _pil_to_rgb(_exif_transpose(image, name), name)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)}), whatever its "
            f"file name says"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({error})") from None
    return rgb


def _check_pixels(width: int, height: int, name: str, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: image is {width}x{height} = {width * height} pixels, more than the limit "
            f"of {max_pixels} (pass a larger max_pixels to allow it)"
        )


def _exif_transpose(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # broken EXIF must not make a readable photo unreadable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, error)
        return image


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16/32-bit integer and float modes: go through numpy so the range is scaled,
        # not clipped the way Image.convert("L") clips.
        return _array_to_rgb(np.asarray(image), name, None, pil_mode=mode)
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _composite_on_white(np.array(image.convert("RGBA"), dtype=np.uint8))
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as error:
        raise ImageLoadError(f"{name}: cannot convert image mode {mode!r} to RGB ({error})") from None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _array_to_rgb(
    array: np.ndarray, name: str, max_pixels: int | None, pil_mode: str | None = None
) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(
            f"{name}: expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {tuple(array.shape)}"
        )
    _check_pixels(array.shape[1], array.shape[0], name, max_pixels)
    array = _to_uint8(array, name, pil_mode)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] == 4:
        return _composite_on_white(array)
    return np.array(array, dtype=np.uint8, order="C", copy=True)


def _to_uint8(array: np.ndarray, name: str, pil_mode: str | None) -> np.ndarray:
    if array.dtype.byteorder not in ("=", "|"):  # e.g. big-endian '>u2' from FITS or raw buffers
        array = array.astype(array.dtype.newbyteorder("="))
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if dtype == np.uint16 or (pil_mode is not None and pil_mode.startswith("I")):
        # 16-bit: 65535 -> 255. PIL mode "I" (int32) comes from 16-bit files in older Pillow.
        wide = np.clip(array.astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageLoadError(f"{name}: float image contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageLoadError(
                f"{name}: float images must hold values in [0, 1], got [{low:g}, {high:g}] "
                "(convert 0-255 data to uint8 first)"
            )
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise ImageLoadError(
        f"{name}: unsupported array dtype {dtype}; use uint8, uint16, bool or float in [0, 1]"
    )


# --------------------------------------------------------------------------------------------
# Finding inputs
# --------------------------------------------------------------------------------------------


def iter_image_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image files.

    A file named explicitly is kept whatever its suffix (loading will say if it is not an
    image); folders and globs contribute only files with a suffix in :data:`IMAGE_EXTENSIONS`,
    skipping hidden files and folders. Duplicates (same resolved file) are dropped.

    Raises:
        ValueError: an input that is neither an existing file, a folder, nor a glob
            pattern matching at least one image.
    """
    found: dict[Path, Path] = {}

    def add(path: Path) -> None:
        found.setdefault(path.resolve(), path)

    for entry in inputs:
        text = os.fspath(entry)
        path = Path(text)
        if path.is_file():
            add(path)
        elif path.is_dir():
            for child in path.rglob("*"):
                relative = child.relative_to(path).parts
                if child.is_file() and _is_image_name(child) and not any(p.startswith(".") for p in relative):
                    add(child)
        elif _GLOB_CHARS & set(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            images = [m for m in matches if m.is_file() and _is_image_name(m)]
            if not images:
                raise ValueError(f"{text}: the pattern matches no image files")
            for match in images:
                add(match)
        else:
            raise ValueError(f"{text}: no such file or folder")
    return sorted(found.values(), key=lambda p: str(p))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Safe names and paths
# --------------------------------------------------------------------------------------------


def sanitize_name(text: str, max_len: int = 80) -> str:
    """Turn arbitrary text (a query, a file stem) into one safe path component.

    Keeps letters, digits, ``-``, ``_`` and ``.``; everything else (separators, control
    characters, spaces, characters Windows forbids) becomes ``_``. Never returns ``""``,
    ``"."``, ``".."``, a name starting with ``.`` or a Windows device name; at most
    ``max_len`` characters and 200 UTF-8 bytes.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    text = unicodedata.normalize("NFKC", str(text))
    chars = [c if (c.isalnum() or c in "-_.") else "_" for c in text]
    name = "".join(chars)
    while "__" in name:
        name = name.replace("__", "_")
    name = name.strip("._ ")
    name = name[:max_len]
    while len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = name[:-1]
    name = name.rstrip("._ ")
    if not name:
        return "unnamed"[:max_len]
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = ("_" + name)[:max_len].rstrip(". ")  # a cut may end on "."
    return name


def safe_join(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """Join ``parts`` under ``root`` and return the resolved path.

    Raises:
        ValueError: the result (after resolving ``..`` and symlinks) is not inside ``root``,
            e.g. ``safe_join(out, "../etc/passwd")`` or an absolute part.
    """
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        joined = os.path.join(*[os.fspath(p) for p in parts]) if parts else ""
        raise ValueError(f"refusing to write to {joined!r}: it resolves outside the output folder {str(base)!r}")
    return target


def unique_stem(path: str | os.PathLike, seen: set[str] | None = None, *, root: str | os.PathLike | None = None) -> str:
    """A sanitized output stem for input ``path`` that does not collide with earlier ones.

    With ``root`` (the folder the inputs were found under), the stem is built from the path
    relative to it (``a/cat.jpg`` -> ``a_cat``) so equal base names in different folders
    stay apart. Otherwise it is the file stem. If the stem (compared case-insensitively,
    as on macOS/Windows file systems) is already in ``seen``, ``_2``, ``_3``, ... is appended.
    The returned stem is added to ``seen``.
    """
    path = Path(path)
    stem = path.stem
    if root is not None:
        try:
            relative = path.resolve().relative_to(Path(root).resolve())
            stem = "__".join([*relative.parent.parts, relative.stem])
        except ValueError:
            pass
    stem = sanitize_name(stem)
    if seen is None:
        return stem
    taken = {s.casefold() for s in seen}
    candidate, counter = stem, 1
    while candidate.casefold() in taken:
        counter += 1
        candidate = f"{stem}_{counter}"
    seen.add(candidate)
    return candidate


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


_FORMAT_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
                     ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}


def atomic_save_image(path: str | os.PathLike, image: Image.Image, format: str | None = None, **save_kwargs: Any) -> Path:
    """Atomically save a PIL image; ``format`` defaults to the one named by the suffix.

    JPEG cannot hold alpha, so RGBA/LA/P images are converted to RGB for JPEG.
    """
    path = Path(path)
    if format is None:
        format = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
        if format is None:
            raise ValueError(f"{path}: cannot tell the image format from the suffix; pass format=")
    if format.upper() in ("JPEG", "JPG") and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())
