"""Copy the pure-Python packages the GPU machine's image lacks, or holds at another version, into build/gpu_site.

    .venv/bin/python -m bench.gpu_deps     # or: make bench-gpu-deps; then the device call carries build/gpu_site

The lent GPU machine runs its image's python3 (3.12) and packages (torch 2.11,
torchvision, numpy, PIL, yaml, tqdm, safetensors, huggingface_hub, pytest:
/work/.library/device/KINDS.md), never requirements.lock. Carried here:

* webdataset (imported by pipeline.data.shard_writer) and its dependency
  braceexpand: not in the image;
* timm: in the image, but at a version nobody has read; the pipeline's model
  code (pipeline/method/model.py, pos_embed.py: ``_pos_embed``, the blocks'
  attention) is written against the one requirements.lock pins, so that one travels.

All three are pure Python, so the venv's copies work under Python 3.12; their
dist-info travels too, so that version look-ups work. bench/gpu.sh puts the
folder first on PYTHONPATH (only when no .venv is there). build/ is git-ignored,
as the device tool's ``carry`` requires; the carry limit is 64 MiB, with the
working tree (~2 MiB) in it.
"""
from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("webdataset", "braceexpand", "timm")
TARGET = Path("build/gpu_site")
LIMIT_MIB = 48  # of the device call's 64 MiB, the rest for the working tree


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
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in PACKAGES)
    print(f"{len(files)} files, {size / 2**20:.1f} MiB in {TARGET}: {versions} "
          f"(python {sys.version.split()[0]} here; pure Python only)")
    if size > LIMIT_MIB * 2**20:
        sys.exit(f"{TARGET} is over {LIMIT_MIB} MiB: the device call carries at most 64 MiB with the working tree")
