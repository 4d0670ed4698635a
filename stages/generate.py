"""DVC stage `generate`: the embedded default dataset (pipeline/data/synthetic.py).

    python -m stages.generate

With ``data.source: synthetic`` it writes ``data/synthetic/{train,val}/<class>/*.png``
from ``data.synthetic`` and ``seed``. With ``data.source: imagefolder`` the images
come from ``data.root``; the stage then writes only ``data/synthetic/NOT_USED.txt``
so the declared DVC output still exists.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.core.config import SYNTHETIC_ROOT, Params, ParamsError
from pipeline.core.files import replace_dir
from pipeline.data.synthetic import generate_dataset
from stages import run_stage

NOT_USED_TEXT = (
    "data.source is 'imagefolder': the pipeline reads its images from data.root ({root}).\n"
    "This folder only exists because it is the declared output of the DVC stage 'generate';\n"
    "set data.source: synthetic in params.yaml to generate the embedded dataset here.\n"
)


def main(params: Params, progress: bool = True) -> dict[str, Any]:
    """Generate (or mark unused) ``data/synthetic``; returns the summary that is printed."""
    root = Path(SYNTHETIC_ROOT)
    if params.data.source == "synthetic":
        summary = generate_dataset(root, params.data.synthetic, params.seed, progress=progress)
        summary["source"] = "synthetic"
        counts = summary["counts"]
        print(
            f"generate: {len(summary['classes'])} classes, {counts['train']} train + {counts['val']} val images "
            f"at {summary['image_size']} px (seed {summary['seed']}) -> {root}"
        )
        return summary
    _write_not_used(root, params.data.root)
    print(f"generate: data.source=imagefolder, images come from {params.data.root}; wrote {root}/NOT_USED.txt")
    return {"source": params.data.source, "root": str(root), "data_root": params.data.root}


def _write_not_used(root: Path, data_root: str) -> None:
    if Path(data_root).resolve() == root.resolve():
        # This folder is the stage's output and DVC wipes it: never treat it as user data.
        raise ParamsError(
            "data.root",
            f"with data.source=imagefolder, data.root must be your own folder, not {SYNTHETIC_ROOT!r} "
            "(the generated output of this stage)",
        )
    # Built aside and renamed, replacing any earlier generation: stale images
    # must not look like the data in use.
    tmp = root.parent / f".{root.name}.tmp-not-used"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "NOT_USED.txt").write_text(NOT_USED_TEXT.format(root=data_root))
    replace_dir(tmp, root)


if __name__ == "__main__":
    run_stage("generate", lambda params, record: main(params))
