"""Copy the pure-Python packages the GPU machine's image lacks into build/gpu_site (carried by the device call).

    .venv/bin/python -m bench.gpu_deps     # or: make bench-gpu-deps

The GPU image has torch, timm, torchvision, numpy, PIL, yaml, tqdm and
safetensors (/work/.library/device/KINDS.md) but not webdataset (imported by
pipeline.data.shard_writer) nor its dependency braceexpand. Both are pure Python, so the
venv's copies work there under its Python 3.12; their dist-info travels too so
that version look-ups work. build/ is git-ignored, as `carry` requires.
"""
from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("webdataset", "braceexpand")
TARGET = Path("build/gpu_site")


def copy_packages(target: Path = TARGET, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    copied = []
    for name in packages:
        distribution = metadata.distribution(name)
        for file in distribution.files or []:
            source = Path(distribution.locate_file(file))
            top = Path(file).parts[0]
            if top.endswith(".dist-info") or top == f"{name}.py" or top == name:
                destination = target / file
                destination.parent.mkdir(parents=True, exist_ok=True)
                if source.is_file() and "__pycache__" not in Path(file).parts:
                    shutil.copy2(source, destination)
                    copied.append(destination)
    return copied


if __name__ == "__main__":
    files = copy_packages()
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size / 2**20:.1f} MiB in {TARGET} (python {sys.version.split()[0]} here; pure Python only)")
