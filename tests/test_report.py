"""The report: figures (masks follow the attention, PNGs byte-identical), report.json and README.md rendering."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import MASKING_STRATEGIES, Params, params_from_dict
from pipeline.features import create_backbone, random_backbone_state
from pipeline.figures import (
    figure_masks, mask_examples, pick_examples, plot_losses, plot_mask_figure, plot_masked_share, png_bytes,
    read_csv_columns, save_png, teacher_attention,
)
from pipeline.model import MaskedViT, save_backbone_safetensors
from pipeline.report import (
    collect_report, format_machine, ratio_label, render_readme, summarize_markdown,
)
from tests.conftest import REPO, tiny_params_dict

# ------------------------------------------------------------------ fabricated inputs
KNN = {
    "pretrained": {"top1": {"10": 60.0, "20": 61.2}, "top5": {"10": 90.0, "20": 91.0}, "temperature": 0.07},
    "random_init": {"top1": {"10": 20.0, "20": 21.5}, "top5": {"10": 50.0, "20": 51.0}, "temperature": 0.07},
    "pixels": {"top1": {"10": 15.0, "20": 14.4}, "top5": {"10": 45.0, "20": 44.0}, "temperature": 0.07},
}
FEWSHOT = {
    variant: {"1": {"k": 10, "mean": mean, "std": 1.5, "runs": [mean] * 5},
              "5": {"k": 20, "mean": mean + 10, "std": 0.25, "runs": [mean + 10] * 5}, "skipped": {}}
    for variant, mean in (("pretrained", 12.3), ("random_init", 8.0))
}
LINEAR = {"pretrained": {"top1": 70.3}, "random_init": {"top1": 25.0}}
FINETUNE = {"pretrained": {"top1": 80.4}, "random_init": {"top1": 40.0}}
PRETRAIN = {"epochs": 2, "steps": 10, "final_loss": 5.0, "final_loss_cls": 3.0, "final_loss_patch": 2.0,
            "first_epoch_loss": 6.0, "masked_share": 0.15}
MANIFEST = {"source": "synthetic", "classes": ["a", "b"], "totals": {"train": {"selected": 20}, "val": {"selected": 6}},
            "rejected": []}


def write_inputs(root: Path, skip: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """reports/eval/*.json, reports/pretrain/metrics.json and a manifest under ``root``."""
    files = {"eval/knn.json": KNN, "eval/fewshot.json": FEWSHOT, "eval/linear.json": LINEAR,
             "eval/finetune.json": FINETUNE, "pretrain/metrics.json": PRETRAIN, "shards/manifest.json": MANIFEST}
    for name, content in files.items():
        if Path(name).stem not in skip:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(json.dumps(content))
    return root / "eval", root / "pretrain", root / "shards" / "manifest.json"


def params(**sections: dict[str, Any]) -> Params:
    raw: dict[str, Any] = {"data": {"synthetic": {"train_per_class": 200}}}
    raw.update(sections)
    return params_from_dict(raw)


COMMIT = {"sha": "0123456789abcdef0123456789abcdef01234567", "dirty": []}
MACHINE = {"device": "cpu", "cpu": "Test CPU", "threads": 2}


def render(tmp_path: Path, skip: tuple[str, ...] = (), timings: dict[str, Any] | None = None,
           others: dict[str, str | None] | None = None, p: Params | None = None) -> tuple[dict[str, Any], str]:
    eval_dir, pretrain_dir, manifest = write_inputs(tmp_path, skip)
    report = collect_report(eval_dir, pretrain_dir, manifest, p or params(), {"masks": "figures/masks.png"})
    timings = timings if timings is not None else {"pretrain": None}
    return report, render_readme(report, COMMIT, MACHINE, timings, others or {})


# --------------------------------------------------------------------------- renderer
def test_results_table_in_the_papers_format(tmp_path: Path) -> None:
    report, text = render(tmp_path)
    assert "| masking | ratio | k-NN | linear | fine-tuning |" in text
    assert "| **AttMask-High** (this run) | 10-50% | 61.2 | 70.3 | 80.4 |" in text
    assert "| random init (baseline) | - | 21.5 | 25.0 | 40.0 |" in text
    assert "| raw pixels (baseline) | - | 14.4 | - | - |" in text
    assert "| supervised reference: same ViT, labels, from random init | - | | | 40.0 |" in text  # random-init fine-tuning
    assert "so the reference is no upper bound here" in text
    assert "reach k-NN 153% and linear probe 176% of it" in text
    assert report["supervised_reference"]["knn_share"] == 153.0
    assert "*49.7*" in text and "theirs" in text  # the paper's row, labelled as theirs
    assert "Pre-trained minus random init, in points: knn +39.7, linear +45.3, finetune +40.4." in text
    assert report["knn_k"] == 20 and report["table"]["pretrained"] == {"knn": 61.2, "linear": 70.3, "finetune": 80.4}


def test_fewshot_and_knn_tables(tmp_path: Path) -> None:
    _, text = render(tmp_path)
    assert "| pre-trained (this run) | 12.3 ± 1.5 | 22.3 ± 0.2 |" in text
    assert "| random init | 8.0 ± 1.5 | 18.0 ± 0.2 |" in text
    assert "mean ± std over 5 seeded draws" in text
    assert "| pre-trained (this run) | 60.0 / 90.0 | 61.2 / 91.0 |" in text


def test_header_names_commit_params_data_and_stages(tmp_path: Path) -> None:
    timing = {"stage": "pretrain", "sacred_run": {"stage": "pretrain", "id": 3, "dir": "runs/sacred/pretrain/3"},
              "wall_seconds": 603.2, "machine": {"device": "cpu", "cpu": "AMD EPYC", "threads": 2},
              "images_per_second": 26.31}
    report, text = render(tmp_path, timings={"pretrain": timing, "knn": None})
    assert COMMIT["sha"] in text
    assert report["params_sha256"] in text and len(report["params_sha256"]) == 64
    assert report["data"]["manifest_sha256"] in text and "20 train / 6 val images" in text
    assert "| pretrain | `runs/sacred/pretrain/3` | 10 min 03 s | cpu (AMD EPYC), 2 threads | images per second 26.3 |" in text
    assert "| knn | not recorded | not recorded | not recorded | |" in text
    assert "| machine (this report) | cpu (Test CPU), 2 threads |" in text


def test_missing_optional_inputs_render(tmp_path: Path) -> None:
    report, text = render(tmp_path, skip=("finetune", "fewshot"), timings={"pretrain": None, "knn": None})
    assert "| **AttMask-High** (this run) | 10-50% | 61.2 | 70.3 | - |" in text
    assert "Not run yet" in text and "finetune.json" in text
    assert "### Few-shot k-NN\n\nnot run" in text
    assert "machine (stages) | not recorded" in text
    assert "Other reports" not in text  # no reliability.md / bench.md
    assert "| supervised reference: same ViT" not in text and "No supervised reference: the fine-tuning stage has not run." in text


def test_other_reports_are_linked_with_a_summary(tmp_path: Path) -> None:
    (tmp_path / "reliability.md").write_text("# Reliability\n\nSeed spread is 1.2 points.\nSecond line.\n\n## More\n")
    summary = summarize_markdown(tmp_path / "reliability.md")
    assert summary == "Reliability: Seed spread is 1.2 points. Second line."
    assert summarize_markdown(tmp_path / "bench.md") is None
    _, text = render(tmp_path, others={"reliability.md": summary, "bench.md": None})
    assert "- [`reliability.md`](reliability.md): Reliability: Seed spread is 1.2 points." in text
    assert "bench.md" not in text


def test_report_json_holds_nothing_volatile(tmp_path: Path) -> None:
    report, _ = render(tmp_path)
    again, _ = render(tmp_path)
    assert json.dumps(report, sort_keys=True) == json.dumps(again, sort_keys=True)
    text = json.dumps(report)
    assert COMMIT["sha"] not in text and "Test CPU" not in text and "wall" not in text


def test_ratio_label_and_machine() -> None:
    assert ratio_label(params().masking) == "10-50%"
    assert ratio_label(params(masking={"strategy": "random", "ratio": 0.75, "ratio_var": 0.0}).masking) == "75%"
    assert format_machine({"device": "cuda", "gpu": "H100", "gpu_count": 8, "threads": 16}) == "cuda (H100) x8, 16 threads"
    assert format_machine(None) == "not recorded"


# ---------------------------------------------------------------------------- masks
def test_figure_masks_follow_the_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 64, generator=generator).softmax(-1)  # distinct values: no ties
    masks = figure_masks(attention, (8, 8), ratio=0.3, show_max=0.1, seed=0)
    n = math.floor(0.3 * 64)
    assert set(masks) == set(MASKING_STRATEGIES)
    order = attention.argsort(dim=1, descending=True)
    for b in range(3):
        high = masks["attmask_high"][b].flatten()
        low = masks["attmask_low"][b].flatten()
        assert set(high.nonzero().flatten().tolist()) == set(order[b, :n].tolist())
        assert set(low.nonzero().flatten().tolist()) == set(order[b, -n:].tolist())
        hint = masks["attmask_hint"][b].flatten()
        assert not (hint & ~high).any() and int(hint.sum()) == n - math.floor(0.1 * 0.3 * 64)
        assert int(masks["random"][b].sum()) == n and 0 < int(masks["block"][b].sum()) <= n
    again = figure_masks(attention, (8, 8), ratio=0.3, show_max=0.1, seed=0)
    assert all(torch.equal(masks[s], again[s]) for s in masks)


def tiny_model_params() -> Params:
    return params_from_dict(tiny_params_dict(Path("unused"), model={"patch_size": 4}))


@pytest.fixture(scope="module")
def tiny_examples() -> Any:
    p = tiny_model_params()
    vit = create_backbone(p.model)
    vit.load_state_dict(random_backbone_state(p.model, 0))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return vit, images, mask_examples(vit, images, ["a", "b", "c"], 4, ratio=0.3, show_max=0.1, seed=0)


def test_figure_uses_the_teachers_attention(tiny_examples: Any) -> None:
    vit, images, examples = tiny_examples
    with torch.no_grad():
        _, expected = MaskedViT(vit).eval()(images, return_cls_attention=True)
    assert torch.equal(teacher_attention(vit, images), expected)
    assert examples.attention.shape == (3, 4, 4) and examples.count == math.floor(0.3 * 16)
    for b in range(3):
        top = np.argsort(-examples.attention[b].flatten(), kind="stable")[: examples.count]
        assert set(np.flatnonzero(examples.masks["attmask_high"][b])) == set(top.tolist())
    assert examples.images.shape == (3, 16, 16, 3) and 0 <= examples.images.min() and examples.images.max() <= 1


def test_pngs_are_byte_identical_on_rerun(tiny_examples: Any, tmp_path: Path) -> None:
    _, _, examples = tiny_examples
    first = png_bytes(plot_mask_figure(examples))
    assert first == png_bytes(plot_mask_figure(examples))
    assert first.startswith(b"\x89PNG") and b"Software" not in first and b"matplotlib" not in first
    steps = {"step": np.arange(5.0), "loss_total": np.linspace(3, 2, 5), "loss_cls": np.ones(5),
             "loss_patch": np.ones(5), "masked_share": np.full(5, 0.15)}
    a = save_png(plot_losses(steps, uniform_loss=math.log(64)), tmp_path / "a.png").read_bytes()
    b = save_png(plot_losses(steps, uniform_loss=math.log(64)), tmp_path / "b.png").read_bytes()
    assert a == b
    assert png_bytes(plot_masked_share(steps, 0.15)) == png_bytes(plot_masked_share(steps, 0.15))


def test_pick_examples_is_seeded_and_prefers_distinct_classes() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    chosen = pick_examples(labels, 3, seed=0)
    assert chosen == pick_examples(labels, 3, seed=0)
    assert sorted(labels[i] for i in chosen) == [0, 1, 2]
    assert sorted(pick_examples(labels, 6, seed=0)) == list(range(6))  # fewer classes than images: fill up
    assert len({tuple(pick_examples(list(range(50)), 3, seed=s)) for s in range(3)}) > 1


def test_read_csv_columns(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("step,loss\n0,1.5\n1,2.5\n")
    columns = read_csv_columns(tmp_path / "x.csv")
    assert list(columns) == ["step", "loss"] and columns["loss"].tolist() == [1.5, 2.5]


# ----------------------------------------------------------------------------- stage
def test_stage_outputs_are_byte_identical_on_rerun(
    tiny_folder: Path, tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DVC outputs (figures, report.json) repeat byte for byte; README.md is rewritten too."""
    import stages.report as stage

    raw = tiny_params_dict(tiny_folder, model={"patch_size": 4})
    p = params_from_dict(raw)
    shutil.copytree(tiny_shards, tmp_path / "data" / "shards")
    save_backbone_safetensors(random_backbone_state(p.model, 0), tmp_path / "models/pretrain/backbone.safetensors")
    write_inputs(tmp_path / "reports", skip=("manifest",))
    (tmp_path / "reports/pretrain/steps.csv").write_text(
        "step,epoch,loss_total,loss_cls,loss_patch,masked_share\n0,0,5,3,2,0.1\n1,0,4,3,1,0.2\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "reports/timing").mkdir()
    (tmp_path / "reports/timing/pretrain.json").write_text(json.dumps({"stage": "pretrain", "sacred_run": 7, "wall_seconds": 5.0}))
    monkeypatch.chdir(tmp_path)

    def outputs() -> dict[str, bytes]:
        stage.main(p)
        files = sorted(Path("reports/figures").glob("*.png")) + [Path("reports/report.json")]
        return {str(f): f.read_bytes() for f in files}

    first = outputs()
    assert set(first) == {"reports/figures/masks.png", "reports/figures/losses.png",
                          "reports/figures/masked_share.png", "reports/report.json"}
    assert outputs() == first
    readme = Path("reports/README.md").read_text()
    assert "![masks](figures/masks.png)" in readme and "`runs/sacred/pretrain/7`" in readme
    assert "| shard | not recorded |" in readme


def test_metrics_carry_pretrain_throughput_from_the_timing_file(tmp_path: Path) -> None:
    from pipeline.report import collect_metrics

    eval_dir, pretrain_dir, _ = write_inputs(tmp_path)
    timing = {"stage": "pretrain", "wall_seconds": 487.5, "images_per_second": 32.5}
    metrics = collect_metrics(eval_dir, pretrain_dir, timing=timing)
    assert metrics["pretrain"]["images_per_second"] == 32.5
    assert metrics["pretrain"]["wall_seconds"] == 487.5
    assert "images_per_second" not in collect_metrics(eval_dir, pretrain_dir)["pretrain"]
