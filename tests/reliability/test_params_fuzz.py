"""Params: generated params dicts and files are either valid or a ParamsError naming the key, never a deep traceback.

The schema is read from the dataclasses, so keys added later are fuzzed too.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import sys
import typing
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.core.config import Params, ParamsError, load_params, params_from_dict, params_to_dict, parse_yaml
from tests.reliability.support import stage_env

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BASE = params_to_dict(Params())


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """dotted key -> default value, for every non-section key."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def hints() -> dict[str, Any]:
    """dotted key -> type hint, from the dataclasses."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(types[f.name]):
                walk(types[f.name], f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = types[f.name]

    walk(Params, "")
    return out


LEAVES = leaves(BASE)
HINTS = hints()
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})


def with_value(dotted: str, value: Any, tree: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(tree or BASE)
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def without(dotted: str) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    del node[leaf]
    return raw


def named_key(error: ParamsError, raw: dict[str, Any]) -> str:
    """The error's key, checked to be a real dotted key (schema or the given dict) and to lead its message."""
    assert str(error).startswith(f"{error.key}:"), str(error)
    base = re.sub(r"\[\d+\]$", "", error.key)
    known = set(LEAVES) | set(SECTIONS) | set(leaves(raw)) | set(_sections(raw))
    assert base in known, f"error names {error.key!r}, which is no key of the params: {error}"
    return error.key


def _sections(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.append(f"{prefix}{key}")
            out += _sections(value, f"{prefix}{key}.")
    return out


def outcome(raw: Any) -> str | None:
    """None when valid, else the key a ParamsError names; any other exception fails the test."""
    try:
        params = params_from_dict(raw)
    except ParamsError as error:
        return named_key(error, raw if isinstance(raw, dict) else {})
    assert params_from_dict(params_to_dict(params)) == params
    return None


# ------------------------------------------------------------- every key
WRONG_TYPE = {"str": 12, "other": "twelve"}


@pytest.mark.fault_case("params", "every key with a value of the wrong type: error naming exactly that key")
def test_wrong_type_for_every_key_names_it():
    for dotted, hint in HINTS.items():
        value = WRONG_TYPE["str" if hint is str or "str" in str(hint) else "other"]
        if hint is str and dotted == "data.root":
            continue  # any string is a path; 12 is refused below by type
        key = outcome(with_value(dotted, value if hint is not str else 12))
        assert key is not None and re.sub(r"\[\d+\]$", "", key) == dotted, (dotted, key)


@pytest.mark.fault_case("params", "NaN, inf and 1e400 for every number: error naming exactly that key")
def test_non_finite_numbers_name_their_key():
    numbers = [k for k, h in HINTS.items() if h is float or "float" in str(h)]
    assert numbers
    for dotted in numbers:
        for value in (math.nan, math.inf, -math.inf, 10**400):
            raw = with_value(dotted, [value, value] if "tuple" in str(HINTS[dotted]) else value)
            key = outcome(raw)
            assert key is not None and re.sub(r"\[\d+\]$", "", key) == dotted, (dotted, value, key)


@pytest.mark.fault_case("params", "every key missing: the default is used (a valid run)")
def test_missing_keys_take_their_defaults():
    for dotted in list(LEAVES) + SECTIONS:
        assert outcome(without(dotted)) is None, dotted


@pytest.mark.fault_case("params", "a typo of every key: error naming the typo and suggesting the real key")
def test_typo_of_every_key_suggests_it():
    for dotted in list(LEAVES) + SECTIONS:
        *parents, leaf = dotted.split(".")
        typo = leaf[0] + leaf[2:] if len(leaf) > 2 else leaf + "x"  # drop the second letter
        raw = copy.deepcopy(BASE)
        node = raw
        for key in parents:
            node = node[key]
        node[typo] = node.pop(leaf)
        with pytest.raises(ParamsError) as error:
            params_from_dict(raw)
        assert error.value.key == ".".join([*parents, typo])
        if len(leaf) >= 4:
            assert f"did you mean {dotted!r}" in str(error.value), str(error.value)


# ------------------------------------------------------------------ fuzzing
HOSTILE_VALUES = st.one_of(
    st.sampled_from([None, True, False, "", "x", "ten", -1, 0, 1, 2, 2**64, -(2**64), 0.5, -0.0, 1e308,
                     math.nan, math.inf, [], {}, [1], [0.1, 0.2], [1, 2, 3], "0.5", "attmask_high", "cpu"]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=3),
)


@st.composite
def mutated_params(draw) -> dict[str, Any]:
    """The defaults with 1-3 mutations: bad values, deleted keys, unknown keys, typos, scalars for sections."""
    raw = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "delete", "unknown", "typo", "section"]))
        dotted = draw(st.sampled_from(sorted(leaves(raw)) or ["seed"]))
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        if kind == "value":
            node[leaf] = draw(HOSTILE_VALUES)
        elif kind == "delete":
            node.pop(leaf, None)
        elif kind == "unknown":
            node[draw(st.text(min_size=1, max_size=12))] = draw(HOSTILE_VALUES)
        elif kind == "typo" and len(leaf) > 1:
            at = draw(st.integers(0, len(leaf) - 1))
            node[leaf[:at] + draw(st.sampled_from("aeiosx_")) + leaf[at + 1:]] = node.pop(leaf)
        elif kind == "section" and parents:
            parent = raw
            for key in parents[:-1]:
                parent = parent[key]
            parent[parents[-1]] = draw(HOSTILE_VALUES)
    return raw


@pytest.mark.fault_case("params", "generated params dicts (hypothesis, 250 examples): valid or a ParamsError naming a real key")
@settings(FUZZ, max_examples=250)
@given(raw=mutated_params())
def test_generated_params_are_valid_or_name_the_key(raw):
    outcome(raw)


YAML_PIECES = st.sampled_from(["seed", "masking", "ratio", "strategy", "pretrain", "epochs", ":", ": ", "\n", "  ",
                               "- ", "[", "]", "{", "}", ",", "'", '"', "&a", "*a", "!!python/object:os.system",
                               "!!binary", "0x1F", "1e999", ".nan", "null", "~", "yes", "#", "\t", "<<: *a", "---", "…"])


@pytest.mark.fault_case("params", "generated params.yaml text (hypothesis, 200 examples): valid or a ParamsError naming the file or key")
@settings(FUZZ, max_examples=200)
@given(text=st.lists(YAML_PIECES | st.text(max_size=4), max_size=25).map("".join))
def test_generated_params_files_are_valid_or_name_the_problem(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(text)
    try:
        load_params(path)
    except ParamsError as error:
        assert error.key == str(path) or named_key(error, parse_yaml(text) if _is_mapping(text) else {})


def _is_mapping(text: str) -> bool:
    try:
        return isinstance(parse_yaml(text), dict)
    except yaml.YAMLError:
        return False


@pytest.mark.parametrize("text, names", [
    ("masking:\n  ratio: 0.3\n  ratio: 0.5\n", "duplicate key 'ratio'"),
    ("seed: !!python/object/apply:os.system ['touch {sentinel}']\n", "could not determine a constructor"),
    ("masking: {ratio: 0.3\n", "not a valid params file"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("\xff\xfe", "unreadable"),
], ids=["duplicate key", "python tag", "syntax error", "top-level list", "not UTF-8"])
@pytest.mark.fault_case("params", "broken params.yaml: one-line ParamsError naming the file, payloads never run")
def test_broken_params_file_names_the_file(text, names, tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "params.yaml"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00masking")
    else:
        path.write_text(text.replace("{sentinel}", str(sentinel)))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert error.value.key == str(path) and names in str(error.value) and "\n" not in str(error.value)
    assert not sentinel.exists()


@pytest.mark.slow
@pytest.mark.fault_case("params", "stage command with a bad params.yaml: fails before any work, one line on stderr names the key, exit 2")
def test_stage_with_bad_params_fails_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value("masking.ratio", 0.9)))
    done = subprocess.run([sys.executable, "-m", "stages.shard"], cwd=tmp_path, env=stage_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith("shard: pipeline.core.config.ParamsError: masking.ratio_var: ratio +- ratio_var"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no data, no run record
