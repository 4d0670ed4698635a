"""Training checkpoints: saved atomically, loaded without running code.

A checkpoint is written through :func:`pipeline.core.files.atomic_write_bytes`,
so a crash (or a full disk) never leaves a half-written file where a good one
was. Loading always uses
``weights_only=True``: a checkpoint from someone else cannot run code.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_bytes


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated or not ours."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Serialise ``state`` with ``torch.save`` and write it atomically.

    Strings are interned first: pickle memoises by object identity, so a key
    that came from a loaded checkpoint would otherwise serialise differently
    from the same key written by a fresh run, and a resumed run's checkpoint
    would not be byte-identical to an uninterrupted one.
    """
    buffer = io.BytesIO()
    torch.save(_intern_strings(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _intern_strings(value: Any) -> Any:
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return type(value)((_intern_strings(k), _intern_strings(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_intern_strings(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_intern_strings(v) for v in value)
    return value


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle with code, wrong format
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):  # e.g. a bare tensor: callers index it by key
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, expected a dict of tensors)")
    return state
