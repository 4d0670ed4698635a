"""dvc.yaml lists, per stage, exactly the params that can change its outputs: the researcher's daily loop.

A key left out (config.NOT_OUTPUT_KEYS) must not change a byte of what the stage
writes: each one is run both ways here on a tiny config. Changing it then reruns
nothing, which is what dvc.yaml promises by leaving it out.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import (
    NOT_OUTPUT_KEYS, DataConfig, ExtractConfig, FinetuneConfig, LinearSgdConfig, PretrainConfig,
)
from tests.conftest import REPO, tiny_params_dict
from tests.reliability.support import run_stage_in_process, snapshot

SECTIONS = {"pretrain": PretrainConfig, "extract": ExtractConfig, "finetune": FinetuneConfig,
            "linear_sgd": LinearSgdConfig}
PRETRAIN = {"epochs": 2, "eval_every": 1, "eval_k": 3}
OUTPUTS = {
    "pretrain": ("models/pretrain/checkpoint.pt", "models/pretrain/backbone.safetensors", "models/pretrain/backbone.pth",
                 "reports/pretrain"),
    "extract": ("data/features", "reports/eval/extract.json"),
    "finetune": ("models/finetune", "reports/eval/finetune.json", "reports/eval/finetune_curve.csv"),
    "linear_sgd": ("models/linear_sgd", "reports/eval/linear_sgd.json"),
}


def stage_params(stage: str) -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]


@pytest.mark.parametrize("section", SECTIONS)
def test_dvc_yaml_lists_every_key_but_the_ones_that_never_change_outputs(section):
    listed = {p.split(".", 1)[1] for p in stage_params(section) if isinstance(p, str) and p.startswith(f"{section}.")}
    assert section not in stage_params(section), f"dvc.yaml: stage {section} depends on the whole {section} section"
    every = {f.name for f in dataclasses.fields(SECTIONS[section])}
    assert listed == every - NOT_OUTPUT_KEYS[section], (
        f"stage {section}: classify every {section} key, either in dvc.yaml params or in config.NOT_OUTPUT_KEYS")


def workdir(root: Path, tiny_folder: Path, tiny_shards: Path, **sections) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copytree(tiny_shards, root / "data" / "shards")
    sections.setdefault("pretrain", {})
    sections["pretrain"] = {**PRETRAIN, **sections["pretrain"]}
    sections.setdefault("finetune", {})
    sections["finetune"] = {"epochs": 1, "batch_size": 8, "num_workers": 0, **sections["finetune"]}
    sections["linear_sgd"] = {"enabled": True, "variants": ["pretrained"], "epochs": 2, "batch_size": 8,
                              "n_last_blocks": 2, "num_workers": 0, **sections.get("linear_sgd", {})}
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tiny_folder, **sections)))
    return root


def outputs(work: Path, stage: str) -> dict[str, bytes]:
    found = {}
    for name in OUTPUTS[stage]:
        found.update({f"{name}/{k}".rstrip("/"): v for k, v in snapshot(work / name).items()})
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_folder, tiny_shards) -> Path:
    """Every stage under test, run once with the tiny defaults."""
    work = workdir(tmp_path_factory.mktemp("reference"), tiny_folder, tiny_shards)
    for stage in ("pretrain", "extract", "finetune", "linear_sgd"):
        run_stage_in_process(work, stage)
    return work


CASES = [
    ("pretrain", {"num_workers": 1}),
    ("pretrain", {"log_every": 3}),
    ("pretrain", {"checkpoint_every": 2}),
    ("pretrain", {"checkpoint_every_steps": 2}),
    ("pretrain", {"resume": "never"}),
    ("extract", {"num_workers": 1}),
    ("extract", {"batch_size": 3}),
    ("finetune", {"num_workers": 1}),
    ("linear_sgd", {"num_workers": 1}),
]


def test_the_cases_cover_every_left_out_key():
    # data.verify: both levels give the same index (tests/data/test_shard_reader.py), so no stage output can differ
    assert {(stage, key) for stage, changes in CASES for key in changes} == {
        (stage, key) for stage, keys in NOT_OUTPUT_KEYS.items() if stage != "data" for key in keys}


def test_the_shard_stage_lists_every_data_key_but_verify():
    listed = {p.split(".", 1)[1] for p in stage_params("shard") if isinstance(p, str) and p.startswith("data.")}
    assert "data" not in stage_params("shard")
    assert listed == {f.name for f in dataclasses.fields(DataConfig)} - NOT_OUTPUT_KEYS["data"]
    assert NOT_OUTPUT_KEYS["data"] == {"verify"}


@pytest.mark.slow
@pytest.mark.parametrize("stage, changes", CASES, ids=[f"{s}.{next(iter(c))}" for s, c in CASES])
def test_a_left_out_key_changes_no_output_byte(stage, changes, reference, tiny_folder, tiny_shards, tmp_path):
    work = workdir(tmp_path / "work", tiny_folder, tiny_shards, **{stage: changes})
    upstream = {"pretrain": (), "extract": ("pretrain",), "finetune": ("pretrain",), "linear_sgd": ("pretrain",)}[stage]
    for earlier in upstream:
        for name in OUTPUTS[earlier]:  # the upstream outputs, as DVC would restore them
            source, target = reference / name, work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    run_stage_in_process(work, stage)
    expected, got = outputs(reference, stage), outputs(work, stage)
    assert sorted(got) == sorted(expected)
    differ = [name for name in expected if got[name] != expected[name]]
    assert not differ, f"{stage} with {changes} wrote other bytes: {differ}"
