"""Atomic writes for checkpoints and reports: a reader (or a resumed run) never sees a
half-written file, and a crash mid-write leaves the previous file intact."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, flush it to disk, then rename it over `path` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write `obj` as UTF-8 JSON (numpy values and paths converted)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n"
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically `torch.save` `obj` (tensors and plain containers, loadable with weights_only=True)."""
    import torch

    return atomic_write(path, lambda temporary: torch.save(obj, temporary))
