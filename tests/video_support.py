"""Short test clips made from a real photo, shared by the video tests.

`make_clip` pans and zooms a crop window across a scikit-image photo, so consecutive frames
overlap like a slow camera move and objects in the photo (the cat in "chelsea") stay
trackable. `iter_clip` yields the same frames one at a time, for long clips that should never
sit in memory together. `write_mp4` (PyAV, H.264) and `write_frame_folder` (JPEG/PNG named
00000.jpg, 00001.jpg, ... as the reference `sam2` video predictor expects) put a clip on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from sam_factory import real_photo


def _crop_window(index: int, num_frames: int, photo_hw: tuple[int, int], aspect: float,
                 pan: float, zoom: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of frame `index`'s crop in photo pixels.

    The window starts at 90% of the largest crop of the requested aspect ratio and shrinks
    linearly by `zoom` (a fraction of that crop) while its centre moves right/down by `pan`
    (a fraction of the free margin)."""
    photo_h, photo_w = photo_hw
    progress = index / max(num_frames - 1, 1)
    full_h = min(photo_h, photo_w / aspect)
    scale = 0.9 - zoom * progress
    crop_h = max(int(round(full_h * scale)), 2)
    crop_w = max(int(round(crop_h * aspect)), 2)
    margin_h, margin_w = photo_h - crop_h, photo_w - crop_w
    centre_shift = 0.5 + pan * (progress - 0.5)
    top = int(round(margin_h * centre_shift))
    left = int(round(margin_w * centre_shift))
    return top, left, crop_h, crop_w


def iter_clip(num_frames: int = 10, height: int = 96, width: int = 128, photo: str = "chelsea",
              pan: float = 0.6, zoom: float = 0.25) -> Iterator[np.ndarray]:
    """Yield `num_frames` frames (height, width, 3) uint8 RGB, a pan + zoom over `photo`."""
    image = real_photo(photo)
    source = Image.fromarray(image)
    for index in range(num_frames):
        top, left, crop_h, crop_w = _crop_window(index, num_frames, image.shape[:2], width / height, pan, zoom)
        crop = source.crop((left, top, left + crop_w, top + crop_h))
        yield np.asarray(crop.resize((width, height), Image.BILINEAR), dtype=np.uint8)


def make_clip(num_frames: int = 10, height: int = 96, width: int = 128, photo: str = "chelsea",
              pan: float = 0.6, zoom: float = 0.25) -> np.ndarray:
    """A (num_frames, height, width, 3) uint8 RGB clip, a pan + zoom over a real photo."""
    return np.stack(list(iter_clip(num_frames, height, width, photo, pan, zoom)))


def write_mp4(frames: Iterable[np.ndarray], path: str | Path, fps: int = 10, *, rotation: int = 0,
              pts_ms: Sequence[int] | None = None, faststart: bool = False) -> Path:
    """Encode (H, W, 3) uint8 RGB frames (an array [T,H,W,3] or any iterable, consumed
    lazily) as an H.264 .mp4 with PyAV. H and W must be even (yuv420p).

    rotation: a display-matrix rotation tag, counterclockwise degrees (players and our frame
    sources show the frames turned by it); pts_ms: each frame's time in milliseconds (a
    variable frame rate) instead of 1 / fps apart; faststart: the index (moov) goes first, as
    for streaming, so a file cut short still lists every frame."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = None
        for index, frame in enumerate(frames):
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"preset": "ultrafast", "crf": "18"}
                if pts_ms is not None:
                    stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
                if rotation:
                    stream.set_display_rotation(rotation)
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if pts_ms is not None:
                video_frame.pts, video_frame.time_base = int(pts_ms[index]), Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, list[float], list[int]]:
    """Decode a video file with PyAV as stored (no rotation applied): (T, H, W, 3) uint8 RGB,
    each frame's time in seconds, and each frame's display-matrix rotation."""
    import av

    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    frames = np.stack([frame.to_ndarray(format="rgb24") for frame in decoded])
    return frames, [float(frame.pts * frame.time_base) for frame in decoded], [frame.rotation for frame in decoded]


def write_frame_folder(frames: Iterable[np.ndarray], folder: str | Path, ext: str = "jpg",
                       quality: int = 95) -> Path:
    """Save frames as folder/00000.<ext>, 00001.<ext>, ... (the reference's naming)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        image = Image.fromarray(np.ascontiguousarray(frame))
        if ext.lower() in ("jpg", "jpeg"):
            image.save(folder / f"{index:05d}.{ext}", quality=quality)
        else:
            image.save(folder / f"{index:05d}.{ext}")
    return folder


def read_frame_folder(folder: str | Path) -> np.ndarray:
    """Decode a folder written by `write_frame_folder` back to [T,H,W,3] uint8 (sorted by number)."""
    paths = sorted(Path(folder).iterdir(), key=lambda p: int(p.stem))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


# --------------------------------------------------------------------------- small video models
VIDEO_IMAGE_SIZE = 128  # model input side for fast video tests (8x8 memory grid, not 64x64)


def make_video_sam2(image_size: int = VIDEO_IMAGE_SIZE, seed: int = 0):
    """The tiny random SAM 2.1 of `sam2_factory` (hiera-tiny layout, every parameter random)
    run at a `image_size` x `image_size` input instead of 1024, so that memory attention
    works on a (image_size/16)^2 grid and a video frame takes milliseconds. No parameter
    depends on the input size; only the prompt encoder's grid sizes change."""
    from sam2_factory import make_tiny_sam2

    model = make_tiny_sam2("tiny", "2.1", seed)
    set_image_size(model, image_size)
    return model


def set_image_size(model, image_size: int):
    """Run `model` (sam.Sam2) at another square input size, in place."""
    grid = image_size // model.backbone_stride
    model.image_size = image_size
    prompt_encoder = model.sam_prompt_encoder
    prompt_encoder.input_image_size = (image_size, image_size)
    prompt_encoder.image_embedding_size = (grid, grid)
    prompt_encoder.mask_input_size = (4 * grid, 4 * grid)
    return model


def make_reference_video_predictor(our_model, layout: str = "tiny"):
    """Meta's `SAM2VideoPredictor` (with the reference's inference post-processing switches,
    as `build_sam2_video_predictor` sets them) carrying exactly our model's weights and input
    size. Its hole filling needs sam2's CUDA extension and is skipped on CPU (the warning that
    says so is silenced)."""
    import warnings

    from sam2.build_sam import build_sam2_video_predictor
    from sam2_factory import REFERENCE_CONFIGS, reference_overrides

    width = our_model.image_encoder.trunk.patch_embed.proj.out_channels
    overrides = reference_overrides(width) + [f"++model.image_size={our_model.image_size}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = build_sam2_video_predictor(
            REFERENCE_CONFIGS[(our_model.version, layout)], None, device="cpu", hydra_overrides_extra=overrides
        )
    reference.load_state_dict(our_model.state_dict(), strict=True)
    return reference.eval()
