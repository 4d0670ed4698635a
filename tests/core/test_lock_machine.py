"""Which CPUs may check the committed dvc.lock byte for byte (pipeline/core/lock_machine.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.core.lock_machine import RECORD_NAME, SKIP_EXIT, build_record, verdict
from tests.conftest import REPO

XEON = {"device": "cpu", "cpu": "Intel(R) Xeon(R) Processor", "vendor": "GenuineIntel", "family": "6", "model": "167"}
OLDER_XEON = {**XEON, "model": "85"}
EPYC = {"device": "cpu", "cpu": "AMD EPYC", "vendor": "AuthenticAMD", "family": "25", "model": "17"}
OLDER_EPYC = {**EPYC, "model": "1"}


def record(made: dict, numerics: str = "portable") -> dict:
    timing = {"machine": {"device": made["device"], "cpu": made["cpu"], "cpu_vendor": made["vendor"],
                          "cpu_family": made["family"], "cpu_model_number": made["model"]}}
    return build_record({"pretrain": timing, "metrics": None}, numerics)


@pytest.mark.parametrize("made, here, numerics, checks", [
    (XEON, XEON, "portable", True),
    (XEON, OLDER_XEON, "portable", True),      # portable: the same bytes on any Intel CPU
    (XEON, EPYC, "portable", False),           # MKL ignores the pinned branch on AMD
    (EPYC, EPYC, "portable", True),
    (EPYC, OLDER_EPYC, "portable", False),     # on AMD only the same family and model is promised
    (EPYC, XEON, "portable", False),
    (EPYC, XEON, "compatible", False),         # measured: the tiny pipeline's bytes differ across vendors
    (XEON, OLDER_XEON, "compatible", True),
    (XEON, OLDER_XEON, "native", False),
    (XEON, XEON, "native", True),
    ({**XEON, "device": "cuda"}, XEON, "portable", False),
])
def test_the_check_runs_exactly_where_the_bytes_are_promised(made, here, numerics, checks) -> None:
    check, line = verdict(record(made, numerics), here)
    assert check is checks
    assert "\n" not in line
    if not checks:
        assert line.startswith("dvc.lock check skipped: stage pretrain ran on ") and made["cpu"] in line


def test_a_missing_record_is_checked_not_skipped() -> None:
    assert verdict(None, XEON)[0] is True


def test_the_committed_record_is_the_pipelines_and_the_command_says_one_line() -> None:
    committed = json.loads((REPO / RECORD_NAME).read_text())
    assert set(committed) == {"numerics", "stages"} and committed["stages"]["pretrain"]["device"] == "cpu"
    done = subprocess.run([sys.executable, "-m", "pipeline.core.lock_machine"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode in (0, SKIP_EXIT), done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and done.stdout.startswith("dvc.lock check")
