"""How many threads the numerical libraries compute with: a param, because it can change the bits.

A reduction split over 2 threads adds in another order than over 4, so the
thread count is part of what a result depends on: ``params.yaml``'s ``threads``,
listed as a param of every stage that computes (dvc.yaml), and recorded in each
stage's run record. :func:`limit_threads` applies it to torch's intra-op pool
and, through threadpoolctl, to the BLAS and OpenMP pools that NumPy, SciPy and
scikit-learn use.
"""
from __future__ import annotations

from typing import Any

_limits: Any = None  # threadpoolctl's limiter, kept alive for the life of the process


def limit_threads(threads: int) -> None:
    """Compute with ``threads`` threads in torch, BLAS and OpenMP for the rest of this process."""
    global _limits
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    _limits = threadpool_limits(limits=threads)
