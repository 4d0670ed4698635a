"""The shared stage entry point: user errors end in one line and exit 2, bugs keep their traceback."""
from __future__ import annotations

import pytest
import yaml

from pipeline.core.config import ParamsError
from pipeline.data.shard_writer import DatasetError
from stages import EXIT_USER_ERROR, describe_error, run_stage


def test_bad_params_exit_with_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"masking": {"strategy": "everything"}}))
    ran = []
    with pytest.raises(SystemExit) as exit_:
        run_stage("knn", lambda params, record: ran.append(1) or {})
    assert exit_.value.code == EXIT_USER_ERROR and not ran
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("knn: pipeline.core.config.ParamsError: masking.strategy"), err


def test_error_raised_by_the_stage_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")

    def main(params, record):
        raise DatasetError("data/raw/train: no class folders\n(expected train/<class>/*)")

    with pytest.raises(SystemExit) as exit_:
        run_stage("shard", main, enabled=False)
    assert exit_.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == (
        "shard: pipeline.data.shard_writer.DatasetError: data/raw/train: no class folders (expected train/<class>/*)\n")


def test_missing_input_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")

    def main(params, record):
        raise FileNotFoundError("data/features/pretrained/train.npz: not found; run the extract stage first")

    with pytest.raises(SystemExit):
        run_stage("knn", main, enabled=False)
    assert capsys.readouterr().err.startswith("knn: FileNotFoundError: data/features/pretrained/train.npz")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(ZeroDivisionError):
        run_stage("knn", lambda params, record: {"x": 1 / 0}, enabled=False)


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTMASK_TRACEBACK", "1")
    (tmp_path / "params.yaml").write_text("seed: -1\n")
    with pytest.raises(ParamsError):
        run_stage("knn", lambda params, record: {}, enabled=False)


def test_describe_error_without_message():
    assert describe_error("pretrain", KeyboardInterrupt()) == "pretrain: KeyboardInterrupt"


def test_only_a_stage_process_re_executes_for_its_numerics(monkeypatch):
    """run_stage called in-process (here, pytest) must never replace the process."""
    import stages

    assert not stages.launched_as_stage()
    monkeypatch.setattr("sys.orig_argv", ["python", "-u", "-m", "stages.pretrain"])
    assert stages.launched_as_stage()
    monkeypatch.setattr("sys.orig_argv", ["python", "-m", "pytest", "tests"])
    assert not stages.launched_as_stage()
