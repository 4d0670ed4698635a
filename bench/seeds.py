"""The embedded default at three seeds: the spread the README's results table quotes (``python -m bench.seeds``).

Writes ``reports/bench/seeds.json`` (rendered into ``reports/bench.md``). Seed 0
is ``make repro``'s own run, read from this workspace (run ``make repro``
first); every other seed runs the whole pipeline, ``generate`` to ``metrics``,
in a scratch copy with ``params.yaml`` changed only in ``seed``: the seed changes
the generated images, the initialisation and every random draw. ~7 minutes a
seed on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.learning_curve import run_stages
from bench.machine import machine_info
from bench.real_data import headline_row

OUTPUT = Path("reports/bench/seeds.json")
STAGES = ("generate", "shard", "pretrain", "extract", "knn", "fewshot", "linear", "linear_sgd", "finetune", "metrics")


def run_seed(seed: int, params: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """The default pipeline at ``seed`` in ``scratch``; its headline row."""
    params = json.loads(json.dumps(params))
    params["seed"] = seed
    start = time.perf_counter()
    run_stages(params, Path(), scratch, stages=STAGES)
    return {"seed": seed, **headline_row(scratch, params), "minutes": (time.perf_counter() - start) / 60}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path("params.yaml").read_text())
    if params["seed"] in args.seeds and not Path("reports/metrics.json").is_file():
        raise SystemExit("seeds: reports/metrics.json is missing; run `make repro` first (it is the seed-0 run)")
    rows = []
    for seed in args.seeds:
        if seed == params["seed"]:
            row = {"seed": seed, **headline_row(Path("."), params), "minutes": None}
        else:
            with tempfile.TemporaryDirectory(prefix=f"seeds_{seed}_", ignore_cleanup_errors=True) as scratch:
                row = run_seed(seed, params, Path(scratch))
        rows.append(row)
        print(f"  seed {seed}: k-NN {row['knn']['pretrained']:.1f} / random init {row['knn']['random_init']:.1f} / "
              f"pixels {row['knn']['pixels']:.1f}; linear {row['linear']['pretrained']:.1f}; "
              f"fine-tune {row['finetune']['pretrained']:.1f}", flush=True)
    report = {"machine": machine_info(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
