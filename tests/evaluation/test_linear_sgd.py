"""The official SGD linear probe (pipeline/evaluation/linear_sgd.py, stage `linear_sgd`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.core.config import ParamsError, params_from_dict
from pipeline.data.shard_writer import write_shards
from pipeline.evaluation import linear_sgd as L
from tests.conftest import tiny_params_dict
from tests.reliability.support import run_stage_in_process

# six classes: an untrained head gets them all right with probability 1/720
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 220, 40), (40, 210, 220), (200, 50, 210)]


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory) -> tuple[Path, Path]:
    """A separable toy problem: 6 classes of noisy solid colours, 16 train / 6 val each."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 6)):
        for c, colour in enumerate(COLOURS):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    write_shards(root / "images", root / "shards", seed=0, shard_size=20, workers=0, progress=False)
    return root / "images", root / "shards"


def probe_params(images: Path, **linear_sgd):
    section = {"enabled": True, "variants": ["random_init"], "epochs": 6, "batch_size": 12, "lr": 2.0,
               "n_last_blocks": 2, "num_workers": 0, **linear_sgd}
    return params_from_dict(tiny_params_dict(images, linear_sgd=section))


def run(params, shards: Path, models: Path) -> dict:
    return L.run_linear_sgd(params, shards, models / "missing_backbone.safetensors", models, torch.device("cpu"),
                            progress_bar=False)


def test_it_learns_a_separable_toy_problem(colour_shards, tmp_path):
    images, shards = colour_shards
    untrained = run(probe_params(images, lr=1e-9, epochs=1), shards, tmp_path / "untrained")["random_init"]
    result = run(probe_params(images), shards, tmp_path / "trained")["random_init"]
    assert untrained["top1"] < 50.0  # chance is 16.7
    assert result["best_top1"] == 100.0 and result["top1"] == 100.0
    assert result["train_loss"][-1] < 0.1 * result["train_loss"][0]
    assert result["feature_dim"] == 2 * 32 and result["steps_per_epoch"] == 96 // 12
    assert [epoch for epoch, _ in result["curve"]] == list(range(6))


def test_two_runs_are_bit_identical_and_a_resume_equals_an_uninterrupted_run(colour_shards, tmp_path, monkeypatch):
    images, shards = colour_shards
    params = probe_params(images, epochs=3)
    first = run(params, shards, tmp_path / "a")
    again = run(params, shards, tmp_path / "b")
    assert first == again
    assert (tmp_path / "a" / "random_init.pt").read_bytes() == (tmp_path / "b" / "random_init.pt").read_bytes()

    original = L.LinearSgdProbe.train_epoch

    def crash_in_epoch_two(self, epoch, bar):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return original(self, epoch, bar)

    monkeypatch.setattr(L.LinearSgdProbe, "train_epoch", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(params, shards, tmp_path / "c")
    monkeypatch.setattr(L.LinearSgdProbe, "train_epoch", original)
    resumed = run(params, shards, tmp_path / "c")
    assert resumed == first
    assert (tmp_path / "c" / "random_init.pt").read_bytes() == (tmp_path / "a" / "random_init.pt").read_bytes()


def test_a_checkpoint_of_another_run_is_not_resumed(colour_shards, tmp_path, capsys):
    images, shards = colour_shards
    run(probe_params(images, epochs=2, lr=1.0), shards, tmp_path)
    result = run(probe_params(images, epochs=2), shards, tmp_path)
    assert "is from another run; starting from scratch" in capsys.readouterr().out
    assert result == run(probe_params(images, epochs=2), shards, tmp_path / "fresh")


def test_the_schedule_is_cosine_annealing_to_zero_stepped_per_epoch():
    head = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.4, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5, eta_min=0)
    for epoch in range(5):
        assert L.cosine_lr(0.4, 5, epoch) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_the_head_starts_as_the_official_one():
    head = L.LinearClassifier(1536, 1000, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(head.linear.bias) == 0
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.01)


def test_bad_settings_name_the_key(colour_shards, tmp_path):
    images, _ = colour_shards
    with pytest.raises(ParamsError, match="linear_sgd.n_last_blocks"):
        probe_params(images, n_last_blocks=3)  # the tiny model has 2 blocks
    with pytest.raises(ParamsError, match="linear_sgd.variants"):
        probe_params(images, variants=["pixels"])
    params = probe_params(images, n_last_blocks=3, enabled=False)  # off: the model's depth is not checked
    assert not params.linear_sgd.enabled


def test_the_stage_writes_enabled_false_when_off_and_the_summary_when_on(colour_shards, tmp_path):
    images, shards = colour_shards
    for enabled in (False, True):
        work = tmp_path / str(enabled)
        (work / "data").mkdir(parents=True)
        (work / "data" / "shards").symlink_to(shards)
        raw = tiny_params_dict(images, linear_sgd={"enabled": enabled, "variants": ["random_init"], "epochs": 2,
                                                   "batch_size": 12, "n_last_blocks": 2, "num_workers": 0})
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        run_stage_in_process(work, "linear_sgd")
        written = json.loads((work / "reports" / "eval" / "linear_sgd.json").read_text())
        assert written["enabled"] is enabled and (work / "models" / "linear_sgd").is_dir()
        assert ("random_init" in written) is enabled


@pytest.mark.slow
def test_two_torchrun_processes_train_the_same_probe_as_one(colour_shards, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    images, shards = colour_shards
    section = {"enabled": True, "variants": ["random_init"], "epochs": 3, "batch_size": 12, "lr": 2.0,
               "n_last_blocks": 2, "num_workers": 0}
    results = {}
    for name, prefix in (("single", [sys.executable]),
                         ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        work = tmp_path / name
        (work / "data").mkdir(parents=True)
        (work / "data" / "shards").symlink_to(shards)
        (work / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(images, linear_sgd=section)))
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        env.pop("WORLD_SIZE", None)
        done = subprocess.run([*prefix, "-m", "stages.linear_sgd"], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads((work / "reports" / "eval" / "linear_sgd.json").read_text())["random_init"]
    single, ddp = results["single"], results["ddp"]
    # each rank sees half of every global batch; the averaged gradient is the same up to float rounding
    assert ddp["curve"] == single["curve"] and ddp["steps_per_epoch"] == single["steps_per_epoch"]
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
