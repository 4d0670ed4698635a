"""Run records and the timing convention: clock readings go to reports/timing, never to DVC outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import Params
from pipeline.core.tracking import RunRecord, machine_info, record_run
from tests.conftest import REPO


def fake_stage(record: RunRecord) -> dict[str, float]:
    record.add_timing(images_per_second=12.5)
    record.add_timing_table("throughput", ("step", "images_per_second"), [(5, 11.0), (10, 14.0)])
    return {"top1": 50.0}


def test_record_run_writes_the_timing_file_after_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside any git repo: sacred stores no git info
    result = record_run("knn", Params(), fake_stage, runs_dir=tmp_path / "runs", timing_dir=tmp_path / "timing")

    timing = json.loads((tmp_path / "timing" / "knn.json").read_text())
    assert timing["stage"] == "knn"
    assert timing["sacred_run"]["id"] == result["sacred_run"]["id"]
    assert (tmp_path / "runs" / "knn" / str(timing["sacred_run"]["id"]) / "run.json").is_file()
    assert timing["wall_seconds"] >= 0 and timing["process_cpu_seconds"] > 0
    assert timing["images_per_second"] == 12.5
    assert {"device", "cpu", "cpus", "threads", "hostname", "world_size"} <= set(timing["machine"])
    assert (tmp_path / "timing" / "knn_throughput.csv").read_text() == "step,images_per_second\n5,11.0\n10,14.0\n"
    # the stage's result is what main returned, plus the run's name
    assert result["top1"] == 50.0
    # the sacred record keeps the same extras
    run = json.loads((tmp_path / "runs" / "knn" / str(result["sacred_run"]["id"]) / "info.json").read_text())
    assert run["timing"] == {"images_per_second": 12.5}


def test_disabled_record_writes_nothing(tmp_path: Path) -> None:
    # torchrun ranks other than the first, and tests: no run record, no timing file
    result = record_run("knn", Params(), fake_stage, runs_dir=tmp_path / "runs", timing_dir=tmp_path / "timing",
                        enabled=False)
    assert result == {"top1": 50.0}
    assert not (tmp_path / "timing").exists() and not (tmp_path / "runs").exists()


def test_a_failing_stage_leaves_no_timing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    def broken(record: RunRecord) -> dict[str, float]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        record_run("knn", Params(), broken, runs_dir=tmp_path / "runs", timing_dir=tmp_path / "timing")
    assert not (tmp_path / "timing" / "knn.json").exists()


def test_machine_without_cuda_use_is_cpu() -> None:
    # CUDA counts only if the stage initialised it; these tests never do
    assert machine_info()["device"] == "cpu"


def test_a_recorded_stage_prints_no_dependency_warning(tmp_path):
    # a fresh interpreter: in this test session sacred may be imported already, which would hide the warning
    script = (
        "import warnings; warnings.simplefilter('default')\n"
        "from pathlib import Path\n"
        "from pipeline.core.config import params_from_dict\n"
        "from pipeline.core.tracking import record_run\n"
        f"record_run('probe', params_from_dict({{}}), lambda record: {{}}, runs_dir=Path({str(tmp_path / 'runs')!r}),\n"
        f"           timing_dir=Path({str(tmp_path / 'timing')!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_the_environment_names_python_the_lock_and_the_cpu():
    import hashlib
    import platform

    from pipeline.core.tracking import ISA_FLAGS, LOCK_FILE, environment

    env = environment()
    assert env["python"] == platform.python_version()
    assert env["lock_sha256"] == hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()
    assert set(env["isa"]) <= set(ISA_FLAGS) and env["cpu"]
    if platform.machine() == "x86_64":
        assert env["cpu_family"] is not None and "sse4_2" in env["isa"]


def test_the_report_header_shows_the_environment():
    from pipeline.reporting.readme import format_environment

    env = {"python": "3.11.7", "lock_sha256": "a1f2e6b0e482" + "0" * 52, "cpu_family": "25", "cpu_model_number": "17",
           "isa": ["avx2", "avx512f"]}
    assert format_environment(env) == "Python 3.11.7, requirements.lock a1f2e6b0e482, CPU family 25 model 17, ISA avx2 avx512f"
    assert format_environment(None) == "not recorded"
    env["numerics"] = {"mode": "portable", "env": {}, "torch_cpu_capability": "AVX2", "onednn": False, "nnpack": False,
                       "mkl": {"branch": "AVX2", "strict": True}}
    assert format_environment(env).endswith(", numerics portable (torch AVX2, MKL AVX2 strict, oneDNN off)")
