"""Performance options of the trainer: pretrain.compile and pretrain.fused_adamw."""
from __future__ import annotations

import json

import pytest
import torch

import pipeline.method.training as training
from pipeline.core.config import ParamsError, params_from_dict
from pipeline.core.distributed import DistContext
from pipeline.method.training import Pretrainer, PretrainPaths
from tests.conftest import tiny_params_dict


def trainer(tiny_folder, tiny_shards, tmp_path, **pretrain) -> Pretrainer:
    raw = tiny_params_dict(tiny_folder, model={"drop_path_rate": 0.0}, pretrain=pretrain)
    paths = PretrainPaths.under(tiny_shards, tmp_path / "models", tmp_path / "reports")
    return Pretrainer(params_from_dict(raw), paths, torch.device("cpu"), DistContext(), progress_bar=False)


def crops_for(t: Pretrainer) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = t.params.augment
    sizes = [a.global_size] * 2 + [a.local_size] * a.local_number
    return [torch.randn(t.local_batch, 3, s, s, generator=generator) for s in sizes]


def test_compile_runs_a_step_like_eager(tiny_folder, tiny_shards, tmp_path, monkeypatch):
    # inductor takes minutes on CPU; aot_eager traces forward and backward through dynamo and AOTAutograd
    monkeypatch.setattr(training, "COMPILE_BACKEND", "aot_eager")
    eager = trainer(tiny_folder, tiny_shards, tmp_path / "eager")
    compiled = trainer(tiny_folder, tiny_shards, tmp_path / "compiled", compile=True)
    crops = crops_for(eager)
    expected = eager.train_step(crops, epoch=0, step=0)
    got = compiled.train_step(crops, epoch=0, step=0)
    assert torch.isfinite(got["loss_total"])
    assert float(got["loss_total"]) == pytest.approx(float(expected["loss_total"]), rel=1e-4)
    # compiled in place: checkpoints keep the eager keys (no _orig_mod. prefix)
    assert compiled.state_dict()["student"].keys() == eager.state_dict()["student"].keys()


def test_compile_is_refused_clearly_without_a_compiler(tiny_folder, tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(training.shutil, "which", lambda _name: None)
    with pytest.raises(ParamsError, match="pretrain.compile.*C\\+\\+ compiler"):
        trainer(tiny_folder, tiny_shards, tmp_path, compile=True)


def test_perf_keys_are_typed(tiny_folder):
    for key, bad in (("compile", "yes"), ("fused_adamw", 1)):
        with pytest.raises(ParamsError, match=f"pretrain.{key}"):
            params_from_dict(tiny_params_dict(tiny_folder, pretrain={key: bad}))


def test_fused_adamw_only_on_cuda_and_not_part_of_the_checkpoint_params(tiny_folder, tiny_shards, tmp_path):
    t = trainer(tiny_folder, tiny_shards, tmp_path, fused_adamw=True)
    assert not t.optimizer.defaults.get("fused")  # CPU: foreach, results unchanged
    # like `device`, these choose kernels, not the maths, but other kernels may round differently: they are
    # part of the run identity, so auto resume never continues a checkpoint made with the other setting
    assert {"compile", "fused_adamw", "device"} <= set(json.loads(t.identity["params"])["pretrain"])
