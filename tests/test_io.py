"""langsam.io: image modes, EXIF, bad files, size limits, safe paths, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from langsam.io import (
    ImageLoadError,
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    iter_image_files,
    load_image,
    safe_join,
    sanitize_name,
    unique_stem,
)


def _gradient(height=6, width=8) -> np.ndarray:
    rows = np.arange(height, dtype=np.uint8)[:, None, None] * 20
    cols = np.arange(width, dtype=np.uint8)[None, :, None] * 10
    return (rows + cols + np.array([0, 1, 2], dtype=np.uint8)).astype(np.uint8)


def test_rgb_array_is_copied_not_aliased():
    array = _gradient()
    loaded = load_image(array)
    assert loaded.dtype == np.uint8 and loaded.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(loaded, array)
    loaded[0, 0, 0] = 99
    assert array[0, 0, 0] == 0


def test_gray_and_single_channel_arrays_broadcast_to_rgb():
    gray = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    expected = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_array_equal(load_image(gray), expected)
    np.testing.assert_array_equal(load_image(gray[..., None]), expected)


def test_uint16_float_and_bool_arrays_are_scaled():
    np.testing.assert_array_equal(load_image(np.array([[0, 65535, 257 * 100]], dtype=np.uint16))[0, :, 0], [0, 255, 100])
    np.testing.assert_array_equal(load_image(np.array([[0.0, 1.0, 0.5]], dtype=np.float32))[0, :, 0], [0, 255, 128])
    np.testing.assert_array_equal(load_image(np.array([[True, False]]))[0, :, 1], [255, 0])


def test_rgba_composited_on_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, 0] = 200  # red channel
    rgba[0, :, 3] = [255, 0, 51]  # opaque, transparent, 20 %
    out = load_image(rgba)[0]
    np.testing.assert_array_equal(out[0], [200, 0, 0])
    np.testing.assert_array_equal(out[1], [255, 255, 255])
    # 0.2 * 200 + 0.8 * 255 = 244 ; 0.8 * 255 = 204
    np.testing.assert_array_equal(out[2], [244, 204, 204])


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 2, 3), np.uint8),
                                 np.zeros((3, 3), np.int64), np.full((2, 2), 2.0), np.full((2, 2), np.nan),
                                 np.zeros((0, 4, 3), np.uint8)])
def test_bad_arrays_raise_value_error(bad):
    with pytest.raises(ImageLoadError):
        load_image(bad)


def test_unsupported_type_is_value_error():
    with pytest.raises(ValueError, match="file path"):
        load_image(12345)


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda rgb: Image.fromarray(rgb[..., 0], "L")),
        ("P", lambda rgb: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)),
        ("RGBA", lambda rgb: Image.fromarray(rgb).convert("RGBA")),
        ("LA", lambda rgb: Image.fromarray(rgb[..., 0], "L").convert("LA")),
        ("CMYK", lambda rgb: Image.fromarray(rgb).convert("CMYK")),
    ],
)
def test_pil_modes_match_pillow_rgb_conversion(mode, make):
    rgb = _gradient()
    image = make(rgb)
    assert image.mode == mode
    # Opaque images: our result must equal Pillow's own RGB conversion.
    np.testing.assert_array_equal(load_image(image), np.asarray(image.convert("RGB")))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    # round(v * 255 / 65535)
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 4, 255, 128])


def test_float_mode_f_image():
    image = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(load_image(image)[0, :, 2], [0, 64, 255])


def _exif_jpeg(path, pixels: np.ndarray, orientation: int):
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=100, subsampling=0, exif=exif.tobytes())


def test_exif_rotation_applied_for_paths_and_pil(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255  # white left half in the stored pixels
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, stored, orientation=6)  # 6: display rotated 90 degrees clockwise
    loaded = load_image(path)
    assert loaded.shape == (40, 20, 3)
    expected = np.rot90(stored, k=-1)  # clockwise: left half goes to the top
    assert np.abs(loaded.astype(int) - expected.astype(int)).max() < 10
    np.testing.assert_array_equal(load_image(Image.open(path)), loaded)


def test_missing_empty_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not a picture")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not an image"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


def test_pixel_limit_checked_from_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    decoded = []
    original_load = Image.Image.load

    def spy_load(self):
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(Image.Image, "load", spy_load)
    with pytest.raises(ImageLoadError, match="300x200 = 60000 pixels"):
        load_image(path, max_pixels=59_999)
    assert not any(size == (300, 200) for size in decoded), "pixels were decoded before the size check"
    assert load_image(path, max_pixels=60_000).shape == (200, 300, 3)
    with pytest.raises(ImageLoadError, match="limit"):
        load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=99)


def test_iter_image_files_folders_globs_dedup(tmp_path):
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/readme.txt", ".hidden/d.png", "sub/.e.png"]:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    files = iter_image_files([str(tmp_path), str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "*.jpeg")])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.PNG", "b.jpg", "sub/c.jpeg"]
    # An explicitly named file is kept whatever its suffix.
    assert iter_image_files([tmp_path / "sub" / "readme.txt"]) == [tmp_path / "sub" / "readme.txt"]
    with pytest.raises(ValueError, match="no such file"):
        iter_image_files([str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="matches no image"):
        iter_image_files([str(tmp_path / "*.gif")])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a dog", "a_dog"),
        ("../../etc/passwd", "etc_passwd"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("   ", "unnamed"),
        ("a\\b/c", "a_b_c"),
        ("x\x00y\ny", "x_y_y"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("chat noir é", "chat_noir_é"),
        (".bashrc", "bashrc"),
    ],
)
def test_sanitize_name(text, expected):
    assert sanitize_name(text) == expected


def test_sanitize_name_length_limits():
    assert sanitize_name("a" * 500) == "a" * 80
    assert sanitize_name("abcdef", max_len=3) == "abc"
    assert len(sanitize_name("猫" * 100, max_len=100).encode()) <= 200


def test_safe_join_blocks_traversal(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert safe_join(root, "a", "b.png") == (root / "a" / "b.png").resolve()
    for bad in ["../x.png", "a/../../x.png", "/etc/passwd", str(tmp_path / "elsewhere")]:
        with pytest.raises(ValueError, match="outside the output folder"):
            safe_join(root, bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError):
        safe_join(root, "link", "x.png")


def test_unique_stem_avoids_collisions(tmp_path):
    seen: set[str] = set()
    assert unique_stem(tmp_path / "a" / "cat.jpg", seen) == "cat"
    assert unique_stem(tmp_path / "b" / "cat.png", seen) == "cat_2"
    assert unique_stem(tmp_path / "c" / "CAT.png", seen) == "CAT_3"
    assert unique_stem(tmp_path / "a" / "cat.jpg", set(), root=tmp_path) == "a_cat"


def test_atomic_writes(tmp_path):
    target = tmp_path / "deep" / "x.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(os.listdir(target.parent)) == ["x.bin"]  # no temp files left
    atomic_write_json(tmp_path / "r.json", {"score": np.float32(0.5), "box": np.arange(2), "n": np.int64(3)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"score": 0.5, "box": [0, 1], "n": 3}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["deep", "r.json"]
    image = Image.fromarray(_gradient()).convert("RGBA")
    atomic_save_image(tmp_path / "o.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(image))
    atomic_save_image(tmp_path / "o.jpg", image)
    assert Image.open(tmp_path / "o.jpg").mode == "RGB"


def test_formats_outside_the_list_are_refused_before_decoding(tmp_path):
    """An EPS file (Pillow would hand it to Ghostscript) renamed to .jpg is refused."""
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
        b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n"
    )
    with Image.open(eps) as unrestricted:  # Pillow alone would take it for EPS
        assert unrestricted.format == "EPS"
    with pytest.raises(ImageLoadError, match="supported format") as raised:
        load_image(eps)
    assert str(eps) in str(raised.value)
    # the listed formats still load, whatever their suffix
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    for fmt, suffix in (("PNG", ".png"), ("BMP", ".jpg"), ("TIFF", ".tif"), ("WEBP", ".webp"), ("PPM", ".ppm")):
        path = tmp_path / f"ok_{fmt}{suffix}"
        Image.fromarray(pixels).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        np.testing.assert_array_equal(load_image(path), pixels)


def test_multi_picture_jpeg_from_a_camera_loads(tmp_path):
    first = np.full((8, 8, 3), 200, np.uint8)
    path = tmp_path / "camera.jpg"
    Image.fromarray(first).save(path, format="MPO", save_all=True, append_images=[Image.fromarray(first // 2)])
    with Image.open(path) as image:
        assert image.format == "MPO"
    assert np.abs(load_image(path).astype(int) - 200).max() <= 2  # the first picture (JPEG rounding)


def test_one_atomic_write_implementation_serves_langsam_and_training(tmp_path):
    import sam.files
    import sam.training.embedding_cache as embedding_cache
    import sam.training.trainer as trainer
    import langsam.io

    assert langsam.io.atomic_write_json is sam.files.atomic_write_json is trainer.atomic_write_json
    assert embedding_cache.atomic_write_json is sam.files.atomic_write_json
    assert langsam.io.atomic_write_bytes is sam.files.atomic_write_bytes

    # A writer that fails half-way leaves the previous file and no temporary file behind.
    target = sam.files.atomic_write_json(tmp_path / "report.json", {"epoch": np.int64(3), "loss": np.float32(0.5)})
    assert json.loads(target.read_text(encoding="utf-8")) == {"epoch": 3, "loss": 0.5}

    def half_write(temporary):
        temporary.write_bytes(b"{\"epo")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sam.files.atomic_write(target, half_write)
    assert json.loads(target.read_text(encoding="utf-8")) == {"epoch": 3, "loss": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
