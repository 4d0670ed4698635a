"""Faults: SIGKILL of pretrain / shard / extract, a dying or frozen DDP rank, a NaN loss.

Kill points are drawn from a seeded generator (the same every run) and hit
exactly: the stage process sends itself SIGKILL there (tests/reliability/kill_runner.py).
"""
from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import params_from_dict
from pipeline.core.files import restore_moved_aside
from pipeline.data.shard_reader import open_split
from pipeline.method.backbone_export import load_backbone_state, random_backbone_state, save_backbone_safetensors
from pipeline.method.checkpoint import CheckpointError, load_checkpoint
from pipeline.method.loss import IBOTLoss
from pipeline.method.training import NonFiniteLossError
from tests.conftest import tiny_params_dict
from tests.reliability.support import (PRETRAIN_OPTIONS, PRETRAIN_OUTPUTS, free_port, run_killed,
                                       run_stage_in_process, snapshot, stage_env)
from tests.method.test_training import stage_workdir

RNG_SEED = 7  # kill points: random, but the same in every run


def assert_final_outputs_match(integrity, work: Path, reference) -> None:
    for name in PRETRAIN_OUTPUTS:
        integrity.assert_same(name, work / name, reference.outputs[name])


# ------------------------------------------------------------------- pretrain
@pytest.mark.slow
@pytest.mark.fault_case("faults", "SIGKILL pretrain mid-epoch, half-way through a checkpoint write, in the last epoch; resume after each")
def test_sigkill_pretrain_at_three_points_then_resume_is_byte_identical(pretrain_reference, tiny_folder, tiny_shards,
                                                                         tmp_path, integrity):
    ref = pretrain_reference
    steps = ref.steps_per_epoch
    rng = random.Random(RNG_SEED)
    mid, write, last = rng.randint(1, steps - 2), rng.randint(1, steps - 1), rng.randint(1, steps - 1)
    work = stage_workdir(tmp_path, tiny_folder, tiny_shards, pretrain=dict(PRETRAIN_OPTIONS, resume="auto"))
    models = work / "models" / "pretrain"
    checkpoint = models / "checkpoint.pt"

    # 1. mid-epoch 0: the checkpoint is the one written after the previous step, byte for byte
    run_killed(work, "pretrain", "step", "0", str(mid))
    integrity.assert_same(f"checkpoint after SIGKILL at epoch 0 step {mid}", checkpoint, ref.checkpoints[(0, mid)])

    # 2. half-way through writing checkpoint (1, write): writes of this run are (0, mid+1) .. (0, steps-1), (1, 0), (1, 1) ..
    nth = (steps - 1 - mid) + 1 + write
    run_killed(work, "pretrain", "checkpoint_write", str(nth))
    integrity.assert_same(f"checkpoint after SIGKILL while writing (1, {write})", checkpoint,
                          ref.checkpoints[(1, write - 1)])
    partial = sorted(models.glob(".checkpoint.pt.*.tmp"))
    assert len(partial) == 1, "the kill should have left the half-written temporary file"
    assert 0 < partial[0].stat().st_size < len(ref.checkpoints[(1, write)])
    with pytest.raises(CheckpointError):  # it really is half a checkpoint, and it is not the checkpoint
        load_checkpoint(partial[0])

    # 3. in the last epoch
    run_killed(work, "pretrain", "step", "2", str(last))
    integrity.assert_same(f"checkpoint after SIGKILL at epoch 2 step {last}", checkpoint, ref.checkpoints[(2, last)])

    # resume to the end: checkpoint, exports and metrics equal the uninterrupted run's
    run_stage_in_process(work, "pretrain")
    assert_final_outputs_match(integrity, work, ref)


@pytest.mark.fault_case("faults", "NaN injected into the loss: stops naming the step, last good checkpoint intact and resumable")
def test_nan_loss_stops_naming_the_step_and_resume_is_byte_identical(pretrain_reference, tiny_folder, tiny_shards,
                                                                      tmp_path, integrity, monkeypatch):
    ref = pretrain_reference
    steps = ref.steps_per_epoch
    global_step = random.Random(RNG_SEED + 1).randint(1, 3 * steps - 2)
    epoch, step = divmod(global_step, steps)
    work = stage_workdir(tmp_path, tiny_folder, tiny_shards, pretrain=dict(PRETRAIN_OPTIONS, resume="auto"))
    original = IBOTLoss.forward
    calls = {"n": 0}

    def nan_at_the_chosen_step(self, *args, **kwargs):
        calls["n"] += 1
        losses = original(self, *args, **kwargs)
        if calls["n"] == global_step + 1:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(IBOTLoss, "forward", nan_at_the_chosen_step)
    with pytest.raises(NonFiniteLossError, match=rf"epoch {epoch} step {step} \(global step {global_step}\)"):
        run_stage_in_process(work, "pretrain")
    integrity.assert_same(f"checkpoint before the NaN step {global_step}", work / "models/pretrain/checkpoint.pt",
                          ref.checkpoints[(epoch, step)])
    monkeypatch.setattr(IBOTLoss, "forward", original)
    run_stage_in_process(work, "pretrain")
    assert_final_outputs_match(integrity, work, ref)


# ---------------------------------------------------------------------- shard
def shard_workdir(root: Path, images: Path, **data: object) -> Path:
    root.mkdir(parents=True)
    raw = tiny_params_dict(images)
    raw["data"].update(data)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.mark.slow
@pytest.mark.fault_case("faults", "SIGKILL shard mid-shard: previous shards intact, the partial ones never readable, rerun byte-identical")
def test_sigkill_shard_keeps_the_previous_output_and_rerun_is_identical(tiny_folder, tmp_path, integrity):
    reference = shard_workdir(tmp_path / "reference", tiny_folder)
    run_stage_in_process(reference, "shard")
    work = shard_workdir(tmp_path / "work", tiny_folder, shard_size=7)  # a previous, different generation
    run_stage_in_process(work, "shard")
    previous = snapshot(work / "data" / "shards")
    (work / "params.yaml").write_text((reference / "params.yaml").read_text())

    sample = random.Random(RNG_SEED + 2).randint(12, 19)  # inside the second train shard of 10
    run_killed(work, "shard", "sample", str(sample))
    integrity.assert_intact("previous data/shards", work / "data" / "shards", previous)
    assert len(open_split(work / "data" / "shards", "train")) == 36
    [partial] = (work / "data").glob(".shards.tmp-*")
    assert sorted(p.name for p in partial.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(FileNotFoundError, match="no shard manifest"):  # the manifest is written last
        open_split(partial, "train")

    run_stage_in_process(work, "shard")
    integrity.assert_intact("rerun data/shards equals an uninterrupted run", work / "data" / "shards",
                            snapshot(reference / "data" / "shards"))
    assert not list((work / "data").glob(".shards.*")), "the rerun removes what the killed run left"


@pytest.mark.slow
@pytest.mark.fault_case("faults", "SIGKILL shard between the two renames of the folder swap: previous shards put back, rerun byte-identical")
def test_sigkill_between_the_swap_renames_puts_the_previous_shards_back(tiny_folder, tmp_path, integrity):
    reference = shard_workdir(tmp_path / "reference", tiny_folder)
    run_stage_in_process(reference, "shard")
    work = shard_workdir(tmp_path / "work", tiny_folder, shard_size=7)
    run_stage_in_process(work, "shard")
    shards = work / "data" / "shards"
    previous = snapshot(shards)
    (work / "params.yaml").write_text((reference / "params.yaml").read_text())

    run_killed(work, "shard", "swap")
    assert not shards.exists() and len(list((work / "data").glob(".shards.old-*"))) == 1

    assert restore_moved_aside(shards) == shards
    integrity.assert_intact("previous data/shards put back", shards, previous)
    assert not list((work / "data").glob(".shards.old-*"))
    run_stage_in_process(work, "shard")
    integrity.assert_intact("rerun data/shards equals an uninterrupted run", shards, snapshot(reference / "data" / "shards"))
    assert not list((work / "data").glob(".shards.*")), "the rerun removes what the killed run left"


# -------------------------------------------------------------------- extract
def extract_workdir(root: Path, tiny_folder: Path, tiny_shards: Path, backbone_seed: int) -> Path:
    """Shards, params and a backbone export (random weights from ``backbone_seed``) for the extract stage."""
    raw = tiny_params_dict(tiny_folder, extract={"batch_size": 8, "num_workers": 0, "device": "cpu"})
    (root / "models" / "pretrain").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copytree(tiny_shards, root / "data" / "shards")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    save_backbone_safetensors(random_backbone_state(params_from_dict(raw).model, backbone_seed),
                              root / "models" / "pretrain" / "backbone.safetensors")
    return root


@pytest.mark.slow
@pytest.mark.fault_case("faults", "SIGKILL extract while writing features: previous feature sets intact, never mixed, rerun byte-identical")
def test_sigkill_extract_keeps_whole_feature_sets_and_rerun_is_identical(tiny_folder, tiny_shards, tmp_path, integrity):
    reference = extract_workdir(tmp_path / "reference", tiny_folder, tiny_shards, backbone_seed=2)
    run_stage_in_process(reference, "extract")
    work = extract_workdir(tmp_path / "work", tiny_folder, tiny_shards, backbone_seed=1)
    run_stage_in_process(work, "extract")  # the previous generation, from another backbone
    previous = snapshot(work / "data" / "features")
    backbone = work / "models" / "pretrain" / "backbone.safetensors"
    backbone.write_bytes((reference / "models" / "pretrain" / "backbone.safetensors").read_bytes())
    load_backbone_state(backbone)

    # 3 variants x 3 arrays per split: arrays 10-18 are the val files, written after every train file
    array = random.Random(RNG_SEED + 3).randint(10, 18)
    run_killed(work, "extract", "array", str(array))
    integrity.assert_intact("previous data/features (every variant's train and val)", work / "data" / "features", previous)
    staged = sorted((work / "data").glob(".features.*.tmp-*"))
    assert len(staged) == 3 and all((s / "train.npz").is_file() for s in staged)  # new files, not yet visible

    run_stage_in_process(work, "extract")
    integrity.assert_intact("rerun data/features equals an uninterrupted run", work / "data" / "features",
                            snapshot(reference / "data" / "features"))
    integrity.assert_same("reports/eval/extract.json", work / "reports/eval/extract.json",
                          (reference / "reports/eval/extract.json").read_bytes())
    assert not list((work / "data").glob(".features.*")), "the rerun removes what the killed run left"


# ------------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.fault_case("faults", "DDP under torchrun: rank 1 of 2 SIGKILLed mid-training; the job stops with an error, checkpoint loads")
def test_torchrun_rank_killed_stops_the_job(tiny_folder, tiny_shards, tmp_path):
    work = stage_workdir(tmp_path, tiny_folder, tiny_shards, pretrain={"epochs": 2, "checkpoint_every_steps": 1, "log_every": 1})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.reliability.kill_runner", "pretrain", "step", "1", "1"]
    try:  # the timeout is the hang detector, not a speed requirement
        done = subprocess.run(command, cwd=work, env=stage_env(work, KILL_RANK="1"), capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not stop within 300 s after rank 1 was killed (the job hangs)")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    # torchrun names the killed rank as the root cause and stops rank 0 (SIGTERM, or its collective fails)
    assert re.search(r"rank\s*:\s*1\b[^\n]*\n\s*exitcode\s*:\s*-9", output), output[-3000:]
    state = load_checkpoint(work / "models" / "pretrain" / "checkpoint.pt")  # rank 0's last checkpoint is whole
    assert (1, 0) <= (state["epoch"], state["step"]) <= (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"], ids=["dead rank", "frozen rank"])
@pytest.mark.fault_case("faults", "DDP without an agent: the other rank's collective fails (at once / after ATTMASK_DIST_TIMEOUT_MIN) instead of hanging")
def test_surviving_rank_errors_instead_of_hanging(tmp_path, fault):
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "KILL_RANK": "1", "KILL_SIGNAL": fault, "ATTMASK_DIST_TIMEOUT_MIN": "0.15"}
    processes = [
        subprocess.Popen([sys.executable, "-m", "tests.reliability.kill_runner", "collective"], cwd=tmp_path,
                         env=stage_env(tmp_path, RANK=str(rank), LOCAL_RANK=str(rank), **env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        output, _ = processes[0].communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 still waits 180 s after rank 1 stopped (a hang)")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.communicate()
    assert "rank 0: first all-reduce [2.0, 2.0, 2.0, 2.0]" in output, output[-3000:]
    assert processes[0].returncode == 3, output[-3000:]
    assert "rank 0: second all-reduce failed" in output
    if fault == "SIGSTOP":
        assert "Timed out" in output or "timeout" in output.lower(), output[-3000:]
