"""Reproducibility, proven on a tiny config in a temporary copy of the repository.

(a) ``dvc repro --force`` twice gives the same ``dvc.lock``: every stage's
    declared outputs are byte-identical (clock readings live in the undeclared
    ``reports/timing/``).
(b) ``dvc push`` to a local directory remote, a fresh ``git clone`` and
    ``dvc pull`` restore the metrics, reports and models, and ``dvc status`` is
    clean: nothing has to be rerun.
(c) The golden test: every output file's MD5, the checkpoint's whole (its run
    identity hashes exactly the pretrain stage's code deps), equals the one committed in
    ``tests/golden/tiny_pipeline.json`` for this CPU's group
    (:func:`pipeline.core.lock_machine.machine_class`: any Intel CPU, or one
    vendor's family and model), under ``numerics: compatible``. A mismatch names
    the first stage and file that differ and both machines' CPU, ISA, threads and
    libraries; a group without a golden skips, saying so in one line.
    ``ATTMASK_UPDATE_GOLDEN=1`` writes this group's entry instead, after a deliberate change.

Both run the real stages as DVC runs them (``python -m stages.X`` from PATH);
process start-up dominates, hence the tiny params (2 classes x 8 images).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# 2 classes x 8 train / 4 val images of 16 px, a 2-block ViT, one epoch of everything;
# loader workers as in the defaults (a worker process must not change the bytes)
TINY: dict[str, Any] = {
    "numerics": "compatible",  # MKL's Intel-and-AMD branch; the goldens are still kept per CPU group (machine_class)
    "data": {"shard_size": 8, "synthetic": {"num_classes": 2, "train_per_class": 8, "val_per_class": 4, "image_size": 16}},
    "model": {"img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "out_dim": 64, "head_hidden_dim": 64,
              "head_bottleneck_dim": 32},
    "augment": {"global_size": 16, "local_size": 8, "local_number": 2},
    # resume never: a forced rerun really recomputes (auto would continue the finished run: nothing to do)
    "pretrain": {"epochs": 1, "min_steps": 0, "batch_size": 8, "num_workers": 1, "warmup_epochs": 0, "warmup_teacher_temp_epochs": 0,
                 "checkpoint_every": 1, "log_every": 1, "device": "cpu", "resume": "never"},
    "extract": {"batch_size": 16, "num_workers": 1, "device": "cpu"},
    "knn": {"k": [2, 4]},
    "fewshot": {"shots": [1, 2], "draws": 2, "k": 2},
    "linear": {"c_values": [1.0], "cv_folds": 2, "max_iter": 100},
    "finetune": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "num_workers": 0, "device": "cpu"},
}
GOLDEN = REPO / "tests" / "golden" / "tiny_pipeline.json"
# what a collaborator needs after `dvc pull` (git carries the cache: false ones)
RESTORED = ("reports/metrics.json", "reports/eval/knn.json", "reports/eval/finetune.json", "reports/pretrain/steps.csv",
            "models/pretrain/backbone.safetensors", "data/features/pretrained/val.npz", "data/shards/manifest.json")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def run(cwd: Path, *command: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTMASK_")}
    # dvc runs each stage's `python -m stages.X` from PATH: this interpreter's environment first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, str(Path(sys.executable).parent / "dvc"), *args)


def copy_working_files(dest: Path) -> Path:
    """The working tree's files as git sees them (tracked + untracked, not ignored) under ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # deleted but not yet committed files are listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def copy_repository(dest: Path, **sections: dict[str, Any]) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored) in a fresh one-commit repo.

    Its params.yaml is the tiny config, with ``sections`` merged over it.
    """
    copy_working_files(dest)
    params = merge(merge(yaml.safe_load((dest / "params.yaml").read_text()), TINY), sections)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(dest, "git", "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-q", "-m", "tiny copy")
    return dest


def outs_by_stage(lock_text: str) -> dict[str, list[tuple[str, str | None]]]:
    stages = yaml.safe_load(lock_text)["stages"]
    return {name: [(o["path"], o.get("md5")) for o in stage.get("outs", [])] for name, stage in stages.items()}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A tiny copy after two ``dvc repro --force``; the two dvc.lock texts."""
    repo = copy_repository(tmp_path_factory.mktemp("repro") / "repo")
    dvc(repo, "repro", "--force")
    first = (repo / "dvc.lock").read_text()
    dvc(repo, "repro", "--force")
    return repo, first, (repo / "dvc.lock").read_text()


def test_repro_force_twice_gives_identical_outputs(reproduced: tuple[Path, str, str]) -> None:
    repo, first, second = reproduced
    before, after = outs_by_stage(first), outs_by_stage(second)
    assert set(before) >= {"generate", "shard", "pretrain", "extract", "knn", "fewshot", "linear", "finetune", "metrics"}
    changed = {stage: [p for (p, h), (_, h2) in zip(before[stage], after[stage]) if h != h2] for stage in before}
    assert not any(changed.values()), f"outputs differ between two `dvc repro --force`: {changed}"
    assert first == second
    # the clock readings went to the undeclared timing files instead
    timing = json.loads((repo / "reports/timing/pretrain.json").read_text())
    assert timing["images_per_second"] > 0 and timing["machine"]["device"] == "cpu"
    assert (repo / "reports/timing/pretrain_throughput.csv").is_file()


def test_push_clone_pull_restores_results_without_rerunning(reproduced: tuple[Path, str, str], tmp_path: Path) -> None:
    repo, _, _ = reproduced
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "--default", "local", str(remote))
    dvc(repo, "push")
    run(repo, "git", "add", "-A")  # dvc.lock, .dvc/config and the cache: false reports
    run(repo, "git", "commit", "-q", "-m", "results")

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/pretrain/backbone.safetensors").exists()
    dvc(clone, "pull")

    for name in RESTORED:
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    assert json.loads(dvc(clone, "status", "--json") or "{}") == {}, "dvc status is not clean after dvc pull"
    assert not (clone / "runs").exists(), "a stage ran in the clone"


# three epochs with the k-NN curve on (a point per epoch), a checkpoint every step, resume: auto
WITH_CURVE: dict[str, Any] = {"pretrain": {"epochs": 3, "batch_size": 4, "checkpoint_every_steps": 1, "resume": "auto",
                                           "eval_every": 1, "eval_k": 2}}
PRETRAIN_OUTPUTS = ("models/pretrain/checkpoint.pt", "models/pretrain/backbone.safetensors", "reports/pretrain/steps.csv",
                    "reports/pretrain/epochs.csv", "reports/pretrain/log.txt", "reports/pretrain/knn.csv",
                    "reports/pretrain/metrics.json", "dvc.lock")


@pytest.fixture(scope="module")
def trained_with_curve(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A tiny copy after an uninterrupted ``dvc repro pretrain`` (:data:`WITH_CURVE`), and its outputs' bytes."""
    repo = copy_repository(tmp_path_factory.mktemp("curve") / "repo", **WITH_CURVE)
    dvc(repo, "repro", "pretrain")
    outputs = {name: (repo / name).read_bytes() for name in PRETRAIN_OUTPUTS}
    assert len(outputs["reports/pretrain/knn.csv"].splitlines()) == 4, "one k-NN point per epoch, under a header"
    return repo, outputs


def test_a_forced_rerun_of_a_finished_pretrain_is_byte_identical(trained_with_curve) -> None:
    """``dvc repro --force pretrain`` deletes the declared outputs but the checkpoint, finds nothing left to
    train and writes every output again, the k-NN curve included, from the checkpoint."""
    repo, outputs = trained_with_curve
    assert "nothing left to train" in dvc(repo, "repro", "--force", "pretrain")
    for name, expected in outputs.items():
        assert (repo / name).read_bytes() == expected, name


def test_a_killed_pretrain_continues_on_a_plain_dvc_repro(trained_with_curve, tmp_path: Path) -> None:
    """SIGKILL in the middle of pre-training, after the first k-NN point, then a plain ``dvc repro``: it resumes on
    its own (resume: auto), and the outputs, k-NN curve included, and dvc.lock equal an uninterrupted run's."""
    import signal
    import time

    _, outputs = trained_with_curve
    killed = copy_repository(tmp_path / "killed", **WITH_CURVE)
    curve = killed / "reports" / "pretrain" / "knn.csv"
    curve.unlink()  # the committed default run's curve, which DVC would delete only once the stage starts
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTMASK_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "pretrain"], cwd=killed, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300

    def points() -> int:
        return len(curve.read_text().splitlines()) - 1 if curve.is_file() else 0

    while points() < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "pre-training ended before it could be killed"
    assert points() == 1, "killed after the first k-NN point, before the second"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "models" / "pretrain" / "backbone.safetensors").exists(), "killed after the end, not mid-run"
    out = dvc(killed, "repro", "pretrain")
    assert "resuming this run" in out
    for name, expected in outputs.items():
        assert (killed / name).read_bytes() == expected, name


def output_hashes(repo: Path, lock_text: str) -> dict[str, dict[str, str]]:
    """Stage -> output file (relative to the repository) -> MD5, in pipeline order; directories file by file."""
    import hashlib

    found: dict[str, dict[str, str]] = {}
    for stage, outs in outs_by_stage(lock_text).items():
        files: dict[str, str] = {}
        for out, _ in outs:
            path = repo / out
            for item in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if item.is_file():
                    files[item.relative_to(repo).as_posix()] = hashlib.md5(item.read_bytes()).hexdigest()
        found[stage] = files
    return found


def machine_record() -> dict[str, Any]:
    """What can make one machine's bits differ from another's, for the golden test's message."""
    from pipeline.core.tracking import environment, package_versions

    env = environment()
    return {"cpu": env["cpu"], "cpu_family": env["cpu_family"], "cpu_model_number": env["cpu_model_number"],
            "isa": env["isa"], "threads": 2, "numerics": TINY["numerics"], "python": env["python"],
            "lock_sha256": env["lock_sha256"], "packages": package_versions()}


def first_difference(expected: dict[str, dict[str, str]], actual: dict[str, dict[str, str]]) -> str | None:
    """``"stage pretrain, file models/pretrain/checkpoint.pt: md5 ... here, ... in the golden file"`` or None."""
    for stage, files in expected.items():
        got = actual.get(stage)
        if got is None:
            return f"stage {stage}: in the golden file, not in this pipeline"
        for name in sorted(set(files) | set(got)):
            if files.get(name) != got.get(name):
                return (f"stage {stage}, file {name}: md5 {got.get(name, 'missing')} here, "
                        f"{files.get(name, 'missing')} in the golden file")
    extra = [stage for stage in actual if stage not in expected]
    return f"stage {extra[0]}: in this pipeline, not in the golden file" if extra else None


def golden_group() -> str:
    """This CPU's group of machines promised the same bytes (``pipeline.core.lock_machine.machine_class``)."""
    from pipeline.core.lock_machine import machine_class, stage_machine
    from pipeline.core.tracking import machine_info

    return machine_class(stage_machine({"machine": machine_info()}), TINY["numerics"])


def test_golden_the_tiny_pipeline_gives_the_committed_bytes(reproduced: tuple[Path, str, str]) -> None:
    repo, first, _ = reproduced
    actual = output_hashes(repo, first)
    group = golden_group()
    goldens = json.loads(GOLDEN.read_text())["goldens"] if GOLDEN.is_file() else {}
    if os.environ.get("ATTMASK_UPDATE_GOLDEN"):
        goldens[group] = {"machine": machine_record(), "outputs": actual}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"format": 2, "goldens": goldens}, indent=2) + "\n")
        pytest.skip(f"wrote the golden of {group} in {GOLDEN.relative_to(REPO)}")
    if group not in goldens:
        pytest.skip(f"no golden for {group} in {GOLDEN.relative_to(REPO)} (it holds {', '.join(sorted(goldens))}): "
                    "ATTMASK_UPDATE_GOLDEN=1 on such a CPU writes one")
    golden = goldens[group]
    difference = first_difference(golden["outputs"], actual)
    assert difference is None, (
        f"the tiny pipeline's outputs differ from {GOLDEN.relative_to(REPO)}: first difference: {difference}\n"
        f"  golden machine: {json.dumps(golden['machine'], sort_keys=True)}\n"
        f"  this machine:   {json.dumps(machine_record(), sort_keys=True)}\n"
        "After a deliberate change: ATTMASK_UPDATE_GOLDEN=1 pytest tests/test_reproducibility.py -k golden")


def test_golden_mismatch_names_the_first_stage_and_file() -> None:
    expected = {"generate": {"data/a.png": "1"}, "pretrain": {"m/c.pt": "2", "m/d.pt": "3"}}
    assert first_difference(expected, expected) is None
    assert first_difference(expected, {"generate": {"data/a.png": "1"}, "pretrain": {"m/c.pt": "2", "m/d.pt": "4"}}) == (
        "stage pretrain, file m/d.pt: md5 4 here, 3 in the golden file")
    assert first_difference(expected, {"generate": {}, "pretrain": {}}) == (
        "stage generate, file data/a.png: md5 missing here, 1 in the golden file")
    assert first_difference(expected, {**expected, "knn": {}}) == "stage knn: in this pipeline, not in the golden file"
