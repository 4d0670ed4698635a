"""Where a benchmark ran (CPU, GPU, versions, and the provenance of its numbers) and what that device can do at
best (peak FLOP/s)."""
from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.core.tracking import cpu_model
from pipeline.reporting import provenance
from bench.stats import summarize

PACKAGES = ("torch", "torchvision", "timm", "webdataset", "numpy", "pillow", "scikit-learn")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. First match wins,
# so the specific names come before the generic ones. H100 "80GB HBM3" is the SXM part.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("GB200",), 2500.0, "GB200 (per GPU)"),
    (("B200",), 2250.0, "B200 SXM"),
    (("H200",), 989.4, "H200 SXM"),
    (("H100", "NVL"), 835.5, "H100 NVL"),
    (("H100", "PCIE"), 756.5, "H100 PCIe"),
    (("H100",), 989.4, "H100 SXM"),
    (("A100",), 312.0, "A100"),
    (("L40S",), 362.1, "L40S"),
    (("L4",), 121.0, "L4"),
    (("A10",), 125.0, "A10"),
)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            module = {"pillow": "PIL", "scikit-learn": "sklearn"}.get(name, name)
            version = getattr(__import__(module), "__version__", None) if _importable(module) else None
            versions[name] = version or "not installed"
    versions["cuda"] = torch.version.cuda or "none"
    return versions


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def machine_info() -> dict[str, Any]:
    """CPU model, logical/usable CPUs, torch threads, memory, GPU (name, memory, count), versions and provenance.

    ``provenance``: :func:`pipeline.reporting.provenance.record` over the benchmark
    code and the pipeline inputs, taken when the benchmark runs, so that bench.md
    (and the README's freshness line) can later say which commit and machine a
    figure came from and whether its code has changed since.
    """
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "gpu": None,
        "packages": package_versions(),
        "provenance": provenance.record(inputs=provenance.BENCH_INPUTS, params_sha=provenance.params_sha_of(),
                                        threads=torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                       "memory_gib": props.total_memory / 2**30, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count}
    return info


def gpu_peak_tflops(name: str) -> tuple[float | None, str]:
    """(datasheet dense bf16 TFLOP/s, which part it was matched to) for a CUDA device name, or (None, reason)."""
    upper = name.upper()
    for needles, tflops, label in GPU_BF16_PEAK_TFLOPS:
        if all(n in upper for n in needles):
            return tflops, f"{label} datasheet, dense bf16"
    return None, f"no datasheet peak known for {name!r}"


class MatmulProbe:
    """FLOP/s of a square ``size`` matmul (2 n^3 per product): the practical peak of a device and dtype.

    Random inputs (zeros run faster on some GPUs), three operand sets rotated so
    repeats do not reuse one cached result. Each call times one sample of
    ``per_sample`` products, so a benchmark can interleave it with its own work.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                 per_sample: int = 3):
        self.device, self.dtype, self.size, self.per_sample = torch.device(device), dtype, size, per_sample
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.operands = [torch.randn(size, size, generator=generator).to(device=self.device, dtype=dtype) for _ in range(3)]
        self.out = torch.empty(size, size, device=self.device, dtype=dtype)
        torch.mm(self.operands[0], self.operands[1], out=self.out)  # warm-up: kernels, threads

    def __call__(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for i in range(self.per_sample):
            torch.mm(self.operands[i % 3], self.operands[(i + 1) % 3], out=self.out)
        _sync(self.device)
        return 2 * self.size**3 * self.per_sample / (time.perf_counter() - start) / 1e12

    def describe(self, samples: list[float]) -> dict[str, Any]:
        return {"tflops": summarize(samples), "size": self.size, "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "threads": torch.get_num_threads()}


def measure_matmul_tflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                          repeats: int = 5, per_sample: int = 3) -> dict[str, Any]:
    """Median of ``repeats`` :class:`MatmulProbe` samples."""
    probe = MatmulProbe(device, dtype, size, per_sample)
    return probe.describe([probe() for _ in range(repeats)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(device: torch.device | str, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """The peak MFU is measured against: datasheet bf16 on a known GPU, else the measured matmul rate.

    On CPU there is no meaningful datasheet figure for a shared virtual machine,
    so the practical peak is a large float32 matmul measured on the spot.
    """
    device = torch.device(device)
    if device.type == "cuda":
        tflops, source = gpu_peak_tflops(torch.cuda.get_device_name(device))
        if tflops is not None:
            return {"tflops": tflops, "source": source, "dtype": "bfloat16"}
        if measured is not None:
            return {"tflops": measured["tflops"]["median"], "source": f"measured bf16 matmul ({source})", "dtype": "bfloat16"}
        raise ValueError(source)
    measured = measured or measure_matmul_tflops(device)
    return {"tflops": measured["tflops"]["median"], "dtype": "float32",
            "source": f"measured float32 {measured['size']}^3 matmul, {measured['threads']} threads"}
