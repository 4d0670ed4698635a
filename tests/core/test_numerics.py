"""What a CPU result depends on besides params and data (pipeline/core/numerics.py).

The thread count (params.yaml `threads`) reaches torch and the BLAS / OpenMP
pools; `numerics` pins the libraries' ISA dispatch before Python starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import typing

import pytest
import torch
from threadpoolctl import threadpool_info

from pipeline.core import numerics
from pipeline.core.config import Params, ParamsError, params_from_dict
from pipeline.core.numerics import limit_threads
from tests.conftest import REPO


def test_limit_threads_sets_torch_and_blas():
    before = torch.get_num_threads()
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] in ("blas", "openmp"))
    finally:
        limit_threads(before)


def test_threads_is_a_checked_param():
    assert params_from_dict({}).threads == 2
    with pytest.raises(ParamsError) as error:
        params_from_dict({"threads": 0})
    assert error.value.key == "threads"

PROBE = ("import json, os, sys; from pipeline.core.numerics import ensure_numerics, CONTROLS; "
         "ensure_numerics(sys.argv[1]); print(json.dumps({'env': {k: os.environ[k] for k in CONTROLS if k in os.environ}, "
         "'argv': sys.argv[1:], 'mark': os.environ.get('ATTMASK_NUMERICS_REEXEC')}))")


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in numerics.CONTROLS}
    done = subprocess.run([sys.executable, "-c", PROBE, mode, "extra"], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_modes_are_the_params_choices():
    hint = typing.get_type_hints(Params)["numerics"]
    assert typing.get_args(hint) == numerics.NUMERICS_MODES
    assert Params().numerics == "portable"
    with pytest.raises(ParamsError) as error:
        params_from_dict({"numerics": "fast"})
    assert error.value.key == "numerics"


def test_portable_pins_the_libraries_and_compatible_only_changes_mkl():
    portable, compatible = numerics.numerics_env("portable"), numerics.numerics_env("compatible")
    assert portable == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX512,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
                        "OPENBLAS_CORETYPE": "Haswell", "NPY_ENABLE_CPU_FEATURES": "X86_V3"}
    assert compatible == {**portable, "MKL_CBWR": "COMPATIBLE,STRICT"}
    assert numerics.numerics_env("native") == {}
    with pytest.raises(ValueError, match="numerics must be one of"):
        numerics.numerics_env("fast")


def test_a_process_without_the_controls_re_executes_itself_with_them():
    result = probe("portable", ATEN_CPU_CAPABILITY="avx512")
    assert result["env"] == numerics.numerics_env("portable")
    assert result["argv"] == ["portable", "extra"]  # same command line
    assert result["mark"] is None  # removed once the controls are right: a child may switch modes again


def test_native_removes_every_control():
    assert probe("native", **numerics.numerics_env("portable"))["env"] == {}


def test_a_stage_runs_under_the_params_numerics_before_torch_loads(tmp_path):
    """`python -m stages.X` re-executes while importing the stages package (argv[0] is "-m" then)."""
    (tmp_path / "params.yaml").write_text("numerics: compatible\n")
    script = ("import sys; sys.argv = ['-m']; import stages, os, json; "
              "print(json.dumps({k: os.environ.get(k) for k in ('MKL_CBWR', 'ATEN_CPU_CAPABILITY')}))")
    clean = {k: v for k, v in os.environ.items() if k not in numerics.CONTROLS}
    clean["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=clean, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"MKL_CBWR": "COMPATIBLE,STRICT", "ATEN_CPU_CAPABILITY": "avx2"}


def test_configure_numerics_takes_torch_off_onednn_and_nnpack_and_describe_records_it():
    before = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    try:
        warning = numerics.configure_numerics("portable")
        assert warning is None or "MKL ignores" in warning
        assert not torch.backends.mkldnn.enabled and not torch._C._get_nnpack_enabled()
        described = numerics.describe_numerics()
        assert described["onednn"] is False and described["nnpack"] is False
        assert described["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        numerics.configure_numerics("native")
        assert torch.backends.mkldnn.enabled and torch._C._get_nnpack_enabled()
    finally:
        torch.backends.mkldnn.enabled = before[0]
        torch.backends.nnpack.set_flags(before[1])


def test_describe_names_the_mode_its_environment_matches(monkeypatch):
    for name in numerics.CONTROLS:
        monkeypatch.delenv(name, raising=False)
    assert numerics.describe_numerics()["mode"] == "native"
    for name, value in numerics.numerics_env("compatible").items():
        monkeypatch.setenv(name, value)
    assert numerics.describe_numerics()["mode"] == "compatible"
    monkeypatch.setenv("MKL_CBWR", "AVX512")
    assert numerics.describe_numerics()["mode"] == "custom"


def test_mkl_reports_the_branch_it_was_given():
    """MKL_CBWR reaches torch's MKL (a fresh process: MKL reads it once)."""
    script = "import json, torch; from pipeline.core.numerics import mkl_branch; print(json.dumps(mkl_branch()))"
    clean = {k: v for k, v in os.environ.items() if k not in numerics.CONTROLS}
    found = {}
    for value in ("COMPATIBLE,STRICT", "AVX2"):
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**clean, "MKL_CBWR": value},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        found[value] = json.loads(done.stdout)
    if found["AVX2"] is None:
        pytest.skip("this torch has no MKL CNR functions")
    assert found["COMPATIBLE,STRICT"] == {"branch": "COMPATIBLE", "strict": True}
    # MKL honours AVX2 on Intel CPUs; elsewhere it falls back to its own choice, which configure_numerics reports
    assert found["AVX2"]["strict"] is False and found["AVX2"]["branch"] in ("AVX2", "AUTO")


def test_a_cpu_where_mkl_ignores_the_branch_gets_a_one_line_warning(monkeypatch):
    """On AMD, MKL takes MKL_CBWR=AVX512 as its AUTO branch (MKL's docs): the stage log must say so."""
    monkeypatch.setenv("MKL_CBWR", "AVX512,STRICT")
    monkeypatch.setattr(numerics, "mkl_branch", lambda: {"branch": "AUTO", "strict": True})
    before = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    try:
        warning = numerics.configure_numerics("portable")
    finally:
        torch.backends.mkldnn.enabled = before[0]
        torch.backends.nnpack.set_flags(before[1])
    assert warning.startswith("numerics: portable: MKL ignores MKL_CBWR=AVX512 on this CPU and uses its AUTO branch")
    assert "\n" not in warning and "numerics: compatible" in warning
