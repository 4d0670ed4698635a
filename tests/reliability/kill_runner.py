"""Run a stage in this process and SIGKILL it at a chosen point (for tests/reliability/test_faults.py).

    python -m tests.reliability.kill_runner pretrain step E S       # at the start of step S of epoch E
    python -m tests.reliability.kill_runner pretrain checkpoint_write N   # half-way through the N-th checkpoint write
    python -m tests.reliability.kill_runner shard sample N          # while writing sample N of the shards
    python -m tests.reliability.kill_runner shard swap              # between replace_dir's two renames
    python -m tests.reliability.kill_runner extract array N         # at the N-th array written to a .npz
    python -m tests.reliability.kill_runner collective              # DDP: all-reduce twice (rank KILL_RANK stops)

The process sends itself SIGKILL, so no handler, ``finally`` or ``atexit`` runs,
exactly as ``kill -9`` from outside, but at a reproducible point. Under
torchrun only the rank named by ``KILL_RANK`` (default: every rank) dies;
``KILL_SIGNAL=SIGSTOP`` freezes it instead (a hung rather than dead rank).
Stages run with the params.yaml of the working folder and their own code
(``stages.<name>.main``), without a sacred record.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def die() -> None:
    """SIGKILL (or KILL_SIGNAL) this process if it is the rank chosen by KILL_RANK."""
    chosen = os.environ.get("KILL_RANK")
    if chosen is not None and chosen != os.environ.get("RANK", "0"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))


def kill_at_step(epoch: int, step: int) -> None:
    from pipeline.method.training import Pretrainer

    original = Pretrainer.train_step

    def train_step(self: Pretrainer, crops: Any, e: int, s: int) -> Any:
        if (e, s) == (epoch, step):
            die()
        return original(self, crops, e, s)

    Pretrainer.train_step = train_step  # type: ignore[method-assign]


class _HalfWriter:
    """A file handle whose ``write`` puts half the bytes on disk, then dies."""

    def __init__(self, handle: Any):
        self._handle = handle

    def write(self, data: bytes) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        os.fsync(self._handle.fileno())
        die()
        raise AssertionError("still alive after SIGKILL")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> "_HalfWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.close()


def kill_in_checkpoint_write(n: int) -> None:
    """Die half-way through the n-th write of ``checkpoint.pt`` (its temporary file)."""
    import pipeline.core.files as files  # the atomic writer checkpoints go through

    real_os = files.os
    count = {"n": 0}

    class OsProxy:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_os, name)

        def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_os.fdopen(fd, *args, **kwargs)
            if Path(real_os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".checkpoint.pt."):
                count["n"] += 1
                if count["n"] == n:
                    return _HalfWriter(handle)
            return handle

    files.os = OsProxy()  # type: ignore[assignment]


def kill_at_shard_sample(n: int) -> None:
    import webdataset

    original = webdataset.TarWriter.write
    count = {"n": 0}

    def write(self: Any, obj: dict[str, Any]) -> Any:
        count["n"] += 1
        if count["n"] == n:
            self.stream.flush()  # what was written so far is on disk, as after a real crash
            die()
        return original(self, obj)

    webdataset.TarWriter.write = write  # type: ignore[method-assign]


def kill_in_swap() -> None:
    """Die right after replace_dir moved the previous output aside, before the new one is renamed in."""
    original = Path.rename

    def rename(self: Path, target: Any) -> Any:
        result = original(self, target)
        if ".old-" in Path(target).name:
            die()
        return result

    Path.rename = rename  # type: ignore[method-assign]


def kill_at_npz_array(n: int) -> None:
    import numpy as np

    original = np.lib.format.write_array
    count = {"n": 0}

    def write_array(*args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] == n:
            die()
        return original(*args, **kwargs)

    np.lib.format.write_array = write_array


def collective() -> None:
    """Two all-reduces through pipeline.core.distributed; the chosen rank dies or freezes in between."""
    import torch

    from pipeline.core.distributed import all_reduce_sum, init_distributed, shutdown

    context = init_distributed(torch.device("cpu"))
    value = all_reduce_sum(torch.ones(4), context)
    print(f"rank {context.rank}: first all-reduce {value.tolist()}", flush=True)
    die()
    try:
        all_reduce_sum(torch.ones(4), context)
    except RuntimeError as error:
        print(f"rank {context.rank}: second all-reduce failed: {' '.join(str(error).split())}", flush=True)
        # os._exit, not sys.exit: after a timed-out recv, gloo's threads may call std::terminate
        # while the interpreter tears the process group down (SIGABRT), hiding the status we test
        os._exit(3)
    print(f"rank {context.rank}: second all-reduce returned", flush=True)
    shutdown(context)


def main(argv: list[str]) -> None:
    if argv == ["collective"]:
        collective()
        return
    stage, point, *args = argv
    if point == "step":
        kill_at_step(int(args[0]), int(args[1]))
    elif point == "checkpoint_write":
        kill_in_checkpoint_write(int(args[0]))
    elif point == "sample":
        kill_at_shard_sample(int(args[0]))
    elif point == "swap":
        kill_in_swap()
    elif point == "array":
        kill_at_npz_array(int(args[0]))
    elif point != "never":
        raise SystemExit(f"unknown kill point {point!r}")

    from tests.reliability.support import run_stage_main

    run_stage_main(stage)


if __name__ == "__main__":
    main(sys.argv[1:])
