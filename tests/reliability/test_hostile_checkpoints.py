"""Hostile or broken checkpoints and exports: a clear error, and a payload in a pickle never runs."""
from __future__ import annotations

import ast
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.config import params_from_dict
from pipeline.core.distributed import DistContext
from pipeline.evaluation.feature_files import FeatureFileError, load_features as load_eval_features
from pipeline.method.backbone_export import load_backbone, load_backbone_state
from pipeline.method.checkpoint import CheckpointError, load_checkpoint
from pipeline.method.training import Pretrainer, PretrainPaths
from tests.conftest import REPO, tiny_params_dict
from tests.reliability.support import PRETRAIN_OPTIONS, snapshot


class Payload:
    """Unpickling this runs a shell command that creates ``sentinel``."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def malicious_checkpoint(path: Path, sentinel: Path, kind: str) -> Path:
    state = {"format": 1, "epoch": 0, "step": 0, "student": {"w": torch.zeros(2)}, "evil": Payload(sentinel)}
    if kind == "torch.save zip":
        torch.save(state, path)
    else:  # a bare pickle stream, the legacy format torch.load also reads
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


@pytest.mark.parametrize("kind", ["torch.save zip", "raw pickle"])
@pytest.mark.fault_case("checkpoints", "pickle crafted to run a command on load: refused, the command never runs")
def test_malicious_pickle_never_runs(kind, tmp_path):
    sentinel = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "checkpoint.pt", sentinel, kind)
    with pytest.raises(CheckpointError, match=rf"{path}: not a readable checkpoint .*(Unpickl|weights_only)"):
        load_checkpoint(path)
    assert not sentinel.exists()
    # the control: an unrestricted load does run it, so the file really is hostile
    torch.load(path, weights_only=False) if kind == "torch.save zip" else pickle.loads(path.read_bytes())
    assert sentinel.exists()


def trainer(tiny_folder: Path, tiny_shards: Path, models: Path, pretrain: dict | None = None, **sections) -> Pretrainer:
    options = {"epochs": 1, "resume": "auto"} | (pretrain or {})
    params = params_from_dict(tiny_params_dict(tiny_folder, pretrain=options, **sections))
    paths = PretrainPaths.under(tiny_shards, models, models.parent / "reports")
    return Pretrainer(params, paths, torch.device("cpu"), DistContext(), progress_bar=False)


@pytest.mark.fault_case("checkpoints", "malicious checkpoint given to pretrain.resume: refused before any step, never runs, left as found")
def test_resume_from_a_malicious_checkpoint_is_refused(tiny_folder, tiny_shards, tmp_path, integrity):
    sentinel = tmp_path / "pwned"
    models = tmp_path / "models"
    models.mkdir()
    malicious_checkpoint(models / "checkpoint.pt", sentinel, "torch.save zip")
    before = snapshot(models)
    with pytest.raises(CheckpointError, match="checkpoint.pt: not a readable checkpoint"):
        trainer(tiny_folder, tiny_shards, models).fit()
    assert not sentinel.exists()
    integrity.assert_intact("models folder", models, before)


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "a bare tensor", "random bytes"])
@pytest.mark.fault_case("checkpoints", "broken checkpoint on resume: a clear error naming the file, nothing overwritten")
def test_broken_checkpoint_is_a_clear_error(damage, pretrain_reference, tiny_folder, tiny_shards, tmp_path, integrity):
    good = pretrain_reference.checkpoints[(1, 0)]
    models = tmp_path / "models"
    models.mkdir()
    path = models / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "zero bytes":
        path.write_bytes(b"")
    elif damage == "a bare tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    before = snapshot(models)
    with pytest.raises(CheckpointError, match=f"{path}: not a"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint.pt: not a"):
        trainer(tiny_folder, tiny_shards, models).fit()
    integrity.assert_intact("the broken checkpoint is left for inspection, not overwritten", models, before)


@pytest.mark.fault_case("checkpoints", "checkpoint of another architecture on auto resume: set aside (kept) with a notice naming the key; fresh start")
def test_checkpoint_of_another_architecture_is_set_aside_naming_the_key(pretrain_reference, tiny_folder, tiny_shards,
                                                                         tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    theirs = pretrain_reference.checkpoints[(1, 0)]  # embed_dim 32
    (models / "checkpoint.pt").write_bytes(theirs)
    trainer(tiny_folder, tiny_shards, models, model={"embed_dim": 64}).fit()
    assert "model.embed_dim: 32 there, 64 here" in capsys.readouterr().out
    assert (models / "checkpoint.pt.set-aside").read_bytes() == theirs
    assert load_checkpoint(models / "checkpoint.pt")["teacher"]["backbone.vit.cls_token"].shape[-1] == 64


@pytest.mark.fault_case("checkpoints", "checkpoint whose params match but tensors are of another architecture: refused")
def test_checkpoint_with_mismatched_tensors_is_refused(pretrain_reference, tiny_folder, tiny_shards, tmp_path):
    state = load_checkpoint(pretrain_reference.work / "models/pretrain/checkpoint.pt")
    state["student"]["backbone.vit.cls_token"] = torch.zeros(1, 1, 64)
    models = tmp_path / "models"
    models.mkdir()
    torch.save(state, models / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="size mismatch for backbone.vit.cls_token"):
        trainer(tiny_folder, tiny_shards, models, pretrain=PRETRAIN_OPTIONS).fit()


@pytest.mark.parametrize("damage", ["truncated", "other architecture", "random bytes"])
@pytest.mark.fault_case("checkpoints", "broken backbone export (safetensors): a clear error naming the file")
def test_broken_backbone_export_is_a_clear_error(damage, pretrain_reference, tiny_folder, tmp_path):
    params = params_from_dict(tiny_params_dict(tiny_folder))
    path = tmp_path / "backbone.safetensors"
    good = pretrain_reference.outputs["models/pretrain/backbone.safetensors"]
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    else:
        save_file({"cls_token": torch.zeros(1, 1, 64)}, str(path))
    expected = CheckpointError if damage != "other architecture" else RuntimeError
    with pytest.raises(expected, match=str(path)):
        load_backbone(params.model, path)
    if damage != "other architecture":
        with pytest.raises(CheckpointError, match="not a readable safetensors"):
            load_backbone_state(path)


@pytest.mark.fault_case("checkpoints", "features .npz holding a pickled object array: refused, the payload never runs")
def test_pickled_feature_file_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "train.npz"
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(sentinel)
    np.savez(path, features=evil, labels=np.zeros(1, dtype=np.int64), keys=np.array(["a"]))
    with pytest.raises(FeatureFileError, match=f"{path}: not a readable features .npz"):
        load_eval_features(path)
    from pipeline.evaluation.feature_files import load_features

    with pytest.raises(ValueError, match="allow_pickle"):
        load_features(path)
    assert not sentinel.exists()
    with zipfile.ZipFile(path) as archive:  # the control: unpickling the member runs the payload
        np.lib.format.read_array(io.BytesIO(archive.read("features.npy")), allow_pickle=True)
    assert sentinel.exists()


LOADERS = {("torch", "load"): ("weights_only", True), ("np", "load"): ("allow_pickle", False)}


@pytest.mark.fault_case("checkpoints", "every torch.load / np.load in pipeline/ and stages/ refuses pickled code; no pickle.load")
def test_every_loader_in_the_code_is_safe():
    unsafe = []
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                unsafe.append(f"{where}: pickle.{node.func.attr}")
            required = LOADERS.get((owner, node.func.attr))
            if required is not None:
                keywords = {k.arg: k.value for k in node.keywords}
                value = keywords.get(required[0])
                if not (isinstance(value, ast.Constant) and value.value is required[1]):
                    unsafe.append(f"{where}: {owner}.{node.func.attr} without {required[0]}={required[1]}")
    assert not unsafe, unsafe
