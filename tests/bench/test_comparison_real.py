"""The strategy comparison on real photos (bench/comparison_real.py): its plan, its folder and its report's text."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import comparison_real, real_data
from pipeline.core.config import load_params
from pipeline.reporting.compare import plan, render_markdown
from tests.bench.test_real_data import write_idx

REPO = Path(__file__).resolve().parents[2]


def test_the_plan_is_make_compares_pointed_at_the_folder(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    config = load_params(REPO / "params.yaml").compare
    embedded = plan(raw, config)
    real = comparison_real.real_plan(raw, config, tmp_path)
    assert len(real) == len(embedded) == len(config.strategies) * len(config.seeds)
    budget = len(config.budget)
    for e, r in zip(embedded, real):
        assert r.overrides == (e.overrides[:budget] + ("data.source=imagefolder", f"data.root={tmp_path}")
                               + e.overrides[budget:])
        assert r.expected["data"] == {**e.expected["data"], "source": "imagefolder", "root": str(tmp_path)}
        assert r.name.startswith("real-cmp-") and r.name.removeprefix("real-")[:-6] == e.name[:-6]
    assert not {r.name for r in real} & {e.name for e in embedded}
    assert len({r.name for r in real}) == len(real)


def test_the_folder_is_written_once_and_complete(tmp_path, monkeypatch):
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 3)
    for split in ("train", "t10k"):
        write_idx(source / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (len(labels), 28, 28)))
        write_idx(source / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(comparison_real, "PER_CLASS", 2)
    monkeypatch.setattr(real_data, "VAL_PER_CLASS", 1)
    folder = comparison_real.ensure_folder(tmp_path / "real", dataset=source)
    assert len(list((folder / "train").rglob("*.png"))) == 20 and len(list((folder / "val").rglob("*.png"))) == 10
    assert (folder / ".complete").is_file() and not list(tmp_path.glob("real.partial-*"))
    (folder / "train" / "bag" / "marker").write_text("kept")
    comparison_real.ensure_folder(folder, dataset=tmp_path / "absent")  # finished: neither rewritten nor read
    assert (folder / "train" / "bag" / "marker").is_file()


def test_the_report_names_its_data_command_and_chart():
    doc = json.loads((REPO / "reports" / "comparison.json").read_text())
    text = comparison_real.retitle(render_markdown(doc))
    assert text.startswith("# Masking strategies compared on real photos (Fashion-MNIST)\n")
    assert "`make compare-real` (`python -m bench.comparison_real`)" in text
    assert "](comparison_real.png)" in text and "](comparison.png)" not in text
    assert "embedded dataset" not in text
    assert text.index(comparison_real.DATA_TEXT) < text.index("| produced by |")
    folder = Path("/home/someone/.cache/attmask/fashion-mnist-500")
    doc["experiments"][0]["overrides"].append(f"data.root={folder}")
    shown = comparison_real.retitle(render_markdown(doc), folder)
    assert str(folder) not in shown and "data.root=<folder>`" in shown
    with pytest.raises(ValueError, match="no longer holds"):
        comparison_real.retitle(text)


def test_the_raw_pixel_reference_is_stated_from_the_experiments():
    from types import SimpleNamespace

    found = [SimpleNamespace(metrics={"baselines": {"pixels": {"knn": {"20": v}}}}) for v in (82.4, 82.4, 82.6)]
    assert comparison_real.pixels_line(found, 20).endswith("k-NN@20 82.5 ± 0.1 over 3 experiments.")
    assert comparison_real.pixels_line([SimpleNamespace(metrics={})], 20) == "Raw pixels: not recorded by the experiments."
