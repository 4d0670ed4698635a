"""stages/paths.py names the paths dvc.yaml declares: a path changed in one and not the other fails here."""
from __future__ import annotations

from pathlib import Path

import yaml

from stages import paths
from tests.conftest import REPO


def declared_paths() -> set[str]:
    """Every dep, out, metric and plot path of dvc.yaml (dict entries by their key)."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    found: set[str] = {next(iter(m)) if isinstance(m, dict) else m for m in pipeline.get("metrics") or []}
    for stage in pipeline["stages"].values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                found.add(entry if isinstance(entry, str) else next(iter(entry)))
    return found


def test_every_stage_path_is_declared_in_dvc_yaml():
    declared = declared_paths()
    named = {name: value for name, value in vars(paths).items() if isinstance(value, Path)}
    undeclared = {name: str(value) for name, value in named.items() if value != paths.PARAMS and value not in paths.UNDECLARED
                  and not any(d == str(value) or d.startswith(f"{value}/") for d in declared)}
    assert not undeclared, f"stages/paths.py names paths dvc.yaml never declares: {undeclared}"


def test_undeclared_paths_really_are_undeclared():
    declared = declared_paths()
    assert not [p for p in paths.UNDECLARED if any(d == str(p) or d.startswith(f"{p}/") for d in declared)]
