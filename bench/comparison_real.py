"""The strategy comparison on real photos: ``make compare-real`` (``python -m bench.comparison_real``).

    python -m bench.comparison_real             # write the folder, queue what is missing, run, render
    python -m bench.comparison_real --dry-run   # print the dvc commands, run nothing
    python -m bench.comparison_real --render    # only render, from `dvc exp show --json`
    python -m bench.comparison_real --render --rev <commit>   # ... the experiments queued on another commit

``make compare``'s plan (the ``compare`` section of ``params.yaml``: its
strategies, seeds and budget), with every experiment pointed at a real
ImageNet-layout folder: Fashion-MNIST, :data:`PER_CLASS` train and
``bench.real_data.VAL_PER_CLASS`` val images per class, as ``make bench-real``
writes it. The folder is written once under :data:`FOLDER` (outside the
repository, so DVC's experiment copies do not carry 5,500 PNGs) and reused.
Writes ``reports/comparison_real.md``, ``.png`` and ``.json``, in the format of
``reports/comparison.md``. ~90 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from bench import real_data
from pipeline.core.config import CompareConfig, load_params
from pipeline.core.numerics import ensure_numerics
from pipeline.reporting import provenance
from pipeline.reporting.compare import Experiment, Stat, apply_overrides, dvc, match, plan, queue_command, render
from stages.compare import exp_show, git_head, run_queue
from stages.paths import PARAMS, REPORTS

PER_CLASS = 500
NAME = "comparison_real"
FOLDER = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attmask" / f"fashion-mnist-{PER_CLASS}"
# what these numbers depend on besides the pipeline: this driver and the folder writer
INPUTS = provenance.PIPELINE_INPUTS + ("bench/comparison_real.py", "bench/real_data.py")
DATA_TEXT = (f"Data: Fashion-MNIST (Debian `{real_data.PACKAGE}`), an ImageNet-layout folder of the first {PER_CLASS} "
             f"train and {real_data.VAL_PER_CLASS} val photos of each of its 10 clothing classes, 28 px grey upsampled "
             f"to {real_data.IMAGE_SIZE} px RGB (`python -m bench.comparison_real` writes it). Besides the strategy "
             "table's overrides, every experiment sets only `data.source=imagefolder` and `data.root` (the folder, "
             "shown as `<folder>` below: its absolute path is this machine's); the "
             "embedded-data comparison is [comparison.md](comparison.md).")


@dataclass(frozen=True)
class RealExperiment(Experiment):
    """An experiment of the plan on the real folder; its name says so in ``dvc exp show``."""

    @property
    def name(self) -> str:
        return "real-" + super().name


def real_plan(raw_params: dict[str, Any], config: CompareConfig, folder: Path) -> list[RealExperiment]:
    """``make compare``'s experiments with ``data.source=imagefolder data.root=<folder>`` after the budget."""
    data = ("data.source=imagefolder", f"data.root={folder}")
    experiments = []
    for e in plan(raw_params, config):
        budget = len(config.budget)
        overrides = e.overrides[:budget] + data + e.overrides[budget:]
        experiments.append(RealExperiment(e.row, e.seed, e.percent, overrides, apply_overrides(raw_params, overrides)))
    return experiments


def ensure_folder(folder: Path = FOLDER, dataset: Path = real_data.DATASET_DIR) -> Path:
    """The real folder, written from the Debian package unless a finished copy is there (``.complete``)."""
    if (folder / ".complete").is_file():
        return folder
    source = real_data.ensure_dataset(dataset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=folder.name + ".partial-") as partial:
        real_data.write_imagefolder(Path(partial), {
            "train": (real_data.read_idx(source / "train-images-idx3-ubyte.gz"),
                      real_data.read_idx(source / "train-labels-idx1-ubyte.gz")),
            "val": (real_data.read_idx(source / "t10k-images-idx3-ubyte.gz"),
                    real_data.read_idx(source / "t10k-labels-idx1-ubyte.gz")),
        }, {"train": PER_CLASS, "val": real_data.VAL_PER_CLASS})
        (Path(partial) / ".complete").write_text("")
        if folder.exists():  # an interrupted earlier write
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        os.rename(partial, folder)
    print(f"compare-real: wrote {folder}")
    return folder


def retitle(markdown: str, folder: Path | None = None) -> str:
    """``comparison.md``'s text, made to name this comparison: its title, command, data, chart and seeds.

    ``folder``: the real folder, shown as ``<folder>`` (its absolute path is one machine's).
    """
    if folder is not None:
        markdown = markdown.replace(f"data.root={folder}", "data.root=<folder>")
    required = (
        ("# Masking strategies compared\n", "# Masking strategies compared on real photos (Fashion-MNIST)\n"),
        ("Generated by `make compare` (`python -m stages.compare`)",
         "Generated by `make compare-real` (`python -m bench.comparison_real`)"),
        ("(`seed` also redraws the embedded dataset and the train subset)",
         "(`seed` redraws the initialisation, the crops and the masks; the folder is the same)"),
        ("](comparison.png)", f"]({NAME}.png)"),
    )
    for old, new in required:
        if old not in markdown:
            raise ValueError(f"comparison.md no longer holds {old!r}: update bench.comparison_real.retitle")
        markdown = markdown.replace(old, new)
    markdown = markdown.replace("`make compare` runs what is missing", "`make compare-real` runs what is missing")
    head, sep, rest = markdown.partition("\n\n| produced by |")
    return head + "\n\n" + DATA_TEXT + sep + rest


def pixels_line(found: Sequence[Any], knn_k: int) -> str:
    """The raw-pixel k-NN reference of the finished experiments (``Found``), which the strategy table leaves out.

    Every experiment reads the same folder, so the pixels' k-NN is one number;
    on these photos it is the bar the learned features are measured against.
    """
    values = tuple(float(v) for f in found
                   if (v := (((f.metrics.get("baselines") or {}).get("pixels") or {}).get("knn") or {}).get(str(knn_k)))
                   is not None)
    if not values:
        return "Raw pixels: not recorded by the experiments."
    return (f"Raw pixels (the val photos' own pixels as features, the same folder in every experiment): k-NN@{knn_k} "
            f"{Stat(values).text()} over {len(values)} experiments.")


def write_report(config: CompareConfig, experiments: Sequence[Experiment], show: list[dict[str, Any]],
                 origin: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Render with ``make compare``'s renderer into a scratch folder, then store as ``reports/comparison_real.*``."""
    with tempfile.TemporaryDirectory() as scratch:
        summary = render(config, experiments, show, Path(scratch), provenance=origin)
        REPORTS.mkdir(parents=True, exist_ok=True)
        text = retitle((Path(scratch) / "comparison.md").read_text(), folder)
        text = text.replace(DATA_TEXT, DATA_TEXT + " " + pixels_line(list(match(show, experiments).values()), config.knn_k))
        (REPORTS / f"{NAME}.md").write_text(text)
        for suffix in (".png", ".json"):
            os.replace(Path(scratch) / f"comparison{suffix}", REPORTS / f"{NAME}{suffix}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render from the finished experiments")
    parser.add_argument("--dry-run", action="store_true", help="print what would be queued")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (1 on a 2-core machine)")
    parser.add_argument("--rev", help="with --render: the baseline commit whose experiments to read (default HEAD)")
    parser.add_argument("--folder", type=Path, default=FOLDER, help=f"where the real folder is written (default {FOLDER})")
    args = parser.parse_args(argv)
    if args.rev and not args.render:
        parser.error("--rev reads another commit's experiments: use it with --render")
    params = load_params(PARAMS)
    # as `python -m stages.compare`: this process runs with the experiments' numerics, so its record names them
    ensure_numerics(params.numerics)
    folder = args.folder.resolve() if args.render or args.dry_run else ensure_folder(args.folder.resolve())
    experiments = real_plan(yaml.safe_load(PARAMS.read_text()), params.compare, folder)
    baseline = args.rev or git_head()
    show = exp_show(baseline)
    todo = [e for e in experiments if e not in match(show, experiments)]
    print(f"compare-real: {len(experiments)} experiments planned, {len(experiments) - len(todo)} already finished")
    if todo and args.dry_run:
        for e in todo:
            print("dvc " + shlex.join(queue_command(e)))
        return 0
    if todo and not args.render:
        started = time.perf_counter()
        for e in todo:
            dvc(*queue_command(e))
        try:
            run_queue(args.jobs)
        except subprocess.CalledProcessError as error:
            print(f"compare-real: the DVC queue failed ({error.returncode}); rendering what finished", file=sys.stderr)
        print(f"compare-real: ran {len(todo)} experiments in {(time.perf_counter() - started) / 60:.1f} min")
        show = exp_show(baseline)
    origin = provenance.record(inputs=INPUTS, params_sha=provenance.params_sha256(params), threads=params.threads)
    summary = write_report(params.compare, experiments, show, origin, folder)
    missing = summary["missing"]
    print(f"compare-real: {REPORTS / NAME}.md, .png, .json"
          + (f"; {len(missing)} experiments missing: {', '.join(e.name for e in missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
