"""Safe checkpoint reading, shared by every family: `load_state_dict_file` reads tensors only
(`weights_only=True`, or safetensors), `CheckpointError` says what is wrong with a file, and
`CheckpointSpec` is the official file (URL, SHA-256, size) of a registry entry.
`sam.build` re-exports both; the families' builders (`sam.sam1.build`, `sam.sam2.build`) raise
`CheckpointError` when a state dict is not theirs."""

from __future__ import annotations

import ctypes
import pickle
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely or does not fit the model."""


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """The official file of a registry entry (each family's spec extends it): where it is
    downloaded from, its SHA-256 and its size in bytes; all None for a model without one."""

    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.pth`/`.pt` (tensors only, `weights_only=True`) or `.safetensors`.

    Never unpickles arbitrary objects: a pickle that holds anything but tensors and plain
    containers is refused with CheckpointError. The official SAM 2 layout `{"model": ...}` is
    unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); delete it and download again")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError

        try:
            state = _read_safetensors(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {error}") from error
    else:
        state = _torch_load_weights_only(path)
    if isinstance(state, Mapping):
        # Some training scripts wrap the weights; accept the common wrappers.
        for wrapper in ("model", "state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} does not hold a state dict (a mapping of parameter names to tensors)"
        )
    return dict(state)


def _torch_load_weights_only(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Legacy (non-zip) files cannot be memory-mapped; read them normally.
            if "mmap" not in str(error) and "zip" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects other than tensors, and loading "
            f"it would run code from the file. Only plain state dicts (or .safetensors) are accepted. "
            f"Details: {str(error).splitlines()[0]}"
        ) from error
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, struct.error) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); delete it and download again"
        ) from error


def _read_safetensors(path: Path, chunk_bytes: int = 256 << 20) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors in memory of their own (64-byte aligned, as torch allocates).
    safetensors hands out tensors that point into its memory map of the file, whose pages stay in
    this process's RSS until the file is closed: copying everything through one open file would
    peak at twice the weights. The file is reopened every `chunk_bytes`, so the peak is the
    weights plus one chunk."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        keys = list(handle.keys())
    state: dict[str, torch.Tensor] = {}
    position = 0
    while position < len(keys):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            copied = 0
            while position < len(keys) and copied < chunk_bytes:
                mapped = handle.get_tensor(keys[position])
                state[keys[position]] = mapped.clone()
                copied += mapped.nbytes
                position += 1
                del mapped
    return state


@contextmanager
def meta_parameters():
    """Modules built inside get their parameters on the meta device: no memory and no random
    initialisation, so loading a checkpoint does not hold a second, random copy of the model.
    Buffers stay real (the RoPE tables that are computed, not loaded). Fill the model with
    `assign_state_dict`."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state, strict=True, assign=True)`, emptying `state` as it goes: the
    model's tensors become the checkpoint's instead of copies of them. Each tensor is first cast to
    the dtype of the parameter or buffer it replaces (a float16 file gives a float32 model, as a
    copying load does), and copied once if it is not contiguous or not 64-byte aligned (tensors
    read from a safetensors file point into it at any offset; kernels round differently on
    misaligned data, so outputs would depend on the file's layout)."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    ready = {}
    for key in list(state):
        value = state.pop(key)
        if key in expected and value.dtype != expected[key].dtype:
            value = value.to(expected[key].dtype)
        if not value.is_contiguous() or value.data_ptr() % 64:
            value = value.clone(memory_format=torch.contiguous_format)
        ready[key] = value
    model.load_state_dict(ready, strict=True, assign=True)


def release_freed_memory() -> None:
    """Give freed memory back to the operating system. glibc keeps freed heap pages for reuse, so
    the temporaries of a load (file chunks, fused copies) or of one large batch would otherwise
    stay in the process's RSS for its lifetime. A no-op where the C library has no `malloc_trim`."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
