"""Disk full while writing a checkpoint, shards or features: a clear error, the previous files intact.

Two real OS-level limits: a size-limited tmpfs (ENOSPC; needs the right to
mount, else skipped) and RLIMIT_FSIZE on this process (EFBIG; works anywhere).
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from pipeline.core.config import params_from_dict
from pipeline.data.shard_reader import open_split
from pipeline.data.shard_writer import build_shards
from pipeline.evaluation.extract import extract_features
from pipeline.method.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import tiny_params_dict
from tests.reliability.support import (PRETRAIN_OPTIONS, PRETRAIN_OUTPUTS, file_size_limit, one_thread,
                                       run_stage_in_process, small_disk, snapshot)
from tests.method.test_training import stage_workdir

MECHANISMS = ["tmpfs", "rlimit_fsize"]
CPU = torch.device("cpu")


@contextmanager
def full_disk(mechanism: str, folder: Path, prepare, leave: int) -> Iterator[None]:
    """Run ``prepare(folder)`` (the previous good output), then make the next write of about ``leave`` bytes fail."""
    if mechanism == "tmpfs":
        with small_disk(folder, 16 << 20) as disk:
            prepare(folder)
            disk.fill(leave)
            yield
    else:
        folder.mkdir(parents=True)
        prepare(folder)
        with file_size_limit(leave):
            yield


def expect_disk_error(error: pytest.ExceptionInfo[OSError], mechanism: str, names: Path) -> None:
    assert error.value.errno == (errno.ENOSPC if mechanism == "tmpfs" else errno.EFBIG)
    message = str(error.value)
    assert str(names) in message and "kept unchanged" in message, message


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.fault_case("faults", "disk full while writing a checkpoint")
def test_checkpoint_write_on_a_full_disk(mechanism, pretrain_reference, tmp_path, integrity):
    good = pretrain_reference.checkpoints[(1, 0)]
    newer = load_checkpoint(pretrain_reference.work / "models/pretrain/checkpoint.pt")
    folder = tmp_path / "models"
    path = folder / "checkpoint.pt"
    with full_disk(mechanism, folder, lambda f: (f / "checkpoint.pt").write_bytes(good), leave=len(good) // 2):
        before = {k: v for k, v in snapshot(folder).items()}
        with pytest.raises(OSError) as error:
            save_checkpoint(newer, path)
        expect_disk_error(error, mechanism, path)
        integrity.assert_intact("previous checkpoint (no temporary file left)", folder, before)
        assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.fault_case("faults", "disk full while writing shards")
def test_shard_write_on_a_full_disk(mechanism, tiny_folder, tmp_path, integrity):
    params = params_from_dict(tiny_params_dict(tiny_folder))
    out = tmp_path / "disk" / "shards"

    def previous(folder: Path) -> None:
        build_shards(params.data, 1, folder / "shards", workers=1, progress=False)  # seed 1: another generation

    with full_disk(mechanism, tmp_path / "disk", previous, leave=12_000):
        before = snapshot(out)
        with pytest.raises(OSError) as error:
            build_shards(params.data, params.seed, out, workers=1, progress=False)
        expect_disk_error(error, mechanism, out)
        integrity.assert_intact("previous data/shards", out, before)
        assert sorted(p.name for p in out.parent.iterdir() if p.name != ".filler") == ["shards"]  # no temp folder
        assert len(open_split(out, "train")) == 36


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.fault_case("faults", "disk full while writing features")
def test_feature_write_on_a_full_disk(mechanism, tiny_folder, tiny_shards, tmp_path, integrity):
    raw = tiny_params_dict(tiny_folder, extract={"batch_size": 12, "num_workers": 0})
    out = tmp_path / "disk" / "features"
    variants = ("random_init", "pixels")

    def previous(folder: Path) -> None:
        with one_thread():
            extract_features(params_from_dict(raw | {"seed": 1}), tiny_shards, None, folder / "features", CPU,
                             variants=variants, progress_bar=False)

    with full_disk(mechanism, tmp_path / "disk", previous, leave=40_000):
        before = snapshot(out)
        with pytest.raises(OSError) as error, one_thread():
            extract_features(params_from_dict(raw), tiny_shards, None, out, CPU, variants=variants, progress_bar=False)
        assert error.value.errno in (errno.ENOSPC, errno.EFBIG) and "kept unchanged" in str(error.value)
        integrity.assert_intact("previous data/features", out, before)
        assert sorted(p.name for p in out.parent.iterdir() if p.name != ".filler") == ["features"]


@pytest.mark.fault_case("faults", "disk fills up during pre-training (tmpfs): the run stops naming the file; resume on a bigger disk is byte-identical")
def test_pretraining_on_a_disk_that_fills_up_then_resumes(pretrain_reference, tiny_folder, tiny_shards, tmp_path, integrity):
    ref = pretrain_reference
    size = len(ref.checkpoints[(0, 1)])
    work = stage_workdir(tmp_path, tiny_folder, tiny_shards, pretrain=dict(PRETRAIN_OPTIONS, resume="auto"))
    checkpoint = work / "models" / "pretrain" / "checkpoint.pt"
    # room for one checkpoint and half of the next: the first save works, the second finds the disk full
    with small_disk(checkpoint.parent, size * 3 // 2) as disk:
        with pytest.raises(OSError) as error:
            run_stage_in_process(work, "pretrain")
        assert error.value.errno == errno.ENOSPC and "models/pretrain/checkpoint.pt: writing failed" in str(error.value)
        integrity.assert_same("checkpoint written before the disk filled", checkpoint, ref.checkpoints[(0, 1)])
        assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint.pt"]  # no temporaries
        disk.grow(64 << 20)
        run_stage_in_process(work, "pretrain")
        for name in PRETRAIN_OUTPUTS:
            integrity.assert_same(name, work / name, ref.outputs[name])
