"""AttMask-High against AttMask-Low at several pre-training budgets: where does the paper's largest gap separate?

Run: ``.venv/bin/python -m bench.strategy_budget [--epochs 3 12] [--seeds 0 1 2]``;
writes ``reports/bench/strategy_budget.json``. For every seed it generates and
shards that seed's embedded dataset once (as ``make compare`` does, ``seed``
redraws the images), then for every budget and strategy runs the real
``pretrain``, ``extract`` and ``knn`` stages in a scratch workspace with
``params.yaml`` changed only in ``seed``, ``pretrain.epochs`` and
``masking.strategy`` (and ``pretrain.eval_every: 0``, which does not change the
weights). It records each run's teacher k-NN@20 and, per budget, the mean ± sd
over seeds of both strategies and whether their difference exceeds the seed
spread, by the rule ``reports/comparison.md`` uses. The paper's gap is 5.7
points (ViT-S, 100 epochs on 20% of ImageNet). Needs ``make repro`` first
(seed 0's ``data/shards``); ~50 minutes on 2 cores for the defaults.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.learning_curve import knn_and_minutes, run_stages
from bench.machine import machine_info
from pipeline.reporting.compare import Stat, exceeds_spread

OUTPUT = Path("reports/bench/strategy_budget.json")
STRATEGIES = ("attmask_high", "attmask_low")
PAPER_GAP = 5.7  # AttMask-High minus AttMask-Low, k-NN (the paper's Table 1)


def with_overrides(params: dict[str, Any], seed: int, epochs: int | None = None,
                   strategy: str | None = None) -> dict[str, Any]:
    """A deep copy of ``params`` with the seed, and the budget and strategy when given."""
    params = json.loads(json.dumps(params))
    params["seed"] = seed
    params["pretrain"]["eval_every"] = 0
    if epochs is not None:
        params["pretrain"]["epochs"] = epochs
        params["pretrain"]["min_steps"] = 0  # the budget as given
    if strategy is not None:
        params["masking"]["strategy"] = strategy
    return params


def summarise(runs: list[dict[str, Any]], budgets: list[int]) -> list[dict[str, Any]]:
    """Per budget: each strategy's mean ± sd over seeds, High minus Low, and whether it exceeds the spread."""
    rows = []
    for epochs in budgets:
        stats = {s: Stat(tuple(r["knn"]["pretrained"] for r in runs if r["epochs"] == epochs and r["strategy"] == s))
                 for s in STRATEGIES}
        if any(stat.n == 0 for stat in stats.values()):
            continue
        high, low = stats["attmask_high"], stats["attmask_low"]
        rows.append({"epochs": epochs, "seeds": high.n,
                     "minutes": sum(r["minutes"] for r in runs if r["epochs"] == epochs) / (2 * high.n),
                     "knn": {s: {"mean": stat.mean, "sd": stat.sd} for s, stat in stats.items()},
                     "high_minus_low": high.mean - low.mean, "separated": exceeds_spread(high, low)})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 12])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shards", type=Path, default=Path("data/shards"), help="the workspace seed's shards")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--merge", action="store_true", help="keep the runs already in --out (other budgets or seeds)")
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path("params.yaml").read_text())
    if params["seed"] in args.seeds and not (args.shards / "manifest.json").is_file():
        raise SystemExit(f"strategy_budget: {args.shards} has no manifest.json; run `make repro` first")
    runs: list[dict[str, Any]] = json.loads(args.out.read_text())["runs"] if args.merge and args.out.is_file() else []
    new = {(seed, epochs) for seed in args.seeds for epochs in args.epochs}
    runs = [r for r in runs if (r["seed"], r["epochs"]) not in new]
    scratch_root = Path(tempfile.mkdtemp(prefix="strategy_budget_"))
    try:
        for seed in args.seeds:
            shards = args.shards
            if seed != params["seed"]:
                data_scratch = scratch_root / f"data_seed{seed}"
                run_stages(with_overrides(params, seed), shards, data_scratch, stages=("generate", "shard"))
                shards = data_scratch / "data" / "shards"
            for epochs in args.epochs:
                for strategy in STRATEGIES:
                    scratch = scratch_root / f"seed{seed}_{epochs}_{strategy}"
                    run_stages(with_overrides(params, seed, epochs, strategy), shards, scratch)
                    top1, minutes = knn_and_minutes(scratch)
                    shutil.rmtree(scratch, ignore_errors=True)
                    runs.append({"seed": seed, "epochs": epochs, "strategy": strategy, "minutes": minutes,
                                 "knn": top1})
                    print(f"  seed {seed}, {epochs:3d} epochs, {strategy:13s}: k-NN@20 {top1['pretrained']:.1f} "
                          f"({minutes:.1f} min)", flush=True)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    budgets = sorted({r["epochs"] for r in runs})
    report = {"machine": machine_info(), "k": 20, "seeds": sorted({r["seed"] for r in runs}), "paper_gap": PAPER_GAP, "runs": runs,
              "budgets": summarise(runs, budgets)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["budgets"]:
        verdict = "exceeds" if row["separated"] else "within"
        print(f"  {row['epochs']:3d} epochs: High - Low = {row['high_minus_low']:+.1f} ({verdict} the seed spread)")
    return report


if __name__ == "__main__":
    main()
