"""Pre-training: determinism, resume, DDP equivalence, failure handling, exports."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.config import ParamsError, params_from_dict
from pipeline.core.distributed import DistContext, resolve_device
from pipeline.core.strategies import MASKING_STRATEGIES
from pipeline.method.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.method.loss import IBOTLoss
from pipeline.method.training import NonFiniteLossError, first_difference, Pretrainer, PretrainPaths, pretrain, validate_for_world
from tests.conftest import REPO, tiny_params_dict


def run(tiny_folder: Path, tiny_shards: Path, out: Path, **sections):
    params = params_from_dict(tiny_params_dict(tiny_folder, **sections))
    paths = PretrainPaths.under(tiny_shards, out / "models", out / "reports")
    summary = pretrain(params, paths, torch.device("cpu"), DistContext(), progress_bar=False)
    return params, paths, summary


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_every_strategy_trains_with_finite_loss(strategy, tiny_folder, tiny_shards, tmp_path):
    _, paths, summary = run(tiny_folder, tiny_shards, tmp_path, masking={"strategy": strategy, "prob": 1.0},
                            pretrain={"epochs": 1})
    assert summary["steps"] == 36 // 8
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    # every image masked: the share of masked tokens is near the mean ratio 0.3 (block covers <= N)
    assert 0.1 < summary["masked_share"] < 0.45
    assert paths.checkpoint.is_file()


def test_rerun_is_bit_identical(tiny_folder, tiny_shards, tmp_path):
    _, first, _ = run(tiny_folder, tiny_shards, tmp_path / "a")
    _, second, _ = run(tiny_folder, tiny_shards, tmp_path / "b")
    for name in ("checkpoint", "backbone_pth", "backbone_safetensors"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes(), name


def test_batched_photometric_trains_the_same_for_any_worker_count(tiny_folder, tiny_shards, tmp_path):
    _, inline, summary = run(tiny_folder, tiny_shards, tmp_path / "a", augment={"photometric": "batched"},
                             pretrain={"epochs": 1, "num_workers": 0})
    _, pooled, _ = run(tiny_folder, tiny_shards, tmp_path / "b", augment={"photometric": "batched"},
                       pretrain={"epochs": 1, "num_workers": 2})
    _, per_image, _ = run(tiny_folder, tiny_shards, tmp_path / "c", pretrain={"epochs": 1, "num_workers": 0})
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert inline.backbone_pth.read_bytes() == pooled.backbone_pth.read_bytes()
    assert inline.backbone_pth.read_bytes() != per_image.backbone_pth.read_bytes()  # the param reaches the loader


def test_different_seed_gives_different_weights(tiny_folder, tiny_shards, tmp_path):
    _, first, _ = run(tiny_folder, tiny_shards, tmp_path / "a", pretrain={"epochs": 1})
    params = params_from_dict(tiny_params_dict(tiny_folder, pretrain={"epochs": 1}) | {"seed": 1})
    second = PretrainPaths.under(tiny_shards, tmp_path / "b" / "models", tmp_path / "b" / "reports")
    pretrain(params, second, torch.device("cpu"), DistContext(), progress_bar=False)
    assert first.backbone_pth.read_bytes() != second.backbone_pth.read_bytes()


@pytest.mark.parametrize("photometric", ["per_image", "batched"])
def test_crash_then_resume_equals_uninterrupted(photometric, tiny_folder, tiny_shards, tmp_path, monkeypatch):
    augment = {"photometric": photometric}
    _, reference, _ = run(tiny_folder, tiny_shards, tmp_path / "reference", augment=augment)

    original_step = Pretrainer.train_step
    calls = {"n": 0}

    def crash_at_step_six(self, crops, epoch, step):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-epoch 1 (4 steps per epoch); last checkpoint after step 4
            raise RuntimeError("simulated crash")
        return original_step(self, crops, epoch, step)

    monkeypatch.setattr(Pretrainer, "train_step", crash_at_step_six)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_folder, tiny_shards, tmp_path / "resumed", pretrain={"checkpoint_every_steps": 2}, augment=augment)
    saved = load_checkpoint(tmp_path / "resumed" / "models" / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (1, 0)
    monkeypatch.setattr(Pretrainer, "train_step", original_step)

    _, resumed, summary = run(tiny_folder, tiny_shards, tmp_path / "resumed",
                              pretrain={"resume": "auto", "checkpoint_every_steps": 2}, augment=augment)
    assert summary["resumed"]
    assert resumed.checkpoint.read_bytes() == reference.checkpoint.read_bytes()
    assert resumed.backbone_safetensors.read_bytes() == reference.backbone_safetensors.read_bytes()


def test_mid_epoch_resume_equals_uninterrupted(tiny_folder, tiny_shards, tmp_path, monkeypatch):
    _, reference, _ = run(tiny_folder, tiny_shards, tmp_path / "reference")
    original_step = Pretrainer.train_step
    calls = {"n": 0}

    def crash(self, crops, epoch, step):
        calls["n"] += 1
        if calls["n"] == 4:  # checkpoint after step 3 (epoch 0, step 3) is mid-epoch
            raise RuntimeError("simulated crash")
        return original_step(self, crops, epoch, step)

    monkeypatch.setattr(Pretrainer, "train_step", crash)
    with pytest.raises(RuntimeError):
        run(tiny_folder, tiny_shards, tmp_path / "resumed", pretrain={"checkpoint_every_steps": 3})
    saved = load_checkpoint(tmp_path / "resumed" / "models" / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    monkeypatch.setattr(Pretrainer, "train_step", original_step)
    _, resumed, _ = run(tiny_folder, tiny_shards, tmp_path / "resumed", pretrain={"resume": "auto"})
    assert resumed.checkpoint.read_bytes() == reference.checkpoint.read_bytes()


def test_a_checkpoint_of_another_run_is_set_aside_never_resumed(tiny_folder, tiny_shards, tmp_path, capsys):
    _, paths, _ = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1})
    theirs = paths.checkpoint.read_bytes()
    _, paths, _ = run(tiny_folder, tiny_shards, tmp_path, masking={"strategy": "block"}, pretrain={"epochs": 1})
    assert "masking.strategy: 'attmask_high' there, 'block' here" in capsys.readouterr().out
    assert (paths.checkpoint.parent / "checkpoint.pt.set-aside").read_bytes() == theirs  # kept, not lost
    fresh = tmp_path / "fresh"
    _, reference, _ = run(tiny_folder, tiny_shards, fresh, masking={"strategy": "block"}, pretrain={"epochs": 1})
    assert paths.checkpoint.read_bytes() == reference.checkpoint.read_bytes()  # trained from scratch


def test_never_starts_from_scratch_and_auto_resumes_its_own_finished_run(tiny_folder, tiny_shards, tmp_path, capsys):
    _, paths, first = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1})
    done = paths.checkpoint.read_bytes()
    _, paths, again = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1})  # auto: nothing left to train
    assert again["resumed"] and paths.checkpoint.read_bytes() == done
    _, paths, scratch = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1, "resume": "never"})
    assert not scratch["resumed"] and paths.checkpoint.read_bytes() == done
    assert not (paths.checkpoint.parent / "checkpoint.pt.set-aside").exists()


def test_first_difference_names_the_key_code_data_or_torch():
    base = {"params": '{"pretrain": {"lr": 0.004}, "seed": 0}', "code": "c", "data": "d", "torch": "2.14.1"}
    assert first_difference(base, dict(base)) is None
    assert first_difference(base, base | {"params": '{"pretrain": {"lr": 0.002}, "seed": 0}'}) == \
        "pretrain.lr: 0.004 there, 0.002 here"
    assert first_difference(base, base | {"code": "x"}) == "the pipeline's code changed"
    assert first_difference(base, base | {"data": "x"}) == "the shards changed (their manifest differs)"
    assert first_difference(base, base | {"torch": "2.15.0"}) == "torch 2.14.1 there, 2.15.0 here"
    assert "older checkpoint format" in first_difference(None, base)


def test_resume_from_a_checkpoint_with_foreign_tensors_names_the_file(tiny_folder, tiny_shards, tmp_path):
    _, paths, _ = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1})
    state = load_checkpoint(paths.checkpoint)
    name = next(iter(state["student"]))
    state["student"][name] = torch.zeros(3, 1, 7)  # same params, tensor of another shape
    save_checkpoint(state, paths.checkpoint)
    with pytest.raises(CheckpointError, match=str(paths.checkpoint)):
        run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1, "resume": "auto"})


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_folder, tiny_shards, tmp_path, monkeypatch):
    original_forward = IBOTLoss.forward
    calls = {"n": 0}

    def nan_on_sixth_call(self, *args, **kwargs):
        calls["n"] += 1
        losses = original_forward(self, *args, **kwargs)
        if calls["n"] == 6:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(IBOTLoss, "forward", nan_on_sixth_call)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 1 \(global step 5\)"):
        run(tiny_folder, tiny_shards, tmp_path, pretrain={"log_every": 1})
    good = load_checkpoint(tmp_path / "models" / "checkpoint.pt")
    assert (good["epoch"], good["step"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in good["student"].values())


def test_exported_backbone_loads_strict_into_timm(tiny_folder, tiny_shards, tmp_path):
    params, paths, _ = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 1})
    for state in (torch.load(paths.backbone_pth, weights_only=True), load_file(paths.backbone_safetensors)):
        model = timm.create_model(params.model.arch, num_classes=0, **params.model.timm_shape())
        model.load_state_dict(state, strict=True)
    teacher = load_checkpoint(paths.checkpoint)["teacher"]
    assert torch.equal(state["cls_token"], teacher["backbone.vit.cls_token"])


def test_world_size_checks_name_the_key(tiny_folder):
    params = params_from_dict(tiny_params_dict(tiny_folder))
    with pytest.raises(ParamsError, match="pretrain.batch_size"):
        validate_for_world(params, DistContext(rank=0, world_size=3))
    with pytest.raises(ParamsError, match="pretrain.batch_size"):
        validate_for_world(params, DistContext(rank=0, world_size=16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_names_the_key():
    with pytest.raises(ParamsError, match="pretrain.device"):
        resolve_device("cuda")


# ----------------------------------------------------------- the stage command
def stage_workdir(tmp_path: Path, tiny_folder: Path, tiny_shards: Path, **sections) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copytree(tiny_shards, work / "data" / "shards")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tiny_folder, **sections)))
    return work


def stage_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_stage(work: Path, *prefix: str) -> subprocess.CompletedProcess:
    command = [*prefix] if prefix else [sys.executable]
    return subprocess.run([*command, "-m", "stages.pretrain"], cwd=work, env=stage_env(),
                          capture_output=True, text=True, timeout=600)


def first_step_loss(work: Path) -> float:
    with open(work / "reports" / "pretrain" / "steps.csv") as handle:
        return float(next(csv.DictReader(handle))["loss_total"])


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_folder, tiny_shards, tmp_path):
    options = {"epochs": 3, "checkpoint_every_steps": 1, "log_every": 1}
    reference = stage_workdir(tmp_path / "reference", tiny_folder, tiny_shards, pretrain=options)
    done = run_stage(reference)
    assert done.returncode == 0, done.stderr[-3000:]

    work = stage_workdir(tmp_path / "killed", tiny_folder, tiny_shards, pretrain=options)
    checkpoint = work / "models" / "pretrain" / "checkpoint.pt"
    process = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=work, env=stage_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.is_file() and load_checkpoint(checkpoint)["epoch"] >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = load_checkpoint(checkpoint)  # never half-written: it loads
    assert (state["epoch"], state["step"]) < (3, 0), "the run finished before it could be killed"

    options_resume = dict(options, resume="auto")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tiny_folder, pretrain=options_resume)))
    resumed = run_stage(work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint.read_bytes() == (reference / "models" / "pretrain" / "checkpoint.pt").read_bytes()
    for name in ("steps.csv", "epochs.csv", "metrics.json"):
        assert (work / "reports" / "pretrain" / name).read_bytes() == (reference / "reports" / "pretrain" / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("strategy, photometric", [("attmask_high", "per_image"), ("block", "batched")])
def test_ddp_two_cpu_processes_match_one_process_on_the_first_step(strategy, photometric, tiny_folder, tiny_shards,
                                                                    tmp_path):
    # drop-path draws differ by rank, so it is off here; everything else is the real run. block: each rank's
    # loader draws the global batch's masks and takes its own rows (AttMask gathers the attention instead)
    sections = {"model": {"drop_path_rate": 0.0}, "pretrain": {"epochs": 1, "log_every": 1},
                "masking": {"strategy": strategy}, "augment": {"photometric": photometric}}
    single = stage_workdir(tmp_path / "single", tiny_folder, tiny_shards, **sections)
    done = run_stage(single)
    assert done.returncode == 0, done.stderr[-3000:]

    ddp = stage_workdir(tmp_path / "ddp", tiny_folder, tiny_shards, **sections)
    done = run_stage(ddp, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert first_step_loss(ddp) == pytest.approx(first_step_loss(single), rel=1e-5)


def test_knn_during_training_leaves_the_weights_unchanged_and_is_kept_in_the_checkpoint(tiny_folder, tiny_shards, tmp_path):
    _, plain, _ = run(tiny_folder, tiny_shards, tmp_path / "a")
    _, watched, summary = run(tiny_folder, tiny_shards, tmp_path / "b", pretrain={"eval_every": 1})
    for name in ("backbone_pth", "backbone_safetensors"):
        assert getattr(plain, name).read_bytes() == getattr(watched, name).read_bytes(), name
    without, with_curve = torch.load(plain.checkpoint, weights_only=False), torch.load(watched.checkpoint, weights_only=False)
    for part in ("student", "teacher", "loss"):
        assert all(torch.equal(without[part][k], with_curve[part][k]) for k in without[part]), part
    assert without["knn"].shape == (0, 3)
    assert with_curve["knn"].tolist() == [list(map(float, row)) for row in summary["knn_during_training"]]
    rows = list(csv.DictReader((watched.reports / "knn.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["knn_top1"]) <= 100.0 for r in rows)
    assert [row[0] for row in summary["knn_during_training"]] == [1, 2]
    assert not (plain.reports / "knn.csv").exists()


def test_the_export_loads_by_name_in_timm_and_log_txt_has_one_line_per_epoch(tiny_folder, tiny_shards, tmp_path):
    """The artifacts users expect: a timm model folder (config.json) and the official log.txt."""
    import json

    import timm

    from pipeline.method.backbone_export import load_backbone
    from pipeline.method.training import write_training_records

    params, paths, summary = run(tiny_folder, tiny_shards, tmp_path, pretrain={"epochs": 2})
    ours = load_backbone(params.model, paths.backbone_safetensors).eval()
    by_name = timm.create_model(f"local-dir:{paths.timm_folder}", pretrained=True).eval()
    overlay = timm.create_model(params.model.arch, pretrained=True, num_classes=0, dynamic_img_size=True,
                                pretrained_cfg_overlay={"file": str(paths.backbone_safetensors)},
                                **params.model.timm_shape()).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_name(images), ours(images)) and torch.equal(overlay(images), ours(images))
    config = json.loads((paths.timm_folder / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16] and config["model_args"]["embed_dim"] == 32
    history = load_checkpoint(paths.checkpoint)["history"].tolist()
    write_training_records(summary, history, paths.reports)
    lines = [json.loads(line) for line in (paths.reports / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert set(lines[0]) == {"train_loss", "train_cls", "train_patch", "train_lr", "train_wd", "epoch"}


def test_the_run_identity_holds_threads_and_numerics_but_not_data_verify(tiny_folder):
    """A checkpoint computed with other threads or numerics rounds differently: never resumed as this run's own."""
    from pipeline.core.config import params_from_dict
    from pipeline.method.training import run_identity

    def identity(verify: str = "index", **top):
        raw = {**tiny_params_dict(tiny_folder), **top}
        raw["data"]["verify"] = verify
        return json.loads(run_identity(params_from_dict(raw), tiny_folder)["params"])

    base = identity()
    assert base["threads"] == 2 and base["numerics"] == "portable" and "verify" not in base["data"]
    assert identity(threads=1) != base and identity(numerics="native") != base
    assert identity(verify="full") == base


def official_clip_gradients(model: torch.nn.Module, clip: float) -> None:
    """The DINO/iBOT reference, as written there: per parameter, scaled when clip / (norm + 1e-6) < 1."""
    for p in model.parameters():
        if p.grad is not None:
            clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def test_clip_gradients_is_the_official_per_parameter_clip_bit_for_bit():
    import copy

    from pipeline.method.training import clip_gradients

    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1 + i % 5, 3 + i % 7)) for i in range(64)])
    model[5].requires_grad_(False)  # no gradient: skipped
    for i, p in enumerate(model):
        if p.requires_grad:  # norms log-spread over ~0.01 .. ~1000 around max_norm 3
            p.grad = torch.randn(p.shape) * 10.0 ** (5 * i / 64 - 2)
    norms = [float(p.grad.norm()) for p in model.parameters() if p.grad is not None]
    assert min(norms) < 3.0 < max(norms)  # some clipped, some not
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()  # deepcopy leaves gradients behind
    official_clip_gradients(reference, 3.0)
    clip_gradients(model, 3.0)
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if q.grad is not None]
    assert len(pairs) == len(norms) and all(torch.equal(g, h) for g, h in pairs)
    assert all(float(g.norm()) == pytest.approx(min(3.0, n), rel=1e-5) for (g, _), n in zip(pairs, norms))


def test_block_and_random_masks_come_with_the_batch_as_the_step_would_draw_them(tiny_folder, tiny_shards, tmp_path, monkeypatch):
    raw = tiny_params_dict(tiny_folder, masking={"strategy": "block"}, augment={"photometric": "batched"})
    trainer = Pretrainer(params_from_dict(raw), PretrainPaths.under(tiny_shards, tmp_path / "m", tmp_path / "r"),
                         torch.device("cpu"), DistContext(), progress_bar=False)
    grid = (4, 4)  # 16 px global crops, 4 px patches
    for epoch in (0, 1):
        for step, batch in enumerate(trainer.batches(epoch, 1), start=1):  # from a resume point
            expected = torch.cat([trainer.masks_for(c, epoch, step, None, grid) for c in range(2)])
            assert batch.masks is not None and torch.equal(batch.masks, expected), (epoch, step)
    # and the weights: drawn in the loader or in the step, the same bytes
    _, loader_drawn, _ = run(tiny_folder, tiny_shards, tmp_path / "loader", masking={"strategy": "block"})
    monkeypatch.setattr(Pretrainer, "step_masks", lambda self, epoch: None)
    _, step_drawn, _ = run(tiny_folder, tiny_shards, tmp_path / "step", masking={"strategy": "block"})
    assert loader_drawn.backbone_pth.read_bytes() == step_drawn.backbone_pth.read_bytes()


def test_knn_while_training_extracts_on_the_training_device_with_the_stages_workers(tiny_folder, tiny_shards, tmp_path,
                                                                                     monkeypatch):
    import pipeline.evaluation.extract as extract

    raw = tiny_params_dict(tiny_folder, pretrain={"num_workers": 3})
    trainer = Pretrainer(params_from_dict(raw), PretrainPaths.under(tiny_shards, tmp_path / "m", tmp_path / "r"),
                         torch.device("cpu"), DistContext(), progress_bar=False)
    calls = []
    monkeypatch.setattr(extract, "extract_split", lambda split, extractors, **kwargs: calls.append(kwargs))
    assert trainer.evaluate_knn() is None
    assert [(c["num_workers"], c["device"]) for c in calls] == [(3, torch.device("cpu"))] * 2
