"""The thread count (params.yaml `threads`) reaches torch and the BLAS / OpenMP pools (pipeline/core/numerics.py)."""
from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from pipeline.core.config import ParamsError, params_from_dict
from pipeline.core.numerics import limit_threads


def test_limit_threads_sets_torch_and_blas():
    before = torch.get_num_threads()
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] in ("blas", "openmp"))
    finally:
        limit_threads(before)


def test_threads_is_a_checked_param():
    assert params_from_dict({}).threads == 2
    with pytest.raises(ParamsError) as error:
        params_from_dict({"threads": 0})
    assert error.value.key == "threads"
