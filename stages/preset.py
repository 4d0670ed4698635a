"""Run one of the paper's configurations as a DVC experiment: `python -m stages.preset <preset> [<preset> ...]`.

    python -m stages.preset imagenet-20pct                        # the paper's 20% run (AttMask-High)
    python -m stages.preset imagenet-20pct table1-attmask-hint    # one Table 1 row on 20%
    python -m stages.preset imagenet-20pct imagenet-100pct        # the full ImageNet-1k run
    python -m stages.preset imagenet-20pct share-5 --queue        # k-NN vs data share, queued
    python -m stages.preset imagenet-20pct --dry-run              # print the dvc command only

A preset is ``presets/<name>.yaml``: dotted params keys and their values.
Presets apply left to right over ``params.yaml`` (later ones win); the result
is validated as a whole params file before anything runs, then handed to
``dvc exp run -S key=value ...`` (``--queue`` queues it instead). Not a DVC
stage: it starts the pipeline, as ``make compare`` does.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import ParamsError, params_from_dict
from pipeline.reporting.compare import apply_overrides, dvc
from stages import EXIT_USER_ERROR
from stages.paths import PARAMS

PRESETS = Path("presets")


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def overrides_of(names: list[str]) -> list[str]:
    """``key=value`` overrides (values as JSON, which DVC's -S reads as YAML) of the presets, in order."""
    merged: dict[str, Any] = {}
    for name in names:
        path = PRESETS / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"{name!r} not found; available: {', '.join(available())}")
        merged.update(yaml.safe_load(path.read_text()) or {})
    return [f"{key}={yaml_value(value)}" for key, value in merged.items()]


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML, as DVC's -S reads it (1e-06 must stay a number: ``1.0e-06``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+", help=f"names under {PRESETS}/, applied in order")
    parser.add_argument("--queue", action="store_true", help="queue the experiment (dvc exp run --queue)")
    parser.add_argument("--name", help="experiment name (default: the presets joined by '+')")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command, run nothing")
    args = parser.parse_args(argv)
    try:
        overrides = overrides_of(args.presets)
        params_from_dict(apply_overrides(yaml.safe_load(PARAMS.read_text()), overrides))
    except (ParamsError, ValueError) as error:
        print(f"preset: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    command = ["exp", "run", *(["--queue"] if args.queue else []), "--name", args.name or "+".join(args.presets)]
    for override in overrides:
        command += ["--set-param", override]
    if args.dry_run:
        print("dvc " + shlex.join(command))
        return 0
    dvc(*command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
