"""The single-process side of pipeline/core/distributed.py (the two-process DDP runs are in tests/method)."""
from __future__ import annotations

import datetime

import pytest
import torch

from pipeline.core.config import ParamsError
from pipeline.core.distributed import (
    DistContext,
    all_reduce_sum,
    collective_timeout,
    gather_rows,
    init_distributed,
    launched_as_main_rank,
    resolve_device,
)


def test_a_world_of_one_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed(torch.device("cpu"))
    assert context == DistContext(0, 1, 0) and context.is_main and not context.enabled
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(gather_rows(rows, context), rows)
    assert torch.equal(all_reduce_sum(rows.clone(), context), rows)
    assert launched_as_main_rank()
    monkeypatch.setenv("RANK", "1")
    assert not launched_as_main_rank()


def test_device_choice_and_a_clear_error_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ParamsError) as error:
        resolve_device("cuda", key="extract.device")
    assert error.value.key == "extract.device"


def test_join_job_gives_the_device_and_a_world_of_one_outside_torchrun(monkeypatch):
    from pipeline.core.distributed import join_job

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, context = join_job("auto", key="linear_sgd.device")
    assert device == torch.device("cpu") and context.world_size == 1 and not context.enabled
    with pytest.raises(ParamsError) as error:
        join_job("cuda", key="linear_sgd.device")
    assert error.value.key == "linear_sgd.device"


def test_collective_timeout_reads_minutes_and_rejects_nonsense(monkeypatch):
    monkeypatch.delenv("ATTMASK_DIST_TIMEOUT_MIN", raising=False)
    assert collective_timeout() == datetime.timedelta(minutes=10)
    monkeypatch.setenv("ATTMASK_DIST_TIMEOUT_MIN", "0.5")
    assert collective_timeout() == datetime.timedelta(seconds=30)
    for bad in ("0", "-1", "inf", "ten"):
        monkeypatch.setenv("ATTMASK_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ValueError, match="ATTMASK_DIST_TIMEOUT_MIN"):
            collective_timeout()
