"""The package map of the README holds: each sub-package of pipeline/ imports only from those above it.

Order: core -> data -> method -> evaluation -> reporting. One exception is
allowed and named: k-NN while pre-training runs (method/training.py imports the
evaluation code lazily, inside the method that needs it).
"""
from __future__ import annotations

import ast

from tests.conftest import REPO

ORDER = ("core", "data", "method", "evaluation", "reporting")
ALLOWED = {("pipeline/method/training.py", "pipeline.evaluation.extract"),
           ("pipeline/method/training.py", "pipeline.evaluation.knn")}


def imported_modules(path, prefix: str = "pipeline.") -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith(prefix)}


def test_every_package_imports_only_from_the_packages_above_it():
    wrong = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.count("/") < 2:
            continue
        level = ORDER.index(relative.split("/")[1])
        for module in imported_modules(path):
            target = module.split(".")[1]
            if target in ORDER and ORDER.index(target) > level and (relative, module) not in ALLOWED:
                wrong.append(f"{relative} imports {module}")
    assert not wrong, "imports against the package order core -> data -> method -> evaluation -> reporting: " + "; ".join(wrong)


def test_no_library_module_imports_a_stage():
    offenders = [p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*.py")
                 if imported_modules(p, prefix="stages")]
    assert not offenders, f"library modules importing a stage: {offenders}"
