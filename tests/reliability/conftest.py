"""Reliability suite plumbing: ``fault_case`` results, the ``integrity`` fixture, the summary report.

Every test here carries ``@pytest.mark.fault_case(area, name)``. At the end of
the session a table (cases tried, survived, files checked after a fault, data
lost) is printed and, when the whole suite ran, written to
``reports/reliability.md`` and ``reports/reliability.json``: sorted, without
times or paths, so the same outcomes give the same bytes on the same day; both
carry the provenance (commit, params, machine, date, input hashes) of the run
(:mod:`pipeline.reporting.provenance`). ``pretrain_reference``
is the uninterrupted run that interrupted ones are compared with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.reporting import provenance
from tests.reliability.support import (PRETRAIN_OPTIONS, PRETRAIN_OUTPUTS, REPO, PretrainReference, Snapshot,
                                       run_stage_in_process, snapshot)

HERE = Path(__file__).resolve().parent
REPORT_MD = REPO / "reports" / "reliability.md"
REPORT_JSON = REPO / "reports" / "reliability.json"


@dataclass
class Integrity:
    """Checks that previously good files survived a fault; lost files are what the summary calls data lost."""

    checked: int = 0
    lost: list[str] = field(default_factory=list)

    def assert_intact(self, label: str, path: Path, before: Snapshot) -> None:
        """``path`` (file or folder) holds exactly the files and bytes of ``before``."""
        assert before, f"{label}: empty snapshot; nothing to compare"
        now = snapshot(path)
        self.checked += len(before)
        gone = sorted(k for k in before if now.get(k) != before[k])
        self.lost += [f"{label}:{k}" if k else label for k in gone]
        extra = sorted(set(now) - set(before))
        assert not gone, f"{label}: {len(gone)} previously good file(s) changed or missing: {gone}"
        assert not extra, f"{label}: unexpected new file(s) {extra}"

    def assert_same(self, label: str, path: Path, expected: bytes) -> None:
        """``path`` exists with exactly ``expected`` bytes (e.g. equal to the uninterrupted run's file)."""
        self.assert_intact(label, path, {"": expected})


@dataclass
class Case:
    area: str
    name: str
    result: str = "not run"
    note: str = ""
    integrity: Integrity | None = None


_CASES: dict[str, Case] = {}
_COLLECTED_FILES: set[str] = set()
_DESELECTED: list[str] = []


@pytest.fixture
def integrity(request: pytest.FixtureRequest) -> Integrity:
    checks = Integrity()
    case = _CASES.get(request.node.nodeid)
    if case is not None:
        case.integrity = checks
    return checks


def _case_of(item: pytest.Item) -> Case | None:
    marker = item.get_closest_marker("fault_case")
    if marker is None:
        return None
    area, name = marker.args
    callspec = getattr(item, "callspec", None)
    return Case(area, f"{name} [{callspec.id}]" if callspec is not None else name)


def pytest_itemcollected(item: pytest.Item) -> None:
    if Path(item.path).parent == HERE:
        _COLLECTED_FILES.add(Path(item.path).name)
        case = _case_of(item)
        if case is None:
            raise pytest.UsageError(f"{item.nodeid}: every reliability test needs @pytest.mark.fault_case(area, name)")
        _CASES[item.nodeid] = case


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in _CASES:
            _DESELECTED.append(item.nodeid)
            del _CASES[item.nodeid]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    case = _CASES.get(report.nodeid)
    if case is None:
        return
    if report.skipped:
        case.result = "skipped"
        if isinstance(report.longrepr, tuple):
            case.note = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        case.result = "failed" if report.when == "call" else "error"
    elif report.when == "call" and report.passed:
        case.result = "survived"


def _rows() -> list[dict[str, object]]:
    rows = []
    for case in sorted(_CASES.values(), key=lambda c: (c.area, c.name)):
        checks = case.integrity
        rows.append({
            "area": case.area,
            "case": case.name,
            "result": case.result,
            "files_checked": checks.checked if checks else 0,
            "files_lost": len(checks.lost) if checks else 0,
            "note": case.note,
        })
    return rows


def _totals(rows: list[dict[str, object]]) -> dict[str, int]:
    return {
        "tried": sum(r["result"] not in ("not run", "skipped") for r in rows),
        "survived": sum(r["result"] == "survived" for r in rows),
        "not_survived": sum(r["result"] in ("failed", "error") for r in rows),
        "skipped": sum(r["result"] == "skipped" for r in rows),
        "not_run": sum(r["result"] == "not run" for r in rows),
        "files_checked": sum(int(r["files_checked"]) for r in rows),
        "files_lost": sum(int(r["files_lost"]) for r in rows),
    }


def summary_lines(rows: list[dict[str, object]]) -> list[str]:
    """The totals sentence and the per-area table."""
    totals = _totals(rows)
    lines = [
        f"**{totals['tried']} cases tried, {totals['survived']} survived, {totals['not_survived']} not survived, "
        f"{totals['skipped']} skipped; {totals['files_checked']} files checked after faults, "
        f"{totals['files_lost']} lost.**",
        "",
        "| area | cases | survived | not survived | skipped | files checked | data lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for area in sorted({str(r["area"]) for r in rows}):
        sub = _totals([r for r in rows if r["area"] == area])
        lines.append(f"| {area} | {sub['tried'] + sub['skipped'] + sub['not_run']} | {sub['survived']} | "
                     f"{sub['not_survived']} | {sub['skipped']} | {sub['files_checked']} | {sub['files_lost']} |")
    return lines


def render_markdown(rows: list[dict[str, object]], record: dict | None = None) -> str:
    lines = [
        "# Reliability suite",
        "",
        "Generated by `pytest tests/reliability` (faults, hostile input, nothing lost).",
        "*Files checked* counts previously good files (or files that must equal an",
        "uninterrupted run's) compared byte for byte after the fault; *lost* counts those that were not.",
        "",
        *provenance.header_lines(record),
        *summary_lines(rows),
    ]
    lines += ["", "| area | case | result | files checked | lost | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        case = str(r["case"]).replace("|", "\\|")
        note = str(r["note"]).replace("|", "\\|")
        lines.append(f"| {r['area']} | {case} | {r['result']} | {r['files_checked']} | {r['files_lost']} | {note} |")
    return "\n".join(lines) + "\n"


def _complete() -> bool:
    """The whole suite was collected and nothing deselected (a partial run must not overwrite the report)."""
    wanted = {p.name for p in HERE.glob("test_*.py")}
    return bool(_CASES) and wanted <= _COLLECTED_FILES and not _DESELECTED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.option.collectonly or all(c.result == "not run" for c in _CASES.values()):
        return
    rows = _rows()
    terminalreporter.write_sep("=", "reliability suite")
    for line in summary_lines(rows):
        terminalreporter.write_line(line)
    if exitstatus == pytest.ExitCode.INTERRUPTED or not _complete():
        terminalreporter.write_line(f"partial run: {REPORT_MD.relative_to(REPO)} and .json not updated")
        return
    record = provenance.record(REPO, params_sha=provenance.params_sha_of(REPO / "params.yaml"))
    REPORT_MD.parent.mkdir(parents=True, exist_ok=True)
    REPORT_MD.write_text(render_markdown(rows, record))
    REPORT_JSON.write_text(json.dumps({"totals": _totals(rows), "cases": rows, "provenance": record}, indent=2,
                                      sort_keys=True) + "\n")
    terminalreporter.write_line(f"written: {REPORT_MD.relative_to(REPO)}, {REPORT_JSON.relative_to(REPO)}")


# ------------------------------------------------------------- shared runs
@pytest.fixture(scope="session")
def pretrain_reference(tiny_folder: Path, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> PretrainReference:
    """The uninterrupted tiny run (in-process, one thread) that every resumed run must equal byte for byte."""
    import io

    import torch

    import pipeline.method.checkpoint as checkpoint
    from tests.method.test_training import stage_workdir

    work = stage_workdir(tmp_path_factory.mktemp("reference"), tiny_folder, tiny_shards, pretrain=PRETRAIN_OPTIONS)
    checkpoints: dict[tuple[int, int], bytes] = {}
    original = checkpoint.atomic_write_bytes

    def recording_write(path: Path, data: bytes) -> None:
        original(path, data)
        if Path(path).name == "checkpoint.pt":
            saved = torch.load(io.BytesIO(data), weights_only=True)
            checkpoints[(int(saved["epoch"]), int(saved["step"]))] = data

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_bytes", recording_write)
        run_stage_in_process(work, "pretrain")
    steps = max(s for _, s in checkpoints) + 1
    return PretrainReference(work, steps, checkpoints, {name: (work / name).read_bytes() for name in PRETRAIN_OUTPUTS})
