"""Peak memory of a block of code: resident set on CPU, the caching allocator on CUDA."""
from __future__ import annotations

import resource
from pathlib import Path
from types import TracebackType

import torch

MIB = 2**20


def rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in KiB, from /proc/self/status (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def reset_rss_peak() -> bool:
    """Set the kernel's high-water mark VmHWM to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.result()``: MiB before, at peak, and the growth.

    CPU: process RSS (VmHWM reset before the block; without /proc, ``ru_maxrss``,
    which never resets, so the growth is then a lower bound). CUDA: bytes held by
    torch's caching allocator (``max_memory_allocated``), i.e. tensors only.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.before = self.peak = 0.0
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / MIB
            self.method = "torch.cuda.max_memory_allocated"
        elif reset_rss_peak():
            self.before = rss_kib()[0] / 1024
            self.method = "RSS high-water mark (VmHWM, reset before the block)"
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.method = "ru_maxrss (never reset: growth is a lower bound)"
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / MIB
        elif self.method.startswith("RSS"):
            self.peak = rss_kib()[1] / 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def result(self) -> dict[str, float | str]:
        return {"before_mib": self.before, "peak_mib": self.peak, "growth_mib": max(0.0, self.peak - self.before),
                "method": self.method}


def tensor_mib(*objects: object) -> float:
    """MiB of the distinct tensors in modules, optimizers and tensors given (weights, grads, optimiser state)."""
    seen: dict[int, int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for tensor in list(obj.parameters()) + list(obj.buffers()):
                add(tensor)
                add(tensor.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    add(value)
        elif isinstance(obj, torch.Tensor):
            add(obj)
    return sum(seen.values()) / MIB
