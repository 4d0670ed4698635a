"""`make compare`: queue the strategy comparison as DVC experiments, run them, render reports/comparison.md.

    python -m stages.compare               # queue what is missing, run the queue (1 job), render
    python -m stages.compare --dry-run     # print the dvc commands, run nothing
    python -m stages.compare --render      # only render, from `dvc exp show --json`
    python -m stages.compare --render --show-json exps.json   # ... or from a saved document

Not a DVC stage (it drives `dvc exp`). Reads the `compare` section of params.yaml;
experiments that already finished with the same params are not rerun. Writes
reports/comparison.md, comparison.png and comparison.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.compare import dvc, match, plan, queue_command, render
from pipeline.config import load_params

PARAMS = Path("params.yaml")
REPORTS = Path("reports")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render from the finished experiments")
    parser.add_argument("--show-json", type=Path, help="a saved `dvc exp show --json` document (with --render)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be queued")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (1 on a 2-core machine)")
    args = parser.parse_args(argv)

    params = load_params(PARAMS)  # a bad compare section fails here, before anything is queued
    experiments = plan(yaml.safe_load(PARAMS.read_text()), params.compare)
    show = json.loads(args.show_json.read_text()) if args.show_json else exp_show()
    todo = [e for e in experiments if e not in match(show, experiments)]
    print(f"compare: {len(experiments)} experiments planned, {len(experiments) - len(todo)} already finished")

    if todo and not args.render:
        if args.dry_run:
            for e in todo:
                print("dvc " + shlex.join(queue_command(e)))
            print(f"dvc exp run --run-all --jobs {args.jobs}")
            return 0
        started = time.perf_counter()
        for e in todo:
            dvc(*queue_command(e))
        try:
            # runs every queued experiment (also ones queued by hand), in temporary copies of the repo
            dvc("exp", "run", "--run-all", "--jobs", str(args.jobs))
        except subprocess.CalledProcessError as error:
            print(f"compare: `dvc exp run --run-all` failed ({error.returncode}); rendering what finished",
                  file=sys.stderr)
        minutes = (time.perf_counter() - started) / 60
        print(f"compare: ran {len(todo)} experiments in {minutes:.1f} min")
        show = exp_show()

    summary = render(params.compare, experiments, show, REPORTS)
    missing = summary["missing"]
    print(f"compare: {REPORTS / 'comparison.md'}, comparison.png, comparison.json"
          + (f"; {len(missing)} experiments missing: {', '.join(e.name for e in missing)}" if missing else ""))
    return 1 if missing and not args.dry_run else 0


def exp_show() -> list[dict]:
    return json.loads(dvc("exp", "show", "--json", capture=True) or "[]")


if __name__ == "__main__":
    sys.exit(main())
