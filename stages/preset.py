"""Run one of the paper's configurations as a DVC experiment: `python -m stages.preset <preset> [<preset> ...]`.

    python -m stages.preset imagenet-20pct                        # the paper's 20% run (AttMask-High)
    python -m stages.preset imagenet-20pct table1-attmask-hint    # one Table 1 row on 20%
    python -m stages.preset imagenet-20pct imagenet-100pct        # the full ImageNet-1k run
    python -m stages.preset imagenet-20pct share-5 --queue        # k-NN vs data share, queued
    python -m stages.preset imagenet-20pct -S data.root=/data/in1k  # any key on top, as dvc exp run -S
    python -m stages.preset imagenet-20pct --dry-run              # print the changes and the dvc command only

A preset is ``presets/<name>.yaml``: dotted params keys and their values.
Presets apply left to right over ``params.yaml`` (later ones win), then the
``-S key=value`` overrides; the result is validated as a whole params file
before anything runs. The keys are then written into ``params.yaml`` (its
comments and layout kept) and ``dvc exp run`` runs the experiment on it
(``--queue`` queues it and puts ``params.yaml`` back as it was). Not a DVC
stage: it starts the pipeline, as ``make compare`` does.

Why not ``dvc exp run -S``: DVC writes the values back in YAML 1.2, where
``1.0e-06`` becomes ``1e-06``. The stages read that as a number
(:func:`pipeline.core.config.parse_yaml`), but a plain YAML 1.1 reader such as
``yaml.safe_load`` in a notebook takes it for the string ``'1e-06'``. Written
here, every float keeps a decimal point and reads the same everywhere.
"""
from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import ParamsError, params_from_dict, set_dotted
from pipeline.reporting.compare import apply_overrides, dvc
from stages import EXIT_USER_ERROR
from stages.paths import PARAMS

PRESETS = Path("presets")


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def overrides_of(names: list[str]) -> list[str]:
    """``key=value`` overrides (values as one line of YAML) of the presets, in order."""
    merged: dict[str, Any] = {}
    for name in names:
        path = PRESETS / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"{name!r} not found; available: {', '.join(available())}")
        merged.update(yaml.safe_load(path.read_text()) or {})
    return [f"{key}={yaml_value(value)}" for key, value in merged.items()]


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML 1.1 (1e-06 must stay a number: ``1.0e-06``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def parse_override(entry: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``, the value read as YAML (``1e-06`` is a number here too).

    Raises:
        ValueError: no ``=`` or no key, or a value that is not YAML.
    """
    key, sep, text = entry.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"-S {entry!r}: expected key=value, e.g. -S data.root=/datasets/imagenet")
    from ruamel.yaml.error import YAMLError

    try:
        value = _round_trip().load(text)
    except YAMLError as error:
        raise ValueError(f"-S {entry!r}: the value is not valid YAML ({' '.join(str(error).split())})") from None
    return key.strip(), _plain(value)


def merged_overrides(names: list[str], settings: list[str]) -> dict[str, Any]:
    """Dotted key -> value: the presets' in order, then the ``-S`` settings (later ones win)."""
    merged = dict(parse_override(entry) for entry in overrides_of(names))
    merged.update(parse_override(entry) for entry in settings)
    return merged


# ------------------------------------------------------------------ params.yaml
def _round_trip() -> Any:
    """A ruamel (DVC's own YAML library) round-trip reader/writer that writes YAML 1.1-readable values.

    Floats always carry a decimal point (``1.0e-06``, ``1.0e+17``: PyYAML, the stages' reader, reads
    ``1e-06`` as a string) and None is ``null`` (ruamel would leave the value empty).
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter
    from ruamel.yaml.scalarfloat import ScalarFloat

    class Representer(RoundTripRepresenter):
        pass

    def represent_float(representer: Any, data: float) -> Any:
        if isinstance(data, ScalarFloat):  # as read from the file: its own layout (0.04, 1.0e-06, ...)
            node = representer.represent_scalar_float(data)
        else:
            node = RoundTripRepresenter.represent_float(representer, data)
        mantissa, e, exponent = node.value.lower().partition("e")
        if e and "." not in mantissa:
            node.value = f"{mantissa}.0e{exponent}"
        return node

    Representer.add_representer(float, represent_float)
    Representer.add_representer(ScalarFloat, represent_float)
    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    handle = YAML()  # round trip: comments, order and layout are kept
    handle.Representer = Representer
    handle.width = 10**6
    handle.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    return handle


def read_params_text(text: str) -> dict[str, Any]:
    """``params.yaml`` as plain dicts and lists (YAML 1.2 floats such as ``1e-06`` read as numbers)."""
    return _plain(_round_trip().load(text) or {})


def _plain(value: Any) -> Any:
    """ruamel's round-trip types (CommentedMap, ScalarFloat, ...) as the plain ones PyYAML gives."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    for kind in (bool, int, float, str):  # bool before int: True is an int too
        if isinstance(value, kind):
            return kind(value)
    return value


def updated_params_text(text: str, overrides: dict[str, Any]) -> str:
    """``params.yaml``'s text with the dotted ``overrides`` set; comments, key order and other values kept."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    handle = _round_trip()
    document = handle.load(text) or CommentedMap()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = document
        for depth, key in enumerate(parents):
            if key not in node or node[key] is None:
                node[key] = CommentedMap()
            node = node[key]
            if not isinstance(node, dict):
                raise ParamsError(".".join(parents[: depth + 1]), f"is not a section; cannot set {dotted}")
        if isinstance(value, list):
            old = node.get(leaf)
            sequence = CommentedSeq(value)
            if not isinstance(old, CommentedSeq) or old.fa.flow_style():
                sequence.fa.set_flow_style()  # [0.25, 1.0] stays on one line, as in the file
            value = sequence
        node[leaf] = value
    stream = io.StringIO()
    handle.dump(document, stream)
    return stream.getvalue()


def check_reads_back(text: str, overrides: dict[str, Any]) -> None:
    """Every override reads back from ``text`` as the stages read it (PyYAML), and the whole file validates."""
    raw = yaml.safe_load(text)
    for dotted, value in overrides.items():
        node: Any = raw
        for key in dotted.split("."):
            node = node[key]
        if node != value or type(node) is not type(value):
            raise ValueError(f"{dotted}: written as {node!r}, not {value!r}")  # a bug of this module, not the user's
    params_from_dict(apply_overrides(raw, []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+", help=f"names under {PRESETS}/, applied in order")
    parser.add_argument("-S", "--set-param", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="one more key on top of the presets (as dvc exp run -S), e.g. -S data.root=/data/in1k")
    parser.add_argument("--queue", action="store_true", help="queue the experiment (dvc exp run --queue)")
    parser.add_argument("--name", help="experiment name (default: the presets joined by '+')")
    parser.add_argument("--dry-run", action="store_true", help="print the changes and the dvc command, run nothing")
    args = parser.parse_args(argv)
    try:
        original = PARAMS.read_text()
        overrides = merged_overrides(args.presets, args.settings)
        raw = read_params_text(original)
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        params_from_dict(apply_overrides(raw, []))
        updated = updated_params_text(original, overrides)
        check_reads_back(updated, overrides)
    except (ParamsError, ValueError) as error:
        print(f"preset: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    command = ["exp", "run", *(["--queue"] if args.queue else []), "--name", args.name or "+".join(args.presets)]
    if args.dry_run:
        for key, value in overrides.items():
            print(f"{PARAMS}: {key}: {yaml_value(value)}")
        print("dvc " + shlex.join(command))
        return 0
    PARAMS.write_text(updated)
    try:
        dvc(*command)
    except subprocess.CalledProcessError as error:  # dvc has said why; its status is ours
        return error.returncode
    finally:
        if args.queue:  # the queued experiment took the workspace's params.yaml with it
            PARAMS.write_text(original)
    return 0


if __name__ == "__main__":
    sys.exit(main())
