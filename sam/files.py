"""Atomic writes: the one implementation every writer in ``sam`` and ``langsam`` uses.

A reader (or a resumed run) never sees a half-written file, and a crash mid-write leaves any
previous file intact: the data goes to a hidden temporary file in the same folder, is flushed
to disk, then renamed over the target with ``os.replace``. This module imports neither torch
nor PIL, so the light entry points (``langsam.cli``, ``langsam.demo``) can use it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, flush the file to disk, then rename it over ``path``.

    Parent folders are created. On any failure (an exception, Ctrl+C) the temporary file is
    removed and a previous file at ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` (see :func:`atomic_write`)."""

    def write(temporary: Path) -> None:
        # os.open with 0o666 lets the umask decide the final permissions (mkstemp would force 0600);
        # O_EXCL: never write through a file someone planted under the temporary name.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _json_default(value: Any) -> Any:
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as UTF-8 JSON, newline-terminated; numpy values and paths are converted."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically ``torch.save`` ``obj`` (tensors and plain containers, loadable with weights_only=True)."""
    import torch

    return atomic_write(path, lambda temporary: torch.save(obj, temporary))
