"""Provenance: the commit rule on a tiny git repository, the header, and freshness (pipeline/reporting/provenance.py)."""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.reporting import provenance
from pipeline.reporting.provenance import UNKNOWN, commit_of_inputs, header_lines, judge

INPUTS = ("dvc.yaml", "params.yaml", "pipeline", "stages")
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    return root


def test_a_clean_tree_names_the_commit_that_last_changed_the_inputs_not_a_later_outputs_commit(repo: Path) -> None:
    code = commit(repo, {"dvc.yaml": "stages: {}\n", "pipeline/a.py": "a = 1\n", "stages/s.py": "s = 1\n"}, "code")
    outputs = commit(repo, {"dvc.lock": "lock\n", "reports/README.md": "# report\n", "tests/t.py": "t\n"}, "outputs")
    state = commit_of_inputs(repo, INPUTS)
    assert state == {"state": "clean", "commit": code, "head": outputs}
    # a fresh clone of the outputs commit names the same commit
    clone = repo.parent / "clone"
    git(repo.parent, "clone", "-q", str(repo), str(clone))
    assert commit_of_inputs(clone, INPUTS)["commit"] == code
    assert f"| commit | `{code}`, the commit whose pipeline inputs these are" in "\n".join(
        header_lines(provenance.record(clone, INPUTS)))


def test_reverted_inputs_name_the_revert_the_oldest_commit_of_the_unbroken_run(repo: Path) -> None:
    commit(repo, {"pipeline/a.py": "a = 1\n"}, "a = 1")
    commit(repo, {"pipeline/a.py": "a = 2\n"}, "a = 2")
    revert = commit(repo, {"pipeline/a.py": "a = 1\n"}, "back to a = 1")  # its parent's inputs differ
    assert commit_of_inputs(repo, INPUTS)["commit"] == revert


def test_changed_or_new_input_files_claim_no_commit_and_are_named(repo: Path) -> None:
    commit(repo, {"pipeline/a.py": "a = 1\n", "docs/x.md": "x\n"}, "code")
    head = git(repo, "rev-parse", "HEAD")
    (repo / "docs/x.md").write_text("edited docs are no pipeline input\n")
    assert commit_of_inputs(repo, INPUTS)["state"] == "clean"
    (repo / "pipeline/a.py").write_text("a = 2\n")
    (repo / "stages").mkdir()
    (repo / "stages/new.py").write_text("untracked, but the stage would run it\n")
    state = commit_of_inputs(repo, INPUTS)
    assert state == {"state": "changed", "head": head, "changed": ["pipeline/a.py", "stages/new.py"]}
    text = provenance.describe_commit(state)
    assert text.startswith(f"uncommitted changes over `{head[:7]}` in `pipeline/a.py`, `stages/new.py`")
    assert head not in text.replace(head[:7], "")  # no full commit claimed


def test_outside_a_checkout_the_header_says_so_and_hashes_still_work(tmp_path: Path) -> None:
    (tmp_path / "pipeline" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pipeline" / "a.py").write_text("a = 1\n")
    (tmp_path / "pipeline" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"cache")
    assert commit_of_inputs(tmp_path, INPUTS) == {"state": "no-git"}
    assert provenance.describe_commit({"state": "no-git"}) == "unknown: not a git checkout"
    assert list(provenance.input_hashes(tmp_path, INPUTS)) == ["pipeline/a.py"]


def test_companion_header_has_a_date_and_an_old_report_says_unknown(tmp_path: Path) -> None:
    rec = provenance.record(tmp_path, INPUTS, params_sha="ab" * 32, threads=2, date=datetime.date(2026, 1, 2))
    text = "\n".join(header_lines(rec))
    assert "| date | 2026-01-02 |" in text and f"| params | sha256 `{'ab' * 32}`" in text
    assert ", 2 threads, numerics " in text and "| environment | Python " in text
    assert "| date |" not in "\n".join(header_lines(rec, date=False))
    old = "\n".join(header_lines(provenance.unknown_record()))
    assert f"| commit | {UNKNOWN} |" in old and f"| machine | {UNKNOWN} |" in old and f"| date | {UNKNOWN} |" in old


def test_freshness_names_the_first_changed_file_or_the_params(tmp_path: Path) -> None:
    for name in ("pipeline/b.py", "pipeline/c.py", "stages/s.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    rec = provenance.record(tmp_path, INPUTS, params_sha="p")
    assert judge(rec, tmp_path, "p") == (True, "its 3 input files and the params equal this tree's")
    assert judge(rec, tmp_path, "q") == (False, "the params changed since it was produced")
    (tmp_path / "stages/s.py").write_text("edited")
    (tmp_path / "pipeline/c.py").write_text("edited")
    assert judge(rec, tmp_path, "p") == (False, "`pipeline/c.py` changed since it was produced (and 1 more files)")
    (tmp_path / "pipeline/a.py").write_text("new")
    assert judge(rec, tmp_path, "p")[1].startswith("`pipeline/a.py` was added since it was produced")
    assert judge(None, tmp_path, "p") == (False, f"its inputs are {UNKNOWN}")
    assert judge(provenance.unknown_record(), tmp_path, "p")[0] is False
    composite = {"sources": {"b.json": rec, "a.json": provenance.unknown_record()}}
    assert judge(composite, tmp_path, "p") == (False, f"`a.json`: its inputs are {UNKNOWN}")


def test_the_report_stage_writes_the_same_readme_on_a_fresh_clone_of_the_outputs_commit(
        tiny_folder: Path, tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commit code (C), run the report, commit its outputs (C'); a clone of C' reruns to the same bytes, naming C."""
    import json
    import shutil

    import yaml

    import stages.report as stage
    from pipeline.core.config import params_from_dict
    from pipeline.method.backbone_export import random_backbone_state, save_backbone_safetensors
    from tests.conftest import REPO, tiny_params_dict
    from tests.reporting.test_readme import write_inputs

    repo = tmp_path / "repo"
    raw = tiny_params_dict(tiny_folder, model={"patch_size": 4})
    p = params_from_dict(raw)
    shutil.copytree(tiny_shards, repo / "data" / "shards")
    save_backbone_safetensors(random_backbone_state(p.model, 0), repo / "models/pretrain/backbone.safetensors")
    write_inputs(repo / "reports", skip=("manifest",))
    (repo / "reports/pretrain/steps.csv").write_text("step,epoch,loss_total,loss_cls,loss_patch,masked_share\n"
                                                     "0,0,5,3,2,0.1\n1,0,4,3,1,0.2\n")
    (repo / "reports/timing").mkdir()
    (repo / "reports/timing/pretrain.json").write_text(json.dumps({"wall_seconds": 5.0, "sacred_run": 7}))
    (repo / ".gitignore").write_text("/data/\n/models/\n/reports/timing/\n")
    git(repo, "init", "-q")
    code = commit(repo, {"params.yaml": yaml.safe_dump(raw), "dvc.yaml": (REPO / "dvc.yaml").read_text()}, "code")

    monkeypatch.chdir(repo)
    stage.main(p)
    outputs = commit(repo, {}, "dvc.lock and reports/")
    first = (repo / "reports/README.md").read_text()
    assert f"| commit | `{code}`, the commit whose pipeline inputs these are" in first and outputs not in first

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    for ignored in ("data", "models", "reports/timing"):  # what `dvc repro` recreates there
        shutil.copytree(repo / ignored, clone / ignored)
    (clone / "reports/timing/pretrain.json").write_text(json.dumps({"wall_seconds": 6.5, "sacred_run": 8}))
    monkeypatch.chdir(clone)
    stage.main(p)
    assert (clone / "reports/README.md").read_text() == first
    assert "6.5 s" in (clone / "reports/timing/summary.md").read_text()
