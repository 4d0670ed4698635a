"""Run records with sacred.

Every stage runs inside :func:`record_run`, which stores a sacred run under
``runs/sacred/<stage>/<id>/``: the full config, host, package versions, git
commit, captured metrics, the result and small artifacts. Run records are not
DVC outputs (they contain wall-clock times and host names, so they would break
byte-identical reruns); the report names the record instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Params, params_to_dict

RUNS_DIR = Path(os.environ.get("ATTMASK_RUNS_DIR", "runs/sacred"))


class RunRecord:
    """What a stage's code sees of its sacred run: metrics and artifacts."""

    def __init__(self, run: Any | None, directory: Path | None):
        self._run = run
        self.directory = directory

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        if self._run is not None:
            self._run.log_scalar(name, float(value), step)

    def add_artifact(self, path: str | Path, name: str | None = None) -> None:
        if self._run is not None:
            self._run.add_artifact(str(path), name=name)

    def set_info(self, key: str, value: Any) -> None:
        if self._run is not None:
            self._run.info[key] = value


def record_run(
    stage: str,
    params: Params,
    main: Callable[[RunRecord], dict[str, Any]],
    runs_dir: Path | None = None,
    enabled: bool = True,
) -> dict[str, Any]:
    """Run ``main`` as a sacred experiment named ``stage`` and return its result.

    ``enabled=False`` (used by tests) runs ``main`` with a record that stores nothing.
    """
    if not enabled:
        return main(RunRecord(None, None))

    import sacred
    from sacred.observers import FileStorageObserver

    # tqdm bars and prints stay on the terminal; sacred would otherwise capture them
    sacred.SETTINGS["CAPTURE_MODE"] = "no"
    sacred.SETTINGS["DISCOVER_SOURCES"] = "dir"
    directory = Path(runs_dir or RUNS_DIR) / stage
    experiment = sacred.Experiment(stage, save_git_info=_inside_git_repo())
    observer = FileStorageObserver(str(directory))
    experiment.observers.append(observer)
    experiment.add_config(params_to_dict(params))
    result: dict[str, Any] = {}

    @experiment.main
    def _main(_run: Any) -> dict[str, Any]:
        record = RunRecord(_run, Path(observer.dir) if observer.dir else None)
        record.set_info("package_versions", package_versions())
        result.update(main(record))
        return _jsonable(result)

    run = experiment.run(options={"--loglevel": "WARNING"})
    result["sacred_run"] = {"stage": stage, "id": run._id, "dir": str(observer.dir)}
    return result


TRACKED_PACKAGES = ("torch", "torchvision", "timm", "webdataset", "dvc", "sacred", "scikit-learn", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour shapes our numbers."""
    from importlib import metadata

    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _inside_git_repo() -> bool:
    try:
        import git

        git.Repo(".", search_parent_directories=True)
        return True
    except Exception:
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
