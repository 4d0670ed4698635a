"""dvc.yaml is complete by construction: every stage's code deps are exactly the project modules it runs.

A stage whose deps miss a module it imports (directly, lazily inside a function,
or through other modules) would look up to date after that module changed. The
import closure comes from :mod:`pipeline.core.sources`, the same list the
pre-training run identity hashes, so the checkpoint's bytes depend on no file
outside the pretrain stage's deps.
"""
from __future__ import annotations

import re
import shutil

import pytest
import yaml

from pipeline.core.sources import code_files, import_closure
from tests.conftest import REPO


def stage_modules() -> list[tuple[str, str, list[str]]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, stage in stages.items():
        match = re.search(r"-m\s+([\w.]+)", stage["cmd"])
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        rows.append((name, match.group(1) if match else "", deps))
    return rows


@pytest.mark.parametrize("stage, module, deps", stage_modules(), ids=[row[0] for row in stage_modules()])
def test_stage_code_deps_are_exactly_the_modules_it_runs(stage: str, module: str, deps: list[str]) -> None:
    needed = set(code_files(module))
    missing = sorted(p for p in needed if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not depend on: {', '.join(missing)}"
    # a listed module the stage never imports would rerun it for nothing
    extra = sorted(d for d in deps if d.endswith(".py") and d not in needed)
    assert not extra, f"dvc.yaml stage {stage!r} depends on modules it does not import: {', '.join(extra)}"


def test_the_check_sees_lazy_imports() -> None:
    # training imports k-NN and extraction inside a method (k-NN while training)
    closure = {p.name for p in import_closure(REPO / "pipeline" / "method" / "training.py")}
    assert {"knn.py", "extract.py", "seeding.py", "errors.py"} <= closure


def test_the_checkpoint_code_fingerprint_ignores_files_outside_the_pretrain_deps(tmp_path, monkeypatch) -> None:
    """An edit outside pretrain's deps leaves the fingerprint (so the checkpoint's bytes) unchanged; one inside changes it."""
    from pipeline.core import sources
    from pipeline.method import training

    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sources, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(training, "code_files", lambda module: sources.code_files(module, tmp_path))
    monkeypatch.setattr(training, "fingerprint", lambda files: sources.fingerprint(files, tmp_path))
    pretrain_deps = next(deps for name, _, deps in stage_modules() if name == "pretrain")
    assert "pipeline/data/synthetic.py" not in pretrain_deps  # the case that broke dvc.lock once

    before = training.code_fingerprint()
    with (tmp_path / "pipeline" / "data" / "synthetic.py").open("a") as file:
        file.write("\n# an edit outside the pretrain stage's deps\n")
    assert training.code_fingerprint() == before
    with (tmp_path / "pipeline" / "method" / "loss.py").open("a") as file:
        file.write("\n# an edit inside them\n")
    assert training.code_fingerprint() != before
