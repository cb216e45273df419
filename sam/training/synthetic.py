"""A small, non-trivial segmentation dataset: textured shapes pasted onto real photos.

For smoke tests, benchmarks and trying `langsam finetune` without data of your own. Each image
is a random crop of a scikit-image sample photo with 1-3 shapes (disc, square, triangle) laid
on top, each filled with its own striped or checkered texture in two random colours. Later
shapes may hide parts of earlier ones; the masks are what stays visible. The result is written
in the PNG-folder layout of `sam.training.data.load_png_folder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SHAPES = ("disc", "square", "triangle")
#: scikit-image photos that ship with the package (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "brick",
          "grass", "gravel", "moon")
#: Colour pairs of the textures: saturated, and not complementary, so a texture keeps a vivid
#: average colour (complementary stripes would average to grey at a distance).
PALETTE = (((255, 40, 0), (255, 220, 0)), ((0, 60, 255), (0, 230, 255)), ((200, 0, 255), (255, 0, 120)),
           ((0, 200, 40), (180, 255, 0)))
#: A shape whose visible part falls below this fraction of its drawn area is dropped.
MIN_VISIBLE_FRACTION = 0.4


def sample_photos(names: Sequence[str] = PHOTOS) -> list[np.ndarray]:
    """The named scikit-image sample photos as (H, W, 3) uint8 RGB."""
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("the synthetic dataset needs scikit-image's sample photos: pip install scikit-image, "
                          "or pass backgrounds=[...] yourself") from error
    photos = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(image[:, :, :3]).astype(np.uint8))
    return photos


def _background(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    height, width = size
    scale = max(height / photo.shape[0], width / photo.shape[1]) * rng.uniform(1.0, 1.6)
    resized = np.asarray(Image.fromarray(photo).resize(
        (max(width, int(round(photo.shape[1] * scale))), max(height, int(round(photo.shape[0] * scale)))),
        Image.Resampling.BILINEAR))
    top = int(rng.integers(0, resized.shape[0] - height + 1))
    left = int(rng.integers(0, resized.shape[1] - width + 1))
    return resized[top:top + height, left:left + width].copy()


def _shape_mask(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    height, width = size
    radius = rng.uniform(0.12, 0.22) * min(height, width)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "disc":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        corners = 4 if kind == "square" else 3
        angle = rng.uniform(0, 2 * np.pi)
        points = [(cx + radius * np.cos(angle + 2 * np.pi * k / corners),
                   cy + radius * np.sin(angle + 2 * np.pi * k / corners)) for k in range(corners)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas).astype(bool)


def _texture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    period = rng.uniform(5, 10)
    colours = np.array(PALETTE[int(rng.integers(len(PALETTE)))])
    if rng.random() < 0.5:
        colours = colours[::-1]
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        pattern = (np.floor(phase) % 2).astype(bool)
    else:
        pattern = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(bool)
    return np.where(pattern[:, :, None], colours[0], colours[1]).astype(np.uint8)


def make_shape_image(background: np.ndarray, rng: np.random.Generator, max_shapes: int = 3,
                     ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Paste 1..max_shapes textured shapes onto `background` (H, W, 3) uint8.
    Returns the image and [(shape name, visible mask (H, W) bool), ...]."""
    size = background.shape[:2]
    image = background.copy()
    drawn: list[tuple[str, np.ndarray, int]] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        mask = _shape_mask(kind, size, rng)
        image[mask] = _texture(size, rng)[mask]
        drawn = [(name, previous & ~mask, area) for name, previous, area in drawn]
        drawn.append((kind, mask, int(mask.sum())))
    objects = [(name, mask) for name, mask, area in drawn if mask.sum() >= MIN_VISIBLE_FRACTION * area]
    return image, objects


def make_shapes_dataset(root: str | Path, num_images: int = 24, image_size: tuple[int, int] = (160, 200),
                        seed: int = 0, max_shapes: int = 3, backgrounds: Sequence[np.ndarray] | None = None) -> Path:
    """Write `num_images` synthetic images to `root` in the PNG-folder layout
    (``images/img_NNN.png``, ``masks/img_NNN/<shape>_<k>.png``); returns `root`.

    image_size: (H, W). backgrounds: (H, W, 3) uint8 photos to crop from (default: the
    scikit-image sample photos). The same seed writes the same dataset.
    """
    from PIL import Image

    root = Path(root)
    photos = list(backgrounds) if backgrounds is not None else sample_photos()
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        background = _background(photos[int(rng.integers(len(photos)))], image_size, rng)
        image, objects = make_shape_image(background, rng, max_shapes)
        name = f"img_{index:03d}"
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        folder = root / "masks" / name
        folder.mkdir(parents=True, exist_ok=True)
        for number, (kind, mask) in enumerate(objects):
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{kind}_{number}.png")
    return root
