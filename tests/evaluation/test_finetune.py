"""Fine-tuning: strict backbone load, layer decay, training moves, determinism, folder data, DDP."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pipeline.core.config import params_from_dict
from pipeline.method.backbone_export import BackboneNotFoundError, load_backbone_state, random_backbone_state
from pipeline.evaluation.finetune import (
    BackboneLoadError,
    Finetuner,
    build_finetune_model,
    build_optimizer,
    head_keys,
    run_finetune,
    set_learning_rate,
    write_finetune_reports,
)
from pipeline.data.shard_reader import open_split
from pipeline.method.backbone_export import save_backbone_safetensors
from pipeline.method.model import backbone_state_dict, build_network
from tests.conftest import REPO, tiny_params_dict, write_tiny_folder

CPU = torch.device("cpu")
FAST = {"epochs": 2, "batch_size": 8, "num_workers": 0, "warmup_epochs": 1}


def make_params(tiny_folder: Path, **finetune):
    return params_from_dict(tiny_params_dict(tiny_folder, finetune={**FAST, **finetune}))


@pytest.fixture(scope="module")
def backbone(tiny_folder, tmp_path_factory) -> Path:
    params = make_params(tiny_folder)
    torch.manual_seed(5)
    teacher = build_network(params.model, drop_path_rate=0.0)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("export") / "backbone.safetensors"
    save_backbone_safetensors(backbone_state_dict(teacher), path)
    return path


def finetuner(params, backbone: Path, shards: Path, variant: str = "pretrained") -> Finetuner:
    state = load_backbone_state(backbone) if variant == "pretrained" else random_backbone_state(params.model, params.seed)
    return Finetuner(params, variant, state, open_split(shards, "train"), open_split(shards, "val"), CPU,
                     progress_bar=False)


def test_loaded_backbone_equals_the_export_and_only_the_head_is_new(tiny_folder, backbone):
    params = make_params(tiny_folder)
    export = load_file(str(backbone))
    model = build_finetune_model(params.model, 3, export, drop_path_rate=0.1, seed=0)
    state = model.state_dict()
    assert head_keys(model) == {"head.weight", "head.bias"}
    assert set(state) - set(export) == {"head.weight", "head.bias"}
    assert set(export) <= set(state)
    for key, value in export.items():
        assert torch.equal(state[key], value), key
    assert state["head.weight"].shape == (3, 32)
    assert torch.count_nonzero(state["head.bias"]) == 0
    assert 0 < state["head.weight"].std() < 0.05  # trunc_normal, std 0.02


def test_backbone_keys_are_checked(tiny_folder, backbone):
    params = make_params(tiny_folder)
    export = load_file(str(backbone))
    missing = {k: v for k, v in export.items() if k != "blocks.0.attn.qkv.weight"}
    with pytest.raises(BackboneLoadError, match=r"missing \['blocks.0.attn.qkv.weight'\]"):
        build_finetune_model(params.model, 3, missing, drop_path_rate=0.0, seed=0)
    extra = dict(export, **{"mask_token": torch.zeros(1, 1, 32)})
    with pytest.raises(BackboneLoadError, match=r"unexpected \['mask_token'\]"):
        build_finetune_model(params.model, 3, extra, drop_path_rate=0.0, seed=0)
    other = params_from_dict(tiny_params_dict(tiny_folder, model={"embed_dim": 64, "num_heads": 2}))
    with pytest.raises(BackboneLoadError, match="do not fit"):
        build_finetune_model(other.model, 3, export, drop_path_rate=0.0, seed=0)


def test_layer_decay_gives_smaller_lr_to_earlier_blocks(tiny_folder, backbone):
    params = make_params(tiny_folder, layer_decay=0.5)
    model = build_finetune_model(params.model, 3, load_file(str(backbone)), drop_path_rate=0.0, seed=0)
    optimizer = build_optimizer(model, params.finetune, base_lr=1e-3)
    set_learning_rate(optimizer, 1e-3)
    lr_of, wd_of = {}, {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            lr_of[id(parameter)], wd_of[id(parameter)] = group["lr"], group["weight_decay"]
    named = dict(model.named_parameters())
    lr = {name: lr_of[id(p)] for name, p in named.items()}
    # timm's grouping, depth 2: embeddings = layer 0, blocks = 1..2 (the final norm goes
    # with the last block), head = layer 3 (scale 1)
    assert lr["head.weight"] == lr["head.bias"] == pytest.approx(1e-3)
    assert lr["blocks.1.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr["norm.weight"] == lr["blocks.1.mlp.fc1.weight"]
    assert lr["blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.25)
    assert lr["patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.125)
    assert lr["pos_embed"] == lr["cls_token"] == lr["patch_embed.proj.weight"]
    assert len(lr_of) == len(named)  # every parameter is optimised
    wd = {name: wd_of[id(p)] for name, p in named.items()}
    assert wd["blocks.0.mlp.fc1.weight"] == wd["head.weight"] == params.finetune.weight_decay
    for name in ("blocks.0.mlp.fc1.bias", "blocks.0.norm1.weight", "norm.bias", "pos_embed", "cls_token", "head.bias"):
        assert wd[name] == 0.0, name


def test_a_few_steps_move_the_loss_the_head_and_the_backbone(tiny_folder, tiny_shards, backbone):
    params = make_params(tiny_folder, lr=0.05, warmup_epochs=0, drop_path_rate=0.0, label_smoothing=0.0)
    tuner = finetuner(params, backbone, tiny_shards)
    images, labels = next(tuner.train_batches(0))
    before = tuner.state_dict()
    losses = [float(tuner.train_step(images, labels, 0, step)) for step in range(4)]
    after = tuner.state_dict()
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    top1, topk, val_loss = tuner.evaluate()
    assert 0.0 <= top1 <= topk == 100.0  # 3 classes: top-3 is every class
    assert val_loss > 0


def test_two_runs_are_identical_and_the_reports_are_written(tiny_folder, tiny_shards, backbone, tmp_path):
    params = make_params(tiny_folder)
    first = run_finetune(params, tiny_shards, backbone, tmp_path / "a", CPU, progress_bar=False)
    second = run_finetune(params, tiny_shards, backbone, tmp_path / "b", CPU, progress_bar=False)
    assert first["metrics"] == second["metrics"]
    for variant in ("pretrained", "random_init"):
        assert (tmp_path / "a" / f"{variant}.safetensors").read_bytes() == \
            (tmp_path / "b" / f"{variant}.safetensors").read_bytes()
        metrics = first["metrics"][variant]
        assert metrics["epochs"] == len(metrics["curve"]) == 2
        assert metrics["top1"] == metrics["curve"][-1]
        assert metrics["best_top1"] == max(metrics["curve"])
        assert metrics["topk"] == 3 and metrics["train_images"] == 36 and metrics["val_images"] == 12
    assert first["metrics"]["pretrained"]["train_loss"] != first["metrics"]["random_init"]["train_loss"]
    weights = load_file(str(tmp_path / "a" / "pretrained.safetensors"))
    assert weights["head.weight"].shape == (3, 32)

    write_finetune_reports(first["metrics"], tmp_path / "reports")
    report = json.loads((tmp_path / "reports" / "finetune.json").read_text())
    assert set(report) == {"pretrained", "random_init"}
    assert {"top1", "top5", "best_top1", "epochs", "curve"} <= set(report["pretrained"])
    with open(tmp_path / "reports" / "finetune_curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert [float(r["random_init"]) for r in rows] == report["random_init"]["curve"]


def test_data_root_folder_is_sharded_and_used(backbone, tmp_path):
    folder = write_tiny_folder(tmp_path / "cifar", classes=4, train=6, val=3, size=20)
    params = params_from_dict(tiny_params_dict(tmp_path / "unused", finetune={
        **FAST, "epochs": 1, "data_root": str(folder)}))
    # 4 classes but the backbone was exported for 3: only the head depends on the classes
    summary = run_finetune(params, tmp_path / "no_pipeline_shards", backbone, tmp_path / "models", CPU,
                           variants=("pretrained",), finetune_shards=tmp_path / "finetune_shards",
                           progress_bar=False)
    manifest = json.loads((tmp_path / "finetune_shards" / "manifest.json").read_text())
    assert manifest["root"] == str(folder)
    assert manifest["totals"]["train"]["selected"] == 24 and manifest["totals"]["val"]["selected"] == 12
    metrics = summary["metrics"]["pretrained"]
    assert summary["num_classes"] == 4
    assert metrics["train_images"] == 24 and metrics["val_images"] == 12 and metrics["topk"] == 4
    assert load_file(str(tmp_path / "models" / "pretrained.safetensors"))["head.weight"].shape == (4, 32)


def write_colour_folder(root: Path) -> Path:
    """Three classes that differ only by colour (plus noise): any working fine-tuning separates them."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (24, 24, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_fine_tuning_learns_an_easy_task(backbone, tmp_path):
    folder = write_colour_folder(tmp_path / "colours")
    params = params_from_dict(tiny_params_dict(tmp_path / "unused", finetune={
        **FAST, "epochs": 3, "lr": 0.01, "data_root": str(folder)}))
    summary = run_finetune(params, tmp_path / "unused", backbone, tmp_path / "models", CPU, variants=("random_init",),
                           finetune_shards=tmp_path / "shards", progress_bar=False)
    metrics = summary["metrics"]["random_init"]
    assert metrics["top1"] == 100.0, metrics
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]


def test_missing_backbone_fails_before_training(tiny_folder, tiny_shards, tmp_path):
    params = make_params(tiny_folder)
    missing = tmp_path / "backbone.safetensors"
    with pytest.raises(BackboneNotFoundError, match=str(missing)):
        run_finetune(params, tiny_shards, missing, tmp_path / "models", CPU, progress_bar=False)
    assert not (tmp_path / "models").exists()


def test_batch_larger_than_the_train_split_names_the_key(tiny_folder, tiny_shards, backbone):
    from pipeline.core.config import ParamsError

    params = make_params(tiny_folder, batch_size=64)
    with pytest.raises(ParamsError, match="finetune.batch_size"):
        finetuner(params, backbone, tiny_shards)


# ----------------------------------------------------------- the stage command
def run_stage(work: Path, *prefix: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ATTMASK_RUNS_DIR=str(work / "runs"))
    env.pop("WORLD_SIZE", None)
    command = [*prefix] if prefix else [sys.executable]
    return subprocess.run([*command, "-m", "stages.finetune"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stage_ddp_two_processes_match_one_process(tiny_folder, tiny_shards, backbone, tmp_path):
    # drop path draws differ by rank, so it is off; everything else is the real run
    sections = {"finetune": {**FAST, "epochs": 1, "drop_path_rate": 0.0, "device": "cpu"}}
    works = []
    for name in ("single", "ddp"):
        work = tmp_path / name
        (work / "data").mkdir(parents=True)
        shutil.copytree(tiny_shards, work / "data" / "shards")
        (work / "models" / "pretrain").mkdir(parents=True)
        shutil.copy(backbone, work / "models" / "pretrain" / "backbone.safetensors")
        (work / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tiny_folder, **sections)))
        works.append(work)
    done = run_stage(works[0])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_stage(works[1], sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = (json.loads((w / "reports" / "eval" / "finetune.json").read_text()) for w in works)
    for variant in ("pretrained", "random_init"):
        assert ddp[variant]["train_loss"] == pytest.approx(single[variant]["train_loss"], rel=1e-4)
        assert ddp[variant]["val_loss"] == pytest.approx(single[variant]["val_loss"], rel=1e-3)
        assert (works[1] / "models" / "finetune" / f"{variant}.safetensors").is_file()
    assert (works[0] / "reports" / "eval" / "finetune_curve.csv").is_file()
