"""Image features computed once by a frozen encoder and memory-mapped from disk.

While the image encoder is frozen, every epoch would recompute the same features; the cache
computes them once, writes them to one ``.npy`` file, and reads each image's rows back through
a memory map, so an epoch costs only the prompt encoder and the mask decoder.

The cache is keyed by a fingerprint of everything the features depend on: the model family,
the weights that `encode_image` uses (SAM 2 included: its `no_mem_embed` and the decoder's
high-resolution projections), the feature dtype and the image files (path, size, modification
time). A directory whose fingerprint differs is rebuilt; an interrupted build resumes where it
stopped (finished rows are marked in ``done.npy``).

Layout: ``<dir>/features.npy`` (N, D) with each image's features flattened, ``<dir>/done.npy``
(N,) bool, ``<dir>/meta.json`` (fingerprint, feature layout, per-image sizes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data import SegmentationDataset
from ..files import atomic_write_json

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


def encoder_parameter_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of the weights that `model.encode_image` uses (its output depends only
    on these): SAM 1 the image encoder; SAM 2 also `no_mem_embed` and the mask decoder's
    `conv_s0` / `conv_s1`, which project the high-resolution features at encoding time."""
    names = [name for name in model.state_dict() if name.startswith("image_encoder.")]
    if getattr(model, "family", "sam1") == "sam2":
        names += [name for name in model.state_dict()
                  if name == "no_mem_embed" or name.startswith(("sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1."))]
    return names


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the family and the encoder-side weights (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(getattr(model, "family", "sam1").encode())
    state = model.state_dict()
    for name in encoder_parameter_names(model):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def flatten_features(features: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Features (a tensor, or SAM 2's dict of tensors and lists) -> [(path, tensor), ...] in a
    fixed order; paths look like "image_embed" or "high_res_feats.0"."""
    if isinstance(features, torch.Tensor):
        return [(prefix or "features", features)]
    if isinstance(features, dict):
        items = features.items()
    elif isinstance(features, (list, tuple)):
        items = ((str(i), value) for i, value in enumerate(features))
    else:
        raise TypeError(f"cannot cache features of type {type(features).__name__}")
    flat = []
    for key, value in items:
        flat += flatten_features(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def unflatten_features(layout: Sequence[tuple[str, Sequence[int]]], tensors: Sequence[torch.Tensor]) -> Any:
    """Inverse of `flatten_features` for a layout [(path, shape), ...]."""
    if len(layout) == 1 and layout[0][0] == "features":
        return tensors[0]
    root: dict[str, Any] = {}
    for (path, _), tensor in zip(layout, tensors):
        parts = path.split(".")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = tensor

    def rebuild(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(key.isdigit() for key in node):
            return [rebuild(node[str(i)]) for i in range(len(node))]
        return {key: rebuild(value) for key, value in node.items()}

    return rebuild(root)


def _images_signature(dataset: SegmentationDataset) -> list[list[Any]]:
    signature = []
    for record in dataset:
        stat = record.path.stat()
        signature.append([str(record.path.resolve()), stat.st_size, stat.st_mtime_ns, record.height, record.width])
    return signature


class EmbeddingCache:
    """Features of every image of `dataset`, as `predictor.set_image` computes them.

    ``get(index)`` returns ``(features, original_size, input_size)``, ready for
    ``predictor.set_embedding(*cache.get(index))`` or for ``model.decode``; features come on the
    predictor's device, in its dtype.
    """

    def __init__(self, directory: str | Path, predictor: Any, dataset: SegmentationDataset,
                 dtype: str = "float32", progress: bool = False) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.directory = Path(directory)
        self.predictor = predictor
        self.dataset = dataset
        self.dtype = dtype
        self.progress = progress
        self._features: np.ndarray | None = None
        self.meta: dict[str, Any] = {}
        self.computed = 0  # images encoded by `build` in this process

    # ------------------------------------------------------------------ building
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps({"version": CACHE_VERSION, "dtype": self.dtype,
                                  "encoder": encoder_fingerprint(self.predictor.model),
                                  "images": _images_signature(self.dataset)}).encode())
        return digest.hexdigest()

    def build(self) -> "EmbeddingCache":
        """Compute the missing features (all of them for a new or stale cache); returns self."""
        from tqdm.auto import tqdm

        self.directory.mkdir(parents=True, exist_ok=True)
        fingerprint = self.fingerprint()
        meta_path = self.directory / "meta.json"
        features_path, done_path = self.directory / "features.npy", self.directory / "done.npy"
        meta = _read_meta(meta_path)
        fresh = meta is None or meta.get("fingerprint") != fingerprint or not features_path.is_file() \
            or not done_path.is_file()
        if fresh:
            if meta is not None:
                logger.info("embedding cache %s is stale (other weights or images): rebuilding", self.directory)
            meta = self._start(fingerprint, features_path, done_path)
            atomic_write_json(meta_path, meta)
        done = np.load(done_path)
        features = np.load(features_path, mmap_mode="r+")
        todo = np.flatnonzero(~done)
        bar = tqdm(total=len(done), initial=len(done) - len(todo), desc="embedding cache", unit="image",
                   disable=not self.progress, leave=False)
        try:
            for index in todo:
                row, sizes, _ = self._encode(int(index))
                features[index] = row
                meta["images"][index] = sizes
                done[index] = True
                self.computed += 1
                if self.computed % 16 == 0:  # checkpoint the progress of long builds
                    self._flush(features, done, done_path, meta, meta_path)
                bar.update(1)
        finally:
            bar.close()
            self._flush(features, done, done_path, meta, meta_path)
            del features
        self.meta = meta
        self._features = np.load(features_path, mmap_mode="r")
        return self

    def _start(self, fingerprint: str, features_path: Path, done_path: Path) -> dict[str, Any]:
        """Encode the first image to learn the feature layout, then allocate the files."""
        if len(self.dataset) == 0:
            raise ValueError("cannot cache the embeddings of an empty dataset")
        first_row, first_sizes, layout = self._encode(0)
        array = np.lib.format.open_memmap(features_path, mode="w+", dtype=DTYPES[self.dtype],
                                          shape=(len(self.dataset), len(first_row)))
        array[0] = first_row
        array.flush()
        del array
        done = np.zeros(len(self.dataset), dtype=bool)
        done[0] = True
        np.save(done_path, done)
        self.computed += 1
        images: list[Any] = [None] * len(self.dataset)
        images[0] = first_sizes
        return {"version": CACHE_VERSION, "fingerprint": fingerprint, "dtype": self.dtype,
                "family": getattr(self.predictor.model, "family", "sam1"), "layout": layout,
                "images": images}

    def _encode(self, index: int) -> tuple[np.ndarray, dict[str, Any], list[list[Any]]]:
        """Image `index` through the encoder -> (flat row, its sizes, the feature layout)."""
        self.predictor.set_image(self.dataset.load_image(index))
        flat = flatten_features(self.predictor.features)
        row = torch.cat([tensor.detach().float().reshape(-1).cpu() for _, tensor in flat])
        sizes = {"original_size": list(self.predictor.original_size), "input_size": list(self.predictor.input_size)}
        self.predictor.reset_image()
        layout = [[path, list(tensor.shape)] for path, tensor in flat]
        return row.numpy().astype(DTYPES[self.dtype], copy=False), sizes, layout

    @staticmethod
    def _flush(features: np.ndarray, done: np.ndarray, done_path: Path, meta: dict, meta_path: Path) -> None:
        features.flush()
        np.save(done_path, done)  # after the rows: a row marked done is on disk
        atomic_write_json(meta_path, meta)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
        """(features, original_size (H, W), input_size (h, w)) of image `index`."""
        if self._features is None:
            raise RuntimeError("the embedding cache is not built: call build() first")
        row = torch.from_numpy(np.array(self._features[index], dtype=np.float32))
        tensors, offset = [], 0
        for _, shape in self.meta["layout"]:
            count = int(np.prod(shape))
            tensors.append(row[offset:offset + count].view(*shape))
            offset += count
        device, dtype = self.predictor.device, self.predictor.dtype
        tensors = [tensor.to(device=device, dtype=dtype) for tensor in tensors]
        sizes = self.meta["images"][index]
        return (unflatten_features(self.meta["layout"], tensors), tuple(sizes["original_size"]),
                tuple(sizes["input_size"]))


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == CACHE_VERSION else None
