"""Helpers of the reliability suite: snapshots, real disk limits, stage subprocesses."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
Snapshot = dict[str, bytes]


# ------------------------------------------------------------------ snapshots
def snapshot(path: Path) -> Snapshot:
    """``{relative path: bytes}`` of a file (key ``""``) or of every file below a folder; {} if absent."""
    path = Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------- real disk limits
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_MNT_DETACH = 2


def _mount_tmpfs(target: Path, size: int) -> None:
    options = f"size={size},mode=0755".encode()
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount tmpfs on {target}: {os.strerror(code)}")


def _remount_tmpfs(target: Path, size: int) -> None:
    ms_remount = 32
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", ms_remount, f"size={size}".encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"remount tmpfs on {target}: {os.strerror(code)}")


def tmpfs_available() -> bool:
    """Whether this process may mount a tmpfs (root or CAP_SYS_ADMIN); probed once."""
    global _TMPFS_OK
    if _TMPFS_OK is None:
        probe = Path(os.environ.get("TMPDIR", "/tmp")) / f".attmask-tmpfs-probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        try:
            _mount_tmpfs(probe, 1 << 16)
        except OSError:
            _TMPFS_OK = False
        else:
            _libc.umount2(str(probe).encode(), _MNT_DETACH)
            _TMPFS_OK = True
        probe.rmdir()
    return _TMPFS_OK


_TMPFS_OK: bool | None = None


class SmallDisk:
    """A size-limited tmpfs mounted on ``path``: a disk that really fills up (ENOSPC)."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size

    def free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave: int) -> Path:
        """Write a filler file so that about ``leave`` bytes stay free."""
        filler = self.path / ".filler"
        with open(filler, "ab") as handle:
            handle.write(b"\0" * max(0, self.free() - leave))
        return filler

    def grow(self, size: int) -> None:
        _remount_tmpfs(self.path, size)
        self.size = size


@contextmanager
def small_disk(path: Path, size: int) -> Iterator[SmallDisk]:
    """Mount a tmpfs of ``size`` bytes on ``path`` (skips the test where mounting is not allowed)."""
    if not tmpfs_available():
        pytest.skip("mounting a tmpfs needs root or CAP_SYS_ADMIN; the RLIMIT_FSIZE variant covers this case")
    path.mkdir(parents=True, exist_ok=True)
    _mount_tmpfs(path, size)
    try:
        yield SmallDisk(path, size)
    finally:
        _libc.umount2(str(path).encode(), _MNT_DETACH)


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE on this process: a write past ``limit`` bytes fails with EFBIG.

    SIGXFSZ (which would kill the process) is ignored meanwhile, so the write
    returns the error instead; both are restored afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


NO_SPACE = (errno.ENOSPC, errno.EFBIG)


# ------------------------------------------------------------ subprocesses
def stage_env(work: Path, **extra: str) -> dict[str, str]:
    """Environment of a stage subprocess: the repo importable, one thread (as the in-process runs)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ATTMASK_RUNS_DIR=str(work / "runs"))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_killed(work: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``tests.reliability.kill_runner <args>`` in ``work``; it must die by SIGKILL."""
    done = subprocess.run([sys.executable, "-m", "tests.reliability.kill_runner", *args], cwd=work,
                          env=stage_env(work, **env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def chdir(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def hang_guard(seconds: int, what: str) -> Iterator[None]:
    """Turn a hang into a test failure: SIGALRM raises after ``seconds`` (main thread only)."""
    def on_alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"{what} did not finish within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- stage runs
PRETRAIN_OPTIONS = {"epochs": 3, "checkpoint_every_steps": 1, "log_every": 1}
PRETRAIN_OUTPUTS = ("models/pretrain/checkpoint.pt", "models/pretrain/backbone.pth",
                    "models/pretrain/backbone.safetensors", "reports/pretrain/steps.csv",
                    "reports/pretrain/epochs.csv", "reports/pretrain/metrics.json")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run in-process training with the thread count of the stage subprocesses (OMP_NUM_THREADS=1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_stage_main(stage: str) -> None:
    """``stages.<stage>.main`` on ./params.yaml, without a sacred record, under that file's ``numerics``.

    The numerics are set here, not inherited: an earlier in-process ``run_stage``
    leaves oneDNN off in this process while a fresh subprocess has it on, and
    the two would then compute different bytes.
    """
    import importlib

    from pipeline.core.config import load_params
    from pipeline.core.numerics import configure_numerics

    params = load_params("params.yaml")
    configure_numerics(params.numerics)
    importlib.import_module(f"stages.{stage}").main(params, progress_bar=False)


def run_stage_in_process(work: Path, stage: str) -> None:
    """:func:`run_stage_main` in ``work`` with one thread, as the kill runner runs it."""
    with chdir(work), one_thread():
        run_stage_main(stage)


@dataclass
class PretrainReference:
    """An uninterrupted tiny run: its outputs and the bytes of every checkpoint it wrote, by (epoch, step)."""

    work: Path
    steps_per_epoch: int
    checkpoints: dict[tuple[int, int], bytes]
    outputs: dict[str, bytes]
