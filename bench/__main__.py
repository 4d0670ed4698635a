"""Run every benchmark and write reports/bench.md: ``make bench`` (``python -m bench``).

    python -m bench              # CPU: data path, masking, pre-training step (embedded + ViT-S/16), k-NN, numerics, then bench.md
    python -m bench --quick      # the same on small sizes (a smoke run: figures not for quoting)
    python -m bench --only pretrain_step knn   # some of them, then bench.md
    python -m bench --gpu [part ...]           # the GPU harness (bench/gpu.py), then bench.md

The ImageNet-scale k-NN case needs ~7 GB of memory and a few minutes; the
ViT-S/16 step ~5 minutes on 2 cores. Results land in reports/bench/*.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import render

BENCHES = ("data", "masking", "pretrain_step", "knn", "linear_sgd", "numerics")
RUN_RECORD = Path("reports/bench/run.json")


MODULES = {"data": "bench.bench_data", "masking": "bench.bench_masking", "pretrain_step": "bench.bench_pretrain",
           "knn": "bench.bench_knn", "linear_sgd": "bench.bench_linear", "numerics": "bench.bench_numerics"}
QUICK_ARGS = {"data": ["--workers", "1"], "pretrain_step": ["--rounds", "2", "--batch-vit", "2", "--batch-embedded", "16"],
              "knn": ["--quick"], "linear_sgd": ["--repeats", "2", "--head-batch", "256", "--backbone-batch", "2"],
              "numerics": ["--rounds", "2", "--steps", "1"]}


def run(name: str, quick: bool) -> None:
    """One benchmark in a fresh process: peak-memory figures must not inherit another benchmark's heap."""
    command = [sys.executable, "-m", MODULES[name], *(QUICK_ARGS.get(name, []) if quick else [])]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument("--gpu", nargs="*", default=None, metavar="PART", help="run the GPU harness instead")
    args = parser.parse_args(argv)
    if args.gpu is not None:
        from bench import gpu

        gpu.main(args.gpu)
    else:
        seconds = {}
        for name in args.only:
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            run(name, args.quick)
            seconds[name] = time.perf_counter() - start
            print(f"   ({seconds[name]:.0f} s)", flush=True)
        # bench.md says whether its CPU figures come from a smoke run
        record = {"quick": args.quick, "seconds": seconds}
        RUN_RECORD.write_text(json.dumps(record, indent=2) + "\n")
    render.main([])


if __name__ == "__main__":
    main(sys.argv[1:])
