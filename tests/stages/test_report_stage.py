"""The metrics and report stages: byte-identical outputs, timing carried over (stages/metrics.py, report.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import params_from_dict
from pipeline.method.backbone_export import random_backbone_state, save_backbone_safetensors
from tests.conftest import REPO, tiny_params_dict
from tests.reporting.test_readme import write_inputs

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
    assert "![masks](figures/masks.png)" in readme and "| shard | - | none on this machine" in readme
    assert "runs/sacred" not in readme  # run ids and clock readings go to the timing summary instead
    assert "| pretrain | `runs/sacred/pretrain/7` | 5.0 s |" in Path("reports/timing/summary.md").read_text()
    assert json.loads(Path("reports/report.json").read_text())["figure_data"]["masks"]["patches"] == 16


def test_metrics_carry_the_margins_over_random_init_and_no_clock_readings(tmp_path: Path) -> None:
    import math

    from pipeline.reporting.metrics import collect_metrics, gain_margins, noise_band

    eval_dir, pretrain_dir, _ = write_inputs(tmp_path)
    metrics = collect_metrics(eval_dir, pretrain_dir)
    assert not {"images_per_second", "wall_seconds"} & set(metrics["pretrain"])  # reports/metrics.json is git-tracked
    assert set(metrics["margins"]) == {"knn", "linear", "finetune"}
    # two accuracies of 50% on 100 images: 2 * sqrt((2500 + 2500) / 100) = 14.1 points of noise
    assert noise_band(50.0, 50.0, 100) == 2 * math.sqrt(50.0)
    table = {"pretrained": {"knn": 49.6, "linear": 81.6, "finetune": 40.0}, "random_init": {"knn": 59.7, "linear": 86.1,
             "finetune": 39.0}, "pixels": {"knn": 98.0}}
    margins = gain_margins(table, num_val=500)
    assert margins["knn"] == {"over_random_init": -10.1, "noise": round(noise_band(49.6, 59.7, 500), 4),
                              "verdict": "below random init", "over_pixels": -48.4}
    assert margins["linear"]["verdict"] == "no measurable gain"  # -4.5, within the 4.7-point band on 500 images
    assert margins["finetune"]["verdict"] == "no measurable gain"
    assert gain_margins({"pretrained": {"knn": 33.6}, "random_init": {"knn": 16.4}}, 500)["knn"]["verdict"] == "gain"


def test_metrics_hold_the_official_sgd_probe_beside_the_logistic_one_when_it_ran(tmp_path: Path) -> None:
    import json

    from pipeline.reporting.metrics import collect_metrics

    eval_dir, pretrain_dir, _ = write_inputs(tmp_path)
    (eval_dir / "linear_sgd.json").write_text(json.dumps({"enabled": False}))
    metrics = collect_metrics(eval_dir, pretrain_dir)
    assert "linear_sgd" not in metrics and metrics["linear"] == {"top1": 70.3}
    entry = {"top1": 55.0, "best_top1": 56.0}
    (eval_dir / "linear_sgd.json").write_text(json.dumps({"enabled": True, "pretrained": entry, "random_init": entry}))
    metrics = collect_metrics(eval_dir, pretrain_dir)
    assert metrics["linear_sgd"] == entry and metrics["linear"] == {"top1": 70.3}
    assert metrics["baselines"]["random_init"]["linear_sgd"] == entry
