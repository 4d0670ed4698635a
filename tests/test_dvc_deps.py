"""dvc.yaml is complete by construction: every stage depends on every project module it runs.

A stage whose deps miss a module it imports (directly, lazily inside a function,
or through other modules) would look up to date after that module changed. This
test walks the imports of each stage's ``python -m stages.<name>`` with ``ast``
and fails naming the stage and the missing files.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROJECT_PACKAGES = ("pipeline", "stages")


def module_file(dotted: str) -> Path | None:
    """The repository file of a project module or package, or None."""
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path: Path) -> set[Path]:
    """Files of the project modules ``path`` imports anywhere in its body, with their parent packages."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PROJECT_PACKAGES:
                continue
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return found


def import_closure(entry: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(project_imports(path) - seen)
    return seen


def stage_modules() -> list[tuple[str, str, list[str]]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, stage in stages.items():
        match = re.search(r"-m\s+([\w.]+)", stage["cmd"])
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        rows.append((name, match.group(1) if match else "", deps))
    return rows


@pytest.mark.parametrize("stage, module, deps", stage_modules(), ids=[row[0] for row in stage_modules()])
def test_stage_deps_cover_every_imported_module(stage: str, module: str, deps: list[str]) -> None:
    entry = module_file(module)
    assert entry is not None, f"{stage}: command does not run a project module ({module!r})"
    needed = {p.relative_to(REPO).as_posix() for p in import_closure(entry)}
    # an __init__ that only marks a package (no code) changes nothing a stage computes
    needed = {p for p in needed if not (p.endswith("__init__.py") and len((REPO / p).read_text().strip()) < 200)}
    missing = sorted(p for p in needed if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not depend on: {', '.join(missing)}"


def test_the_check_sees_lazy_imports() -> None:
    # training imports k-NN and extraction inside a method (k-NN while training)
    closure = {p.name for p in import_closure(REPO / "pipeline" / "method" / "training.py")}
    assert {"knn.py", "extract.py", "seeding.py", "errors.py"} <= closure
