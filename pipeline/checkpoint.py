"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the same folder, flushed to disk
and renamed over the target, so a crash (or a full disk) never leaves a
half-written file where a good one was. Loading always uses
``weights_only=True``: a checkpoint from someone else cannot run code.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from pipeline.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated or not ours."""


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on success flush, fsync and rename it over ``path``.

    A reader sees the old file or the new one, never a partial one; on any error
    the temporary file is removed and ``path`` is untouched.

    Raises:
        OSError: the write failed (disk full, file too large, ...); same errno,
            the message names ``path`` and says the previous file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(error, path) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)


def write_error(error: OSError, path: Path, what: str = "file") -> OSError:
    """``error`` (same errno, so the same OSError subclass) with a message naming ``path``.

    The bare "[Errno 28] No space left on device" names no file and says
    nothing of the previous one; callers raise this after removing their
    temporary file, so the previous ``path`` is indeed untouched.
    """
    detail = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    kept = f"the previous {what} is kept unchanged" if Path(path).exists() else f"no {what} was written"
    message = f"{path}: writing failed ({detail}); {kept}"
    return OSError(error.errno, message) if error.errno else OSError(message)


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
