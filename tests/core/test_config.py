"""params.yaml parsing: every bad value is an error naming its dotted key."""
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import ParamsError, load_params, params_from_dict, params_to_dict, parse_yaml

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.masking.strategy in {"block", "random", "attmask_high", "attmask_hint", "attmask_low"}


def test_round_trip_through_dict():
    params = load_params(REPO / "params.yaml")
    assert params_from_dict(params_to_dict(params)) == params


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"masking": {"strategy": "attmask_middle"}}, "masking.strategy"),
        ({"masking": {"ratio": 0.9, "ratio_var": 0.2}}, "masking.ratio_var"),
        ({"masking": {"ratio": 0.1, "ratio_var": 0.2}}, "masking.ratio_var"),
        ({"masking": {"show_max": 1.5}}, "masking.show_max"),
        ({"masking": {"prob": -0.1}}, "masking.prob"),
        ({"augment": {"global_size": 30}}, "augment.global_size"),
        ({"augment": {"local_size": 18}}, "augment.local_size"),
        ({"augment": {"local_scale": [0.3, 0.1]}}, "augment.local_scale"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
        ({"pretrain": {"epochs": "ten"}}, "pretrain.epochs"),
        ({"pretrain": {"device": "tpu"}}, "pretrain.device"),
        ({"pretrain": {"resume": "yes"}}, "pretrain.resume"),
        ({"pretrain": {"epoch": 3}}, "pretrain.epoch"),
        ({"data": {"source": "imagenet"}}, "data.source"),
        ({"data": {"per_class": 10, "percent": 20}}, "data.percent"),
        ({"data": {"percent": 0}}, "data.percent"),
        ({"data": {"root": "/somewhere"}}, "data.root"),
        ({"model": {"arch": "vit_smal_patch16_224"}}, "model.arch"),
        ({"model": {"embed_dim": 100, "num_heads": 3}}, "model.num_heads"),
        ({"mask": {}}, "mask"),
    ],
)
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(ParamsError) as error:
        params_from_dict(raw)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}:")


def test_typo_suggests_the_real_key():
    with pytest.raises(ParamsError, match="did you mean 'pretrain.epochs'"):
        params_from_dict({"pretrain": {"epoch": 3}})


def test_unknown_strategy_lists_allowed_values():
    with pytest.raises(ParamsError, match="attmask_hint"):
        params_from_dict({"masking": {"strategy": "attmask_middle"}})


def test_timm_shape_only_lists_set_keys():
    params = params_from_dict({"model": {"depth": None, "img_size": 64}})
    assert "depth" not in params.model.timm_shape()
    assert params.model.timm_shape()["img_size"] == 64


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_dataclass_defaults_are_params_yaml():
    """One set of defaults: a key left out of params.yaml means the value params.yaml ships with."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    shipped = flat(params_to_dict(load_params(REPO / "params.yaml")))
    defaults = flat(params_to_dict(params_from_dict({})))
    differ = {k: (defaults.get(k), v) for k, v in shipped.items() if defaults.get(k) != v}
    assert not differ, f"dataclass default vs params.yaml: {differ}"


def test_floats_as_dvc_writes_them_are_floats_in_a_file_and_in_compare_overrides(tmp_path: Path):
    # DVC (YAML 1.2) writes 1e-05 without a dot; PyYAML's YAML 1.1 rules alone would read the string '1e-05'
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  lr: 4e-03\n  min_lr: 1e-06\n  weight_decay: 1.0e-2\n")
    params = load_params(path)
    assert (params.pretrain.lr, params.pretrain.min_lr, params.pretrain.weight_decay) == (4e-3, 1e-6, 1e-2)
    assert parse_yaml("1e-05") == 1e-5 and parse_yaml("-2E+3") == -2000.0 and parse_yaml("1e5x") == "1e5x"
    assert yaml.safe_load("1e-05") == "1e-05"  # SafeLoader itself is left as it was
    params_from_dict({"compare": {"budget": ["pretrain.lr=1e-05"]}})  # a budget override of a float key: no type error
    with pytest.raises(ParamsError, match="pretrain.lr"):
        params_from_dict({"compare": {"budget": ["pretrain.lr=fast"]}})
