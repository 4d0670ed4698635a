"""The project source files a module runs: its import closure, read from the code with ``ast``.

One list serves two users, so they cannot drift apart:

* dvc.yaml's deps: ``tests/test_dvc_deps.py`` checks that every stage depends on
  the closure of the module its command runs;
* the pre-training run identity (``pipeline.method.training.run_identity``): its
  code fingerprint hashes exactly the closure of ``stages.pretrain``, so a
  checkpoint's bytes change only when a file among that stage's deps changes.

Imports are followed wherever they appear (module level or inside a function),
through every project package they name. A package ``__init__`` that only marks
a package (under :data:`MARKER_INIT_CHARS` characters, no code) is left out: it
changes nothing a stage computes.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "stages")
REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER_INIT_CHARS = 200


def module_file(dotted: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of project module or package ``dotted`` under ``root``, or None."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path: Path, root: Path = REPO_ROOT) -> set[Path]:
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
                file = module_file(".".join(parts[:i]), root)
                if file is not None:
                    found.add(file)
    return found


def import_closure(entry: Path, root: Path = REPO_ROOT) -> set[Path]:
    """``entry`` and every project file it reaches through imports."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(project_imports(path, root) - seen)
    return seen


def is_package_marker(path: Path) -> bool:
    """An ``__init__.py`` too short to hold code that changes results."""
    return path.name == "__init__.py" and len(path.read_text().strip()) < MARKER_INIT_CHARS


def code_files(module: str, root: Path = REPO_ROOT) -> list[str]:
    """Sorted root-relative POSIX paths of the code ``python -m <module>`` runs (markers left out)."""
    entry = module_file(module, root)
    if entry is None:
        raise FileNotFoundError(f"{module}: no such project module under {root}")
    return sorted(p.relative_to(root).as_posix() for p in import_closure(entry, root) if not is_package_marker(p))


def fingerprint(files: list[str], root: Path = REPO_ROOT) -> str:
    """SHA-256 over ``files`` (root-relative path and bytes of each, in the given order)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()
