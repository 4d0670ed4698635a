"""Shared fixtures: a tiny image folder, its shards and a tiny training config."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import Params, params_from_dict
from pipeline.data.shard_writer import build_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def torch_switches_restored():
    """Undo what an in-process ``run_stage`` sets for the whole process (oneDNN, NNPACK, threads).

    Without it, a test calling ``run_stage`` changes how every later in-process
    run computes, and byte comparisons with subprocesses depend on test order.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    saved = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled(), torch.get_num_threads()
    yield
    torch.backends.mkldnn.enabled = saved[0]
    torch.backends.nnpack.set_flags(saved[1])
    torch.set_num_threads(saved[2])


def write_tiny_folder(root: Path, classes: int = 3, train: int = 12, val: int = 4, size: int = 24) -> Path:
    """An ImageNet-layout folder of random-noise PNGs (content does not matter here)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def tiny_params_dict(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A CPU-second-sized configuration; ``sections`` override keys per section."""
    raw: dict[str, Any] = {
        "data": {"source": "imagefolder", "root": str(root), "shard_size": 10},
        "model": {"patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "out_dim": 64,
                  "head_hidden_dim": 64, "head_bottleneck_dim": 32},
        "augment": {"global_size": 16, "local_size": 8, "local_number": 2},
        "masking": {"strategy": "attmask_high"},
        # the paper's recipe (EMA centring, no KoLeo), as the tests' expected values were computed with
        # min_steps 0: epochs mean what they say on these few images (tests of min_steps set it themselves)
        "pretrain": {"epochs": 2, "min_steps": 0, "batch_size": 8, "num_workers": 0, "warmup_epochs": 1, "lr": 5e-4,
                     "momentum_teacher": 0.99, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 1,
                     "centering": "ema", "koleo_weight": 0.0, "eval_every": 0, "checkpoint_every": 1, "log_every": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def tiny_shards(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    params: Params = params_from_dict(tiny_params_dict(tiny_folder))
    out = tmp_path_factory.mktemp("shards") / "shards"
    build_shards(params.data, params.seed, out, workers=1, progress=False)
    return out
