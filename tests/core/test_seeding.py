"""Derived seeds and generators (pipeline/core/seeding.py): pure functions of their parts."""
from __future__ import annotations

import hashlib
import os

import torch

from pipeline.core.seeding import derive_seed, make_generator


def test_derive_seed_is_sha256_of_the_parts_text():
    expected = int.from_bytes(hashlib.sha256(b"0/epoch/3").digest()[:8], "little") >> 1
    assert derive_seed(0, "epoch", 3) == expected
    assert 0 <= derive_seed(0, "epoch", 3) < 2**63


def test_neighbouring_parts_give_unrelated_seeds():
    assert derive_seed(0, 1) != derive_seed(1, 0)
    assert derive_seed(0, 1) == derive_seed("0/1")  # parts are joined as text: a documented property
    assert len({derive_seed(0, step) for step in range(1000)}) == 1000


def test_generators_from_the_same_parts_draw_the_same_numbers():
    a = torch.rand(5, generator=make_generator(7, "masks", 2))
    b = torch.rand(5, generator=make_generator(7, "masks", 2))
    c = torch.rand(5, generator=make_generator(7, "masks", 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_configure_determinism_turns_on_deterministic_kernels(monkeypatch):
    from pipeline.core.seeding import configure_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        configure_determinism()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what cuBLAS needs to be deterministic
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
