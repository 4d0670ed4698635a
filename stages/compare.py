"""`make compare`: queue the strategy comparison as DVC experiments, run them, render reports/comparison.md.

    python -m stages.compare               # queue what is missing, run the queue (1 job), render
    python -m stages.compare --dry-run     # print the dvc commands, run nothing
    python -m stages.compare --render      # only render, from `dvc exp show --json`
    python -m stages.compare --render --show-json exps.json   # ... or from a saved document
    python -m stages.compare --render --rev <commit>          # ... experiments of another commit, planned from its params.yaml
    python -m stages.compare --from-json reports/comparison.json  # re-render from the JSON alone (no DVC)

Not a DVC stage (it drives `dvc exp`). Reads the `compare` section of params.yaml;
experiments that already finished with the same params on the same commit are
not rerun. The queue runs on the commit checked out at the start; results are
read back from that commit even if you commit something while it runs. Writes
reports/comparison.md, comparison.png and comparison.json; the JSON records the
provenance (commit, params, machine, date, input hashes) of the numbers, which
``--from-json`` keeps as recorded.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.config import load_params
from pipeline.reporting import provenance
from pipeline.reporting.compare import dvc, match, plan, queue_command, render, rerender
from stages.paths import PARAMS, REPORTS



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render from the finished experiments")
    parser.add_argument("--show-json", type=Path, help="a saved `dvc exp show --json` document (with --render)")
    parser.add_argument("--rev", help="baseline commit whose experiments to read (default: HEAD at the start)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be queued")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (1 on a 2-core machine)")
    parser.add_argument("--from-json", type=Path, help="re-render comparison.md/.png from this comparison.json only")
    args = parser.parse_args(argv)
    if args.rev and not args.render:
        parser.error("--rev reads another commit's experiments: use it with --render")
    if args.from_json:
        doc = rerender(args.from_json)
        print(f"compare: re-rendered {args.from_json.parent / 'comparison.md'} from {args.from_json}")
        return 1 if doc["missing"] else 0

    params = load_params(PARAMS)  # a bad compare section fails here, before anything is queued
    raw = yaml.safe_load(PARAMS.read_text())
    if args.rev:  # that commit's experiments ran on that commit's params: plan from them, with this compare section
        raw = {**yaml.safe_load(git_show(args.rev, PARAMS)), "compare": raw.get("compare", {})}
    experiments = plan(raw, params.compare, validate=not args.rev)
    baseline = args.rev or git_head()
    show = json.loads(args.show_json.read_text()) if args.show_json else exp_show(baseline)
    todo = [e for e in experiments if e not in match(show, experiments)]
    print(f"compare: {len(experiments)} experiments planned, {len(experiments) - len(todo)} already finished")

    if todo and not args.render:
        if args.dry_run:
            for e in todo:
                print("dvc " + shlex.join(queue_command(e)))
            print(f"dvc queue start --jobs {args.jobs}")
            return 0
        started = time.perf_counter()
        for e in todo:
            dvc(*queue_command(e))
        try:
            # runs every queued experiment (also ones queued by hand), in temporary copies of the repo
            run_queue(args.jobs)
        except subprocess.CalledProcessError as error:
            print(f"compare: the DVC queue failed ({error.returncode}); rendering what finished", file=sys.stderr)
        minutes = (time.perf_counter() - started) / 60
        print(f"compare: ran {len(todo)} experiments in {minutes:.1f} min")
        head = git_head()
        if head != baseline:
            print(f"compare: HEAD moved from {baseline[:7]} to {head[:7]} during the run; reading the experiments "
                  f"of {baseline[:7]}, which they ran on (a later `make compare` reruns them on {head[:7]})",
                  file=sys.stderr)
        show = exp_show(baseline)

    if args.rev:  # another commit's numbers: its commit is known, what it held is not
        origin = provenance.unknown_record(commit={"state": "recorded", "commit": args.rev,
                                                   "note": "the experiments' baseline (`--rev`); inputs not recorded"})
    else:
        origin = provenance.record(params_sha=provenance.params_sha256(params), threads=params.threads)
    summary = render(params.compare, experiments, show, REPORTS, provenance=origin)
    missing = summary["missing"]
    print(f"compare: {REPORTS / 'comparison.md'}, comparison.png, comparison.json"
          + (f"; {len(missing)} experiments missing: {', '.join(e.name for e in missing)}" if missing else ""))
    return 1 if missing and not args.dry_run else 0


@dataclass(frozen=True)
class QueueState:
    """Counts parsed from ``dvc queue status``."""

    queued: int
    running: int
    finished: int
    workers: int  # active + idle


def queue_state(status_text: str) -> QueueState:
    """Parse ``dvc queue status`` (a table whose last column is the status, then a worker line)."""
    counts = {"Queued": 0, "Running": 0, "Success": 0, "Failed": 0}
    workers = 0
    for line in status_text.splitlines():
        words = line.split()
        if line.startswith("Worker status:"):
            workers = sum(int(n) for n in re.findall(r"(\d+) (?:active|idle)", line))
        elif words and words[-1] in counts:
            counts[words[-1]] += 1
    return QueueState(counts["Queued"], counts["Running"], counts["Success"] + counts["Failed"], workers)


def run_queue(jobs: int, poll_seconds: float = 20.0) -> None:
    """Run DVC's experiment queue to the end: ``jobs`` workers, until nothing is queued or running.

    ``dvc exp run --run-all`` waits forever when its worker exits early (a stale
    shutdown message in the queue's broker does that: the worker ran one
    experiment and left 23 queued), so the queue is started with ``dvc queue
    start`` and watched here, and a worker that leaves experiments queued is
    started again.
    """
    dvc("queue", "start", "--jobs", str(jobs))
    reported = None
    while True:
        state = queue_state(dvc("queue", "status", capture=True))
        if state.queued == 0 and state.running == 0:
            return
        if (state.finished, state.running) != reported:
            print(f"compare: {state.queued} queued, {state.running} running, {state.finished} finished", flush=True)
            reported = (state.finished, state.running)
        if state.workers == 0:
            print("compare: no queue worker left with experiments queued; starting one again", file=sys.stderr)
            dvc("queue", "start", "--jobs", str(jobs))
        time.sleep(poll_seconds)


def exp_show(rev: str | None = None) -> list[dict]:
    """``dvc exp show --json`` for the experiments whose baseline is ``rev`` (default HEAD)."""
    return json.loads(dvc("exp", "show", "--json", *(["--rev", rev] if rev else []), capture=True) or "[]")


def git_show(rev: str, path: Path) -> str:
    """A file's text at commit ``rev``."""
    return subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True, check=True).stdout


def git_head() -> str | None:
    """The checked-out commit, or None outside a git repository / before the first commit."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


if __name__ == "__main__":
    sys.exit(main())
