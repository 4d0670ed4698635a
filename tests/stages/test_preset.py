"""The paper's runs in one command each (stages/preset.py, presets/*.yaml)."""
from __future__ import annotations

import json

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


def test_dry_run_prints_the_dvc_command_and_every_value_reads_back(capsys):
    assert preset.main(["imagenet-20pct", "table1-attmask-hint", "--dry-run", "--queue"]) == 0
    command = capsys.readouterr().out.strip()
    assert command.startswith("dvc exp run --queue --name imagenet-20pct+table1-attmask-hint --set-param ")
    assert "--set-param pretrain.min_lr=1.0e-06" in command  # a number for DVC, not the string '1e-06'
    for value in (1e-06, [0.25, 1.0], None, True, "imagefolder", 0.996):
        assert yaml.safe_load(preset.yaml_value(value)) == value


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
