"""The embedded default's k-NN gap against pre-training budget (reports/bench.md).

Run: ``.venv/bin/python -m bench.learning_curve [--epochs 4 8 16 32]``; writes
``reports/bench/learning_curve.json``. For each ``pretrain.epochs`` it runs the
real stages (``python -m stages.pretrain``, ``extract``, ``knn``, each in its
own process as ``make repro`` runs them) in a scratch copy of the workspace
that shares ``data/shards``, with every other param as in ``params.yaml``
(the cosine schedules stretch with the budget). It records the pre-trained
teacher's k-NN@20, the random-init and raw-pixel baselines (constant: they do
not depend on pre-training) and the pre-training wall minutes, and reports
where the gap to each baseline crosses +15 points (log-linear interpolation
in minutes between measured budgets; none when the curve stays below).
Needs ``make repro`` first (for ``data/shards``); ~45 minutes on 2 cores for
the default budgets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

OUTPUT = Path("reports/bench/learning_curve.json")
TARGET = 15.0  # points above each baseline: the floor the default recipe keeps over random init
K = "20"


def run_stages(params: dict[str, Any], shards: Path, scratch: Path,
               stages: tuple[str, ...] = ("pretrain", "extract", "knn")) -> None:
    """Run ``python -m stages.<name>`` for each of ``stages`` in ``scratch`` under ``params``.

    Each stage runs in its own process, as ``make repro`` runs it; ``scratch/data/shards``
    links to ``shards`` unless the stages build it themselves (``generate``, ``shard``).
    """
    (scratch / "data").mkdir(parents=True, exist_ok=True)
    if "shard" not in stages:
        (scratch / "data" / "shards").symlink_to(shards.resolve())
    (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    for stage in stages:
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=scratch, env=env, text=True,
                              capture_output=True)
        if done.returncode:
            raise RuntimeError(f"{stage} in {scratch} failed:\n{done.stderr[-2000:]}")


def knn_and_minutes(scratch: Path) -> tuple[dict[str, float], float]:
    """k-NN@20 top-1 per feature variant and the pre-training wall minutes of a finished scratch run."""
    knn = json.loads((scratch / "reports" / "eval" / "knn.json").read_text())
    timing = json.loads((scratch / "reports" / "timing" / "pretrain.json").read_text())
    return {variant: entry["top1"][K] for variant, entry in knn.items()}, timing["wall_seconds"] / 60


def run_budget(epochs: int, shards: Path, params: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """pretrain + extract + knn at ``epochs`` in ``scratch``; the k-NN@20 per variant and the minutes."""
    params = json.loads(json.dumps(params))
    params["pretrain"]["epochs"] = epochs
    params["pretrain"]["min_steps"] = 0  # the curve is over epochs as given
    run_stages(params, shards, scratch)
    top1, minutes = knn_and_minutes(scratch)
    return {"epochs": epochs, "minutes": minutes, "knn": top1,
            "gap": {base: top1["pretrained"] - top1[base] for base in ("random_init", "pixels") if base in top1}}


def crossing(points: list[dict[str, Any]], baseline: str, target: float = TARGET) -> float | None:
    """Minutes where the gap to ``baseline`` first reaches ``target``, interpolated in log(minutes)."""
    ordered = sorted(points, key=lambda p: p["minutes"])
    for low, high in zip([None, *ordered], ordered):
        if high["gap"][baseline] >= target:
            if low is None:
                return high["minutes"]
            g0, g1 = low["gap"][baseline], high["gap"][baseline]
            t0, t1 = math.log(low["minutes"]), math.log(high["minutes"])
            return math.exp(t0 + (target - g0) / (g1 - g0) * (t1 - t0))
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--shards", type=Path, default=Path("data/shards"))
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if not (args.shards / "manifest.json").is_file():
        raise SystemExit(f"learning_curve: {args.shards} has no manifest.json; run `make repro` first")
    params = yaml.safe_load(Path("params.yaml").read_text())
    points = []
    for epochs in args.epochs:
        scratch = Path(tempfile.mkdtemp(prefix=f"learning_curve_{epochs}_"))
        try:
            point = run_budget(epochs, args.shards, params, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        points.append(point)
        print(f"  {epochs:3d} epochs, {point['minutes']:5.1f} min: k-NN@20 {point['knn']['pretrained']:.1f}, "
              f"+{point['gap']['random_init']:.1f} over random init, {point['gap']['pixels']:+.1f} over pixels", flush=True)
    from bench.machine import machine_info  # torch only when the bench runs, not when its helpers are imported

    report = {"machine": machine_info(), "target": TARGET, "k": int(K), "seed": params["seed"], "points": points,
              "crosses_at_minutes": {base: crossing(points, base) for base in ("random_init", "pixels")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for base, minutes in report["crosses_at_minutes"].items():
        where = f"at about {minutes:.1f} min of pre-training" if minutes else "not within the measured budgets"
        print(f"  gap to {base} reaches +{TARGET:.0f}: {where}")
    return report


if __name__ == "__main__":
    main()
