"""Run records with sacred.

Every stage runs inside :func:`record_run`, which stores a sacred run under
``runs/sacred/<stage>/<id>/``: the full config, host, package versions, git
commit, captured metrics, the result and small artifacts. Run records are not
DVC outputs (they contain wall-clock times and host names, so they would break
byte-identical reruns); the report names the record instead.

Timing convention: after the stage's ``main`` returns, :func:`record_run` also
writes ``reports/timing/<stage>.json`` (stage, sacred run id, wall seconds, the
machine, and whatever the stage passed to :meth:`RunRecord.add_timing`) and one
``reports/timing/<stage>_<name>.csv`` per :meth:`RunRecord.add_timing_table`.
Like the run records these files are volatile and deliberately not DVC outputs:
every DVC-declared output must be byte-identical on ``dvc repro --force``, so
anything measured with a clock goes here and nowhere else.
"""
from __future__ import annotations

import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.core.config import Params, params_to_dict
from pipeline.core.files import atomic_write_text, sha256_file, write_json
from pipeline.core.numerics import describe_numerics



def default_runs_dir() -> Path:
    """Where sacred records go: ``ATTMASK_RUNS_DIR``, else ``runs/sacred`` of the repository.

    A queued DVC experiment runs in a temporary copy that DVC deletes afterwards;
    DVC names the parent repository in ``DVC_ROOT``, so its records land there
    and outlive the copy (each one names its experiment, ``DVC_EXP_NAME``).
    """
    if os.environ.get("ATTMASK_RUNS_DIR"):
        return Path(os.environ["ATTMASK_RUNS_DIR"])
    root = os.environ.get("DVC_ROOT")
    return Path(root) / "runs" / "sacred" if root else Path("runs/sacred")


RUNS_DIR = default_runs_dir()
TIMING_DIR = Path(os.environ.get("ATTMASK_TIMING_DIR", "reports/timing"))


class RunRecord:
    """What a stage's code sees of its sacred run: metrics and artifacts."""

    def __init__(self, run: Any | None, directory: Path | None):
        self._run = run
        self.directory = directory
        self.timing: dict[str, Any] = {}
        self.timing_tables: dict[str, tuple[tuple[str, ...], list[Sequence[Any]]]] = {}

    def add_timing(self, **values: Any) -> None:
        """Volatile measurements (images/s, per-variant seconds, device) for ``reports/timing/<stage>.json``."""
        self.timing.update(values)

    def add_timing_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A volatile table (e.g. throughput per step) for ``reports/timing/<stage>_<name>.csv``."""
        self.timing_tables[name] = (tuple(columns), [tuple(r) for r in rows])

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
    timing_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``main`` as a sacred experiment named ``stage`` and return its result.

    Then writes the stage's timing files under ``timing_dir`` (default
    ``reports/timing``). ``enabled=False`` (tests, and every torchrun rank but
    the first) runs ``main`` with a record that stores nothing and writes no timing.
    """
    if not enabled:
        return main(RunRecord(None, None))

    with warnings.catch_warnings():
        # sacred 0.8 imports pkg_resources, whose deprecation notice would open every stage's log;
        # the pin setuptools<81 (pyproject.toml) keeps it working, so the notice carries nothing to act on
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
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
    records: list[RunRecord] = []
    wall: list[float] = []

    @experiment.main
    def _main(_run: Any) -> dict[str, Any]:
        record = RunRecord(_run, Path(observer.dir) if observer.dir else None)
        records.append(record)
        record.set_info("package_versions", package_versions())
        record.set_info("environment", environment())
        record.set_info("dvc_experiment", os.environ.get("DVC_EXP_NAME"))  # set by `dvc exp run` for queued runs
        start = time.perf_counter()
        result.update(main(record))
        wall.append(time.perf_counter() - start)
        record.set_info("timing", _jsonable(record.timing))
        return _jsonable(result)

    run = experiment.run(options={"--loglevel": "WARNING"})
    result["sacred_run"] = {"stage": stage, "id": run._id, "dir": str(observer.dir)}
    write_timing(stage, result["sacred_run"], wall[0], records[0], Path(timing_dir or TIMING_DIR))
    return result


def write_timing(stage: str, sacred_run: dict[str, Any] | None, wall_seconds: float, record: RunRecord,
                 directory: Path) -> Path:
    """``<directory>/<stage>.json`` (+ one CSV per timing table); returns the JSON path.

    ``sacred_run`` is ``{"stage", "id", "dir"}`` of the run record (None: not recorded).
    """
    timing = {"stage": stage, "sacred_run": sacred_run, "wall_seconds": wall_seconds,
              "process_cpu_seconds": process_cpu_seconds(), "machine": machine_info()}
    timing.update(record.timing)
    for name, (columns, rows) in record.timing_tables.items():
        lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
        atomic_write_text(directory / f"{stage}_{name}.csv", "\n".join(lines) + "\n")
    path = directory / f"{stage}.json"
    write_json(_jsonable(timing), path)
    return path


def process_cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (loader workers), start-up included.

    Unlike wall time it hardly changes when other jobs share the cores.
    """
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine_info() -> dict[str, Any]:
    """Where a stage ran: ``device`` (cpu | cuda), ``gpu``, ``gpu_count``, ``cpu`` model, ``cpus``, ``threads``, host.

    The device is ``cpu`` unless the stage itself initialised CUDA (torch is not
    imported here: a stage that never loaded torch used no GPU).
    """
    torch = sys.modules.get("torch")
    info: dict[str, Any] = {"device": "cpu"}
    if torch is not None and torch.cuda.is_initialized():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count())
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count()
    identity = cpu_identity()
    info.update(
        cpu=cpu_model(),
        cpu_vendor=identity["vendor"],
        cpu_family=identity["family"],
        cpu_model_number=identity["model"],
        cpus=cpus,
        threads=torch.get_num_threads() if torch is not None else None,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        hostname=socket.gethostname(),
        platform=platform.platform(),
    )
    return info


def cpu_identity() -> dict[str, str | None]:
    """The first CPU's ``vendor`` (``GenuineIntel``, ``AuthenticAMD``), x86 ``family`` and ``model`` numbers."""
    fields = _first_cpu_fields()
    return {"vendor": fields.get("vendor_id"), "family": fields.get("cpu family"), "model": fields.get("model")}


def _first_cpu_fields() -> dict[str, str]:
    """``/proc/cpuinfo``'s fields for the first processor ({} where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
# ISA extensions whose presence changes which kernels the numerical libraries pick (recorded, not all)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_tile", "avx512_vp2intersect")


def environment() -> dict[str, Any]:
    """What shapes the numbers besides params, data and code: Python, the locked environment, the CPU.

    ``lock_sha256``: SHA-256 of ``requirements.lock`` (None outside a checkout);
    ``cpu_family`` / ``cpu_model_number`` and ``isa``: the x86 family, model and the
    ISA flags (of :data:`ISA_FLAGS`) that the CPU reports; ``numerics``: the
    libraries' dispatch settings (:func:`pipeline.core.numerics.describe_numerics`).
    """
    info: dict[str, Any] = {"python": platform.python_version(), "lock_sha256": None,
                            "cpu": cpu_model(), "cpu_family": None, "cpu_model_number": None, "isa": [],
                            "numerics": describe_numerics()}
    if LOCK_FILE.is_file():
        info["lock_sha256"] = sha256_file(LOCK_FILE)
    fields = _first_cpu_fields()
    info["cpu_family"] = fields.get("cpu family")
    info["cpu_model_number"] = fields.get("model")
    present = set(fields.get("flags", "").split())
    info["isa"] = [flag for flag in ISA_FLAGS if flag in present]
    return info


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
