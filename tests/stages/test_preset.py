"""The paper's runs in one command each (stages/preset.py, presets/*.yaml)."""
from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from pipeline.core.config import params_from_dict
from pipeline.reporting.compare import apply_overrides
from pipeline.reporting.paper import PAPER_TABLE
from stages import preset
from tests.conftest import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
COMBINATIONS = [["imagenet-20pct"], ["imagenet-20pct", "imagenet-100pct"], ["imagenet-20pct", "share-5"],
                ["imagenet-20pct", "share-10"]] + [["imagenet-20pct", f"table1-{row}"] for row in
                                                   ("block", "random", "random-75", "attmask-low", "attmask-hint", "attmask-high")]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def params_of(names):
    return params_from_dict(apply_overrides(BASE, preset.overrides_of(names)))


def test_every_preset_file_is_used_by_a_combination():
    assert {name for combo in COMBINATIONS for name in combo} == set(preset.available())


@pytest.mark.parametrize("names", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_each_paper_run_validates_as_a_whole_params_file(names):
    params = params_of(names)
    assert params.model.arch == "vit_small_patch16_224" and params.augment.global_size == 224
    assert params.data.subset == "first" and params.augment.blur == "absolute"
    assert params.pretrain.centering == "ema" and params.pretrain.koleo_weight == 0.0
    if names[-1].startswith("table1-"):
        masking = params.masking
        assert (masking.strategy, masking.ratio, masking.ratio_var) in PAPER_TABLE  # one of the paper's rows
        assert masking.ratio_per == ("batch" if masking.strategy.startswith("attmask") else "image")
    assert params.masking.block_rule == "official"  # iBOT's block loop, as the official code
    assert params.fewshot.draw == "slices"  # the official low-shot protocol


def test_full_imagenet_and_data_share_change_what_the_paper_changes():
    full = params_of(["imagenet-20pct", "imagenet-100pct"])
    assert full.data.per_class is None and full.augment.local_number == 10 and full.pretrain.momentum_teacher == 0.996
    share = params_of(["imagenet-20pct", "share-5"])
    assert share.data.per_class is None and share.data.percent == 5


def test_dry_run_prints_the_changes_and_the_dvc_command_and_every_value_reads_back(capsys):
    before = (REPO / "params.yaml").read_bytes()
    assert preset.main(["imagenet-20pct", "table1-attmask-hint", "--dry-run", "--queue", "-S", "data.root=/data/in1k"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "dvc exp run --queue --name imagenet-20pct+table1-attmask-hint"
    assert "params.yaml: pretrain.min_lr: 1.0e-06" in lines  # a number for PyYAML, not the string '1e-06'
    assert "params.yaml: data.root: /data/in1k" in lines and "params.yaml: masking.strategy: attmask_hint" in lines
    assert (REPO / "params.yaml").read_bytes() == before  # a dry run writes nothing
    for value in (1e-06, [0.25, 1.0], None, True, "imagefolder", 0.996):
        assert yaml.safe_load(preset.yaml_value(value)) == value


def test_params_yaml_keeps_its_comments_and_every_float_reads_back_as_a_number():
    """`dvc exp run -S` wrote 1.0e-06 back as 1e-06, a string to PyYAML: the paper's run stopped in `generate`
    with "pretrain.min_lr: expected a number, got '1e-06'". The preset now writes params.yaml itself."""
    text = (REPO / "params.yaml").read_text()
    assert preset.updated_params_text(text, {}) == text  # nothing set, nothing changed: comments, layout, order
    overrides = preset.merged_overrides(["imagenet-20pct"], ["pretrain.lr=1e-4", "pretrain.min_lr=1e17", "knn.k=[10, 20]",
                                                            "model.depth=null", "data.root=/data/in1k"])
    updated = preset.updated_params_text(text, overrides)
    preset.check_reads_back(updated, overrides)
    raw = yaml.safe_load(updated)
    assert raw["pretrain"]["lr"] == 1e-4 and raw["pretrain"]["min_lr"] == 1e17 and raw["model"]["depth"] is None
    assert "  min_lr: 1.0e+17" in updated and "  k: [10, 20]\n" in updated
    assert len(text.splitlines()) == len(updated.splitlines())  # one line per key, as before
    changed = [(old, new) for old, new in zip(text.splitlines(), updated.splitlines()) if old != new]
    assert 0 < len(changed) <= len(overrides)
    for old, new in changed:  # the key's own line, its comment kept
        assert old.split(":")[0] == new.split(":")[0], (old, new)
        if "#" in old:
            assert new.endswith(old[old.index("#"):]), (old, new)
    # a params.yaml DVC rewrote (YAML 1.2: 1e-06) reads as numbers here, and is repaired when written
    dvc_written = text.replace("min_lr: 1.0e-06", "min_lr: 1e-06")
    assert preset.read_params_text(dvc_written)["pretrain"]["min_lr"] == 1e-06
    assert yaml.safe_load(preset.updated_params_text(dvc_written, {}))["pretrain"]["min_lr"] == 1e-06


def test_a_run_writes_params_yaml_then_runs_dvc_and_a_queued_one_puts_it_back(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "small.yaml").write_text("pretrain.min_lr: 1.0e-07\nknn.k: [5]\n")
    original = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(preset, "dvc", lambda *args: seen.append((args, (tmp_path / "params.yaml").read_text())))
    assert preset.main(["small", "-S", "seed=3"]) == 0
    (args, during), = seen
    assert args == ("exp", "run", "--name", "small")
    assert yaml.safe_load(during)["pretrain"]["min_lr"] == 1e-07 and yaml.safe_load(during)["seed"] == 3
    assert (tmp_path / "params.yaml").read_text() == during  # the workspace keeps the run's params, as dvc exp run -S
    (tmp_path / "params.yaml").write_text(original)
    assert preset.main(["small", "--queue", "--name", "q"]) == 0
    assert seen[-1][0] == ("exp", "run", "--queue", "--name", "q") and yaml.safe_load(seen[-1][1])["knn"]["k"] == [5]
    assert (tmp_path / "params.yaml").read_text() == original  # the queued experiment took its own copy

    def failing(*args):
        raise subprocess.CalledProcessError(255, ["dvc", *args])

    monkeypatch.setattr(preset, "dvc", failing)
    assert preset.main(["small", "--queue"]) == 255  # dvc printed why; no traceback on top
    assert (tmp_path / "params.yaml").read_text() == original


def test_a_bad_set_param_is_one_line_and_status_2(capsys):
    for entry, message in (("pretrain.lr", "expected key=value"), ("masking.ratio=2.0", "masking.ratio"),
                           ("knn.k=[1,", "not valid YAML"), ("pretrain.nope=1", "pretrain.nope")):
        assert preset.main(["imagenet-20pct", "--dry-run", "-S", entry]) == 2
        err = capsys.readouterr().err
        assert err.startswith("preset: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_an_unknown_preset_or_a_bad_value_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    assert preset.main(["nope", "--dry-run"]) == 2
    assert "'nope' not found; available:" in capsys.readouterr().err
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "bad.yaml").write_text("masking.ratio: 2.0\n")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert preset.main(["bad", "--dry-run"]) == 2
    assert "masking.ratio" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("names", [["imagenet-20pct", "table1-block"], ["imagenet-20pct", "imagenet-100pct"]],
                         ids=["20pct+block", "100pct"])
def test_dvc_resolves_every_stage_of_a_paper_run(names, tiny_folder, tmp_path):
    """The preset's params file is one DVC accepts: every stage resolves (data.root templated) and is due to run.

    ``dvc status``, not ``dvc repro --dry``: a dry run stops at the first stage whose inputs do not exist yet.
    """
    from pipeline.core.config import set_dotted
    from tests.test_reproducibility import copy_repository, dvc

    repo = copy_repository(tmp_path / "repo")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in preset.overrides_of(names):
        key, _, value = item.partition("=")
        set_dotted(raw, key, yaml.safe_load(value))
    set_dotted(raw, "data.root", str(tiny_folder))  # the ImageNet folder's stand-in
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = json.loads(dvc(repo, "status", "--json"))
    # metrics merges the committed eval JSONs, which exist: due only once the stages before it have run
    due = {"shard", "pretrain", "extract", "knn", "fewshot", "linear", "finetune", "report"}
    assert set(status) >= due, status
    changed = [entry["changed deps"].get("params.yaml", {}) for entry in status["pretrain"] if "changed deps" in entry]
    assert changed and changed[0].get("model") == "modified", status["pretrain"]  # the ViT-S/16 of the preset
