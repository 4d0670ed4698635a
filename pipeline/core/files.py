"""Files written so that a crash never leaves half of one: atomic writes, JSON, folder swaps, hashes.

Every output of the pipeline goes through here. A file is written to a
temporary sibling, flushed, fsynced and renamed over its target; a folder is
built beside its target and swapped in by rename (:func:`replace_dir`), and a
run killed between the two renames is undone by :func:`restore_moved_aside`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


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


def rounded(value: Any, decimals: int = 4) -> Any:
    """``value`` with every float rounded (recursively through dicts and lists)."""
    if isinstance(value, dict):
        return {k: rounded(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, decimals) for v in value]
    if isinstance(value, float):
        return round(value, decimals) if math.isfinite(value) else value
    return value


def write_json(value: Any, path: str | Path, decimals: int | None = None) -> None:
    """Deterministic JSON (2-space indent, sorted keys, trailing newline), written atomically.

    ``decimals``: round every float first (the evaluation reports use 4); None keeps them exact.
    """
    if decimals is not None:
        value = rounded(value, decimals)
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def restore_moved_aside(target: Path) -> Path | None:
    """Undo a :func:`replace_dir` killed between its two renames; returns ``target`` if it was put back.

    Such a run leaves ``target`` missing and its previous content under
    ``.<name>.old-*``: the newest one is renamed back. With ``target`` present,
    ``.old-*`` folders are leftovers of a run killed after the swap and are deleted.
    """
    olds = sorted((p for p in target.parent.glob(f".{glob.escape(target.name)}.old-*")
                   if p.is_dir() and not p.is_symlink()), key=lambda p: p.stat().st_mtime)
    restored = None
    if olds and not target.exists() and not target.is_symlink():
        olds.pop().rename(target)
        restored = target
    for stale in olds:
        shutil.rmtree(stale, ignore_errors=True)
    return restored


def remove_stale_temporaries(target: Path, pattern: str) -> None:
    """Delete the temporary folders ``.<target name><pattern>`` that a killed run left beside ``target``.

    They only ever hold partial output (the finished one is renamed away), so
    nothing is lost; a second run writing the same ``target`` at the same time
    is not supported anyway.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}{pattern}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target`` by rename; the old folder is removed only after the swap."""
    os.chmod(new, 0o755)  # mkdtemp makes it 0700
    if not target.exists() and not target.is_symlink():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    if old.is_symlink():
        old.unlink()  # the link is replaced, never what it pointed to
    else:
        shutil.rmtree(old, ignore_errors=True)
