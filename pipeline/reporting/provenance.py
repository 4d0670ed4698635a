"""Where a report came from and whether that still holds: one header and one record for every report.

Every report (``reports/README.md`` and the companions ``comparison.md``,
``bench.md``, ``reliability.md``) opens with :func:`header_lines` of a
:func:`record`: the commit, the params hash, the machine and (companions only)
the date. Companions also store the record in their JSON, with the SHA-256 of
every file they depend on, so that :func:`judge` can later say whether they
are current or stale.

The commit named is *the commit whose pipeline inputs these are*
(:func:`commit_of_inputs`): the oldest commit of the unbroken run back from
HEAD whose inputs (:data:`PIPELINE_INPUTS`) equal the working tree's. The
workflow commits code (C), runs ``make repro`` and commits ``dvc.lock`` and
``reports/`` (C'); both the first run and a rerun on a fresh clone of C' name
C, so the README repeats byte for byte.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.core.config import Params, load_params, params_to_dict
from pipeline.core.files import sha256_file
from pipeline.core.tracking import environment

RECORD_FORMAT = 1
# What the pipeline's numbers are a function of, besides data and machine: not reports/, dvc.lock, docs, tests, bench.
PIPELINE_INPUTS: tuple[str, ...] = ("dvc.yaml", "params.yaml", "requirements.lock", "pyproject.toml", "pipeline", "stages")
BENCH_INPUTS: tuple[str, ...] = PIPELINE_INPUTS + ("bench",)
UNKNOWN = "unknown (before provenance was recorded)"
SHOWN_FILES = 8  # changed files named in a header before "and N more"


# ------------------------------------------------------------------------ git
def _git(repo: Path, *args: str) -> str | None:
    """``git`` output in ``repo``, None when git is missing, fails or ``repo`` is no checkout.

    ``--no-optional-locks``: reading must not rewrite the index of a checkout others work in.
    """
    try:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=repo, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def commit_of_inputs(repo: Path = Path("."), inputs: Sequence[str] = PIPELINE_INPUTS) -> dict[str, Any]:
    """The commit whose ``inputs`` (paths relative to the checkout's root ``repo``) the working tree holds.

    Returns ``{"state": "clean", "commit", "head"}`` when the inputs equal HEAD's:
    ``commit`` is the newest commit that touched them, which is the oldest one of
    the unbroken run back from HEAD with these inputs; ``{"state": "changed",
    "head", "changed": [paths]}`` when some input differs from HEAD (untracked
    files under an input folder count); ``{"state": "no-git"}`` outside a checkout.
    """
    head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD")
    if not head:
        return {"state": "no-git"}
    status = _git(repo, "status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all", "--", *inputs)
    if status is None:
        return {"state": "no-git"}
    changed = sorted({entry[3:] for entry in status.split("\0") if len(entry) > 3})
    if changed:
        return {"state": "changed", "head": head.strip(), "changed": changed}
    commit = _git(repo, "log", "-1", "--format=%H", "--", *inputs)
    return {"state": "clean", "commit": (commit or head).strip(), "head": head.strip()}


# ----------------------------------------------------------------- file hashes
def input_files(repo: Path, inputs: Sequence[str]) -> list[str]:
    """The files of ``inputs``: git's tracked and untracked-but-not-ignored ones, else every file found."""
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *inputs)
    if listed is not None:
        names = [name for name in listed.split("\0") if name]
    else:  # not a checkout (a copy on another machine): walk, leaving out Python's caches
        names = []
        for entry in inputs:
            path = repo / entry
            if path.is_file():
                names.append(entry)
            elif path.is_dir():
                names += [p.relative_to(repo).as_posix() for p in path.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return sorted({name for name in names if (repo / name).is_file()})  # a deleted tracked file is not an input


def input_hashes(repo: Path = Path("."), inputs: Sequence[str] = PIPELINE_INPUTS) -> dict[str, str]:
    """``{path: sha256}`` of every file of ``inputs``."""
    return {name: sha256_file(repo / name) for name in input_files(repo, inputs)}


def params_sha256(params: Params) -> str:
    """SHA-256 of the validated params as canonical JSON (YAML comments and layout do not count)."""
    text = json.dumps(params_to_dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------- machine
def cpu_vendor() -> str | None:
    """``GenuineIntel`` / ``AuthenticAMD`` (``/proc/cpuinfo``), None where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_record(threads: int | None = None) -> dict[str, Any]:
    """The CPU (vendor, model name, family/model, ISA), threads, numerics and the locked environment.

    ``threads``: what the numbers were computed with (default: torch's setting, when torch is loaded).
    No host name: two machines of the same kind must give the same header.
    """
    if threads is None and "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    env = environment()
    return {"cpu_vendor": cpu_vendor(), "cpu": env.pop("cpu"), "threads": threads, "numerics": env.pop("numerics"),
            "environment": env}


# ---------------------------------------------------------------------- record
def record(repo: Path = Path("."), inputs: Sequence[str] = PIPELINE_INPUTS, params_sha: str | None = None,
           threads: int | None = None, date: datetime.date | None = None) -> dict[str, Any]:
    """Provenance of numbers produced now: commit, params hash, machine, date, and the inputs' hashes."""
    return {"format": RECORD_FORMAT, "commit": commit_of_inputs(repo, inputs), "params_sha256": params_sha,
            "machine": machine_record(threads), "date": (date or datetime.date.today()).isoformat(),
            "input_paths": list(inputs), "inputs": input_hashes(repo, inputs)}


def unknown_record(**known: Any) -> dict[str, Any]:
    """The record of numbers produced before provenance was recorded (``known``: what is known anyway)."""
    return {"format": RECORD_FORMAT, "commit": None, "params_sha256": None, "machine": None, "date": None,
            "input_paths": None, "inputs": None, **known}


def params_sha_of(path: Path = Path("params.yaml")) -> str | None:
    """:func:`params_sha256` of a params file, None when it is missing or invalid."""
    try:
        return params_sha256(load_params(path))
    except Exception:  # an unreadable params file: the header says unknown, the report still renders
        return None


# ------------------------------------------------------------------- rendering
def _files(paths: Sequence[str]) -> str:
    shown = ", ".join(f"`{p}`" for p in paths[:SHOWN_FILES])
    return shown + (f" and {len(paths) - SHOWN_FILES} more" if len(paths) > SHOWN_FILES else "")


def describe_commit(commit: Mapping[str, Any] | None) -> str:
    if not commit:
        return UNKNOWN
    state = commit.get("state")
    if state == "clean":
        return (f"`{commit['commit']}`, the commit whose pipeline inputs these are (the working tree's inputs "
                "equal it)")
    if state == "changed":
        return (f"uncommitted changes over `{commit['head'][:7]}` in {_files(commit['changed'])}: no commit holds "
                "these inputs")
    if state == "recorded":  # known from elsewhere (e.g. DVC's experiment baseline), cleanliness not
        return f"`{commit['commit']}` ({commit.get('note', 'whether the tree was clean is not recorded')})"
    return "unknown: not a git checkout"


def format_numerics(numerics: Mapping[str, Any]) -> str:
    """``numerics portable (torch AVX2, MKL AVX2 strict, oneDNN off)`` from :func:`describe_numerics`'s record."""
    details = []
    if numerics.get("torch_cpu_capability"):
        details.append(f"torch {numerics['torch_cpu_capability']}")
    if numerics.get("mkl"):
        details.append(f"MKL {numerics['mkl']['branch']}" + (" strict" if numerics["mkl"].get("strict") else ""))
    if "onednn" in numerics:
        details.append("oneDNN " + ("on" if numerics["onednn"] else "off"))
    return f"numerics {numerics.get('mode')}" + (f" ({', '.join(details)})" if details else "")


def format_environment(env: Mapping[str, Any] | None) -> str:
    """``Python 3.11.7, requirements.lock 1a2b3c4d5e6f, CPU family 25 model 17, ISA avx2 fma avx512f[, numerics ...]``."""
    if not env:
        return "not recorded"
    lock = env.get("lock_sha256")
    parts = [f"Python {env.get('python')}", f"requirements.lock {lock[:12]}" if lock else "no requirements.lock"]
    if env.get("cpu_family") is not None:
        parts.append(f"CPU family {env['cpu_family']} model {env.get('cpu_model_number')}")
    parts.append("ISA " + (" ".join(env.get("isa") or []) or "not recorded"))
    if env.get("numerics"):
        parts.append(format_numerics(env["numerics"]))
    return ", ".join(parts)


def describe_machine(machine: Mapping[str, Any] | None) -> str:
    """``AuthenticAMD AMD EPYC, 2 threads, numerics portable (...)``."""
    if not machine:
        return UNKNOWN
    cpu = " ".join(str(p) for p in (machine.get("cpu_vendor"), machine.get("cpu")) if p)
    threads = f"{machine['threads']} threads" if machine.get("threads") is not None else "threads not recorded"
    parts = [cpu or "CPU not recorded", threads]
    if machine.get("numerics"):
        parts.append(format_numerics(machine["numerics"]))
    return ", ".join(parts)


def describe(rec: Mapping[str, Any] | None) -> dict[str, str]:
    """The header's cells of a record: commit, params, machine, environment, date."""
    rec = rec or unknown_record()
    machine = rec.get("machine")
    params = rec.get("params_sha256")
    return {
        "commit": describe_commit(rec.get("commit")),
        "params": (f"sha256 `{params}` (`params.yaml`, validated, as canonical JSON)" if params
                   else "not recorded (no valid `params.yaml`)" if rec.get("inputs") is not None else UNKNOWN),
        "machine": describe_machine(machine),
        "environment": format_environment((machine or {}).get("environment")) if machine else UNKNOWN,
        "date": rec.get("date") or UNKNOWN,
    }


def header_lines(rec: Mapping[str, Any] | None, extra: Sequence[tuple[str, str]] = (), date: bool = True) -> list[str]:
    """The provenance table every report opens with; ``extra`` rows go after params (e.g. the data manifest).

    ``date=False`` for ``reports/README.md``, which must repeat byte for byte on a rerun.
    """
    cells = describe(rec)
    rows = [("commit", cells["commit"]), ("params", cells["params"]), *extra,
            ("machine", cells["machine"]), ("environment", cells["environment"])]
    if date:
        rows.append(("date", cells["date"]))
    return ["| produced by | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows), ""]


# ------------------------------------------------------------------- freshness
def judge(rec: Mapping[str, Any] | None, repo: Path = Path("."), params_sha: str | None = None) -> tuple[bool, str]:
    """``(current, why)``: whether the files ``rec`` depends on and the params still equal this tree's.

    A composite record (``{"sources": {name: record | None}}``, one per data file
    of a report) is current when every source is; ``why`` names the first
    changed file (sorted), or what is unknown.
    """
    if rec is None:
        return False, f"its inputs are {UNKNOWN}"
    if "sources" in rec:
        if not rec["sources"]:
            return False, "no data files recorded"
        for name, source in sorted(rec["sources"].items()):
            current, why = judge(source, repo, params_sha)
            if not current:
                return False, f"`{name}`: {why}"
        return True, f"all {len(rec['sources'])} data files' inputs equal this tree's"
    if rec.get("inputs") is None or rec.get("input_paths") is None:
        return False, f"its inputs are {UNKNOWN}"
    then, now = rec["inputs"], input_hashes(repo, rec["input_paths"])
    changed = sorted(p for p in then.keys() | now.keys() if then.get(p) != now.get(p))
    params_changed = rec.get("params_sha256") is None or rec.get("params_sha256") != params_sha
    if changed:
        first = changed[0]
        verb = "was added" if first not in then else "was removed" if first not in now else "changed"
        more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
        return False, f"`{first}` {verb} since it was produced{more}" + ("; the params changed too" if params_changed else "")
    if params_changed:
        return False, "the params changed since it was produced"
    return True, f"its {len(then)} input files and the params equal this tree's"
