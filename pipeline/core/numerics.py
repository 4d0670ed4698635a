"""CPU numerics that a result depends on: the thread count, and which ISA the numerical libraries use.

Two things change the bits of a CPU result besides params, data and code:

- **Threads.** A reduction split over 2 threads adds in another order than over
  4. ``params.yaml``'s ``threads`` is a param of every stage that computes;
  :func:`limit_threads` applies it to torch and, through threadpoolctl, to the
  BLAS and OpenMP pools of NumPy, SciPy and scikit-learn.
- **ISA dispatch.** Each library picks its kernels from the instructions the
  CPU has: AVX-512 sums 16 floats at a time where AVX2 sums 8, AMX tiles a
  matrix product differently, MKL blocks GEMMs by cache size. So two CPU
  generations give different bits. ``params.yaml``'s ``numerics`` (one of
  :data:`NUMERICS_MODES`) decides:

  - ``portable`` (default) pins ATen, OpenBLAS and NumPy to AVX2, which every
    x86-64 CPU of the last decade has, and MKL to its AVX-512 branch: the
    environment of :data:`PORTABLE_ENV`, plus torch's oneDNN and NNPACK
    kernels off (:func:`configure_numerics`), whose blocking follows the cache
    sizes even at a fixed ISA. MKL honours a branch on Intel CPUs only (the
    AVX-512 one on Intel Xeons): elsewhere it falls back to its own choice
    (:func:`mkl_branch` tells, and the stage log says so).
  - ``compatible``: portable with MKL's SSE2 branch, the one MKL documents as
    identical on Intel and AMD alike; a pre-training step takes ~3x as long.
  - ``native`` leaves every library free: fastest, identical only on the same
    CPU model.

  ``bench/bench_numerics.py`` measures what each control changes and costs.

The controls are read when a library loads, so they must be in the environment
before Python starts: :func:`ensure_numerics` re-executes the process with
them when they are not (``stages/__init__.py`` does this before torch loads).
This module imports nothing heavy at import time.
"""
from __future__ import annotations

import os
import sys
from typing import Any

NUMERICS_MODES = ("portable", "compatible", "native")

# Each library's own dispatch switch, pinned to the AVX2 level (read once, when the library loads).
PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",         # torch's vectorised kernels (reductions, softmax, GELU, AdamW)
    # torch's GEMMs: MKL's reproducible mode, fixed blocking. AVX512, not AVX2: MKL honours either branch on Intel
    # only (AMD gets its AUTO branch either way), and AVX2 made the embedded pre-training step 1.39x slower, not 1.1x
    "MKL_CBWR": "AVX512,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",          # oneDNN, should a kernel still reach it
    "OPENBLAS_CORETYPE": "Haswell",        # NumPy / SciPy / scikit-learn GEMMs (OpenBLAS's AVX2 kernels)
    "NPY_ENABLE_CPU_FEATURES": "X86_V3",   # NumPy's own SIMD loops: the AVX2 (x86-64-v3) targets only
}
COMPATIBLE_ENV: dict[str, str] = {**PORTABLE_ENV, "MKL_CBWR": "COMPATIBLE,STRICT"}
CONTROLS = tuple(PORTABLE_ENV)
# mkl_cbwr_get's answers (mkl_cbwr.h), and its STRICT bit
_MKL_BRANCHES = {0: "off", 1: "off", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 8: "SSE4_2", 9: "AVX", 10: "AVX2",
                 12: "AVX512", 14: "AVX512_E1", 16: "AVX512_E2", 17: "AVX512_E3", 18: "AVX512_E4", 19: "AVX512_E5"}
_MKL_STRICT = 0x10000
_REEXEC_MARK = "ATTMASK_NUMERICS_REEXEC"  # set on the re-executed process: a second mismatch is a bug, not a loop

_limits: Any = None  # threadpoolctl's limiter, kept alive for the life of the process


def limit_threads(threads: int) -> None:
    """Compute with ``threads`` threads in torch, BLAS and OpenMP for the rest of this process."""
    global _limits
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    _limits = threadpool_limits(limits=threads)


def numerics_env(mode: str) -> dict[str, str]:
    """The dispatch controls that ``mode`` sets (``native``: none: every library picks)."""
    if mode not in NUMERICS_MODES:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS_MODES)}, got {mode!r}")
    return {"portable": dict(PORTABLE_ENV), "compatible": dict(COMPATIBLE_ENV), "native": {}}[mode]


def current_env() -> dict[str, str]:
    """The dispatch controls set in this process's environment."""
    return {name: os.environ[name] for name in CONTROLS if name in os.environ}


def ensure_numerics(mode: str) -> None:
    """Return if this process runs with ``mode``'s controls; else re-execute it with them (never returns).

    The same command line, interpreter and working directory, with the controls
    of :func:`numerics_env` set and every other control removed.
    """
    wanted = numerics_env(mode)
    if current_env() == wanted:
        os.environ.pop(_REEXEC_MARK, None)  # children (dvc exp, loaders) start with a clean slate
        return
    if os.environ.get(_REEXEC_MARK):
        raise RuntimeError(f"numerics: {mode} controls still differ after re-executing: {current_env()} != {wanted}")
    env = {k: v for k, v in os.environ.items() if k not in CONTROLS}
    env.update(wanted, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure_numerics(mode: str) -> str | None:
    """In-process part of ``mode``; returns a one-line warning when MKL did not take the asked branch.

    Outside ``native``, torch's convolutions and GELU stay off oneDNN and NNPACK,
    whose kernels pick their blocking from the cache sizes, which differ between
    CPUs of the same ISA; they run on ATen's kernels and MKL's GEMM instead,
    both pinned by the environment. (On this pipeline's ViT, oneDNN off costs
    little once NNPACK is off too: NNPACK would take the patch embedding.)
    """
    import torch

    native = not numerics_env(mode)
    torch.backends.mkldnn.enabled = native
    torch.backends.nnpack.set_flags(native)
    asked = os.environ.get("MKL_CBWR", "").split(",")[0]
    got = mkl_branch()
    if asked and got is not None and got["branch"] != asked:
        return (f"numerics: {mode}: MKL ignores MKL_CBWR={asked} on this CPU and uses its {got['branch']} branch "
                f"(MKL documents {asked} for Intel CPUs only), so matrix products may differ from an Intel "
                "machine's; numerics: compatible is identical on both")
    return None


def mkl_branch() -> dict[str, Any] | None:
    """The code branch torch's MKL computes with (``{"branch", "strict"}``); None without MKL.

    Asked after one small matrix product, so that MKL has read ``MKL_CBWR``.
    """
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = library.mkl_serv_cbwr_get
    except (OSError, AttributeError):  # another build: MKL inside, but not its CNR functions
        return None
    torch.ones(8, 8) @ torch.ones(8, 8)
    value = get(-1)
    return {"branch": _MKL_BRANCHES.get(value & 0xFFFF, str(value & 0xFFFF)), "strict": bool(value & _MKL_STRICT)}


def describe_numerics() -> dict[str, Any]:
    """What this process computes with: the mode its controls match, the controls, torch's CPU ISA and oneDNN."""
    env = current_env()
    mode = next((m for m in NUMERICS_MODES if numerics_env(m) == env), "custom")
    info: dict[str, Any] = {"mode": mode, "env": env}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    onednn=bool(torch.backends.mkldnn.enabled), nnpack=bool(torch._C._get_nnpack_enabled()),
                    mkl=mkl_branch())
    return info
