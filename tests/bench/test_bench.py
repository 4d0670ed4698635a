"""The benchmark suite's own logic (no wall-time asserts): FLOP counting, MFU, statistics, rendering, estimates."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.method.model import build_network
from bench import estimate, render
from bench.flops import NetworkDims, analytic_step_flops, counted_by_op, flop_counter, mfu
from bench.machine import gpu_peak_tflops
from bench.stats import format_summary, summarize

TINY = ModelConfig(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32)


def counted_step(network: torch.nn.Module, batch: int, global_size: int, local_size: int, local_number: int,
                 cls_attention: bool) -> tuple[int, dict[str, int]]:
    """FLOPs of what train_step runs: teacher forward, student forward + backward (heads included)."""
    generator = torch.Generator().manual_seed(0)
    globals_ = torch.randn(2 * batch, 3, global_size, global_size, generator=generator)
    locals_ = torch.randn(local_number * batch, 3, local_size, local_size, generator=generator)
    grid = global_size // network.backbone.patch_size
    masks = torch.rand(2 * batch, grid, grid, generator=generator) < 0.3
    with flop_counter() as counter:
        with torch.no_grad():
            network(globals_, return_cls_attention=cls_attention)
        out = network(globals_, masks=masks, local_crops=locals_)
        (out["cls"].sum() + out["patch"].sum()).backward()
    return counter.get_total_flops(), counted_by_op(counter)


@pytest.mark.parametrize("cls_attention", [False, True])
def test_counted_flops_of_a_tiny_vit_match_the_analytic_formula(cls_attention):
    network = build_network(TINY, drop_path_rate=0.0)
    counted, by_op = counted_step(network, batch=2, global_size=16, local_size=8, local_number=2, cls_attention=cls_attention)
    analytic = analytic_step_flops(NetworkDims.of(network), 2, 16, 8, 2, cls_attention)
    assert counted == pytest.approx(analytic["total"], rel=0.03)
    # the CPU attention kernel is counted (torch's counter alone misses it)
    assert any("flash_attention_for_cpu" in op for op in by_op)
    assert analytic["total"] == analytic["student_forward"] + analytic["student_backward"] + analytic["teacher_forward"]


def test_network_dims_read_timm_defaults():
    dims = NetworkDims.of(build_network(TINY, drop_path_rate=0.0))
    assert (dims.patch_size, dims.embed_dim, dims.depth, dims.mlp_hidden) == (4, 32, 2, 128)
    assert (dims.head_hidden, dims.head_bottleneck, dims.out_dim) == (64, 32, 64)


def test_vit_s16_analytic_flops_are_the_known_figure():
    # ViT-S/16 at 224 is ~4.6 GMACs (9.2 GFLOP) per image forward, head excluded
    from bench.flops import backbone_forward_flops

    parts = backbone_forward_flops(estimate.VIT_S16_DIMS, 224)
    assert (parts["embed"] + parts["linear"] + parts["attention"]) / 1e9 == pytest.approx(9.2, rel=0.02)


def test_mfu_arithmetic():
    # 1e12 FLOPs in 0.01 s is 100 TFLOP/s: 10% of a 1000 TFLOP/s device
    assert mfu(1e12, 0.01, 1000.0) == pytest.approx(0.10)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 1000.0)


def test_gpu_peak_table_matches_specific_parts_first():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA H100 PCIe")[0] == pytest.approx(756.5)
    assert gpu_peak_tflops("NVIDIA H100 NVL")[0] == pytest.approx(835.5)
    assert gpu_peak_tflops("NVIDIA H200")[0] == pytest.approx(989.4)
    assert gpu_peak_tflops("Some Future GPU")[0] is None


def test_summarize_median_spread_and_quartiles():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["n"] == 4 and s["median"] == 2.5 and (s["min"], s["max"]) == (1.0, 10.0)
    assert s["spread_pct"] == pytest.approx(100 * 9 / 2.5)
    assert s["q1"] <= s["median"] <= s["q3"]
    assert summarize([5.0])["spread_pct"] == 0.0
    assert format_summary(summarize([0.010, 0.012, 0.011]), 1000, 1, " ms") == "11.0 ms (10.0-12.0, n=3)"
    with pytest.raises(ValueError):
        summarize([])


def test_estimate_uses_the_assumption_until_a_gpu_was_measured():
    rate = estimate.gpu_rate(None, None)
    assert not rate["measured"] and "ESTIMATE" in rate["source"]
    rows = estimate.estimate_rows(rate)
    full = next(r for r in rows if r["images"] == 1_281_167)
    # time scales as 1 / GPUs, and equals epochs x images / rate
    assert full["hours"][8] == pytest.approx(full["hours"][1] / 8)
    assert full["hours"][1] * 3600 == pytest.approx(100 * 1_281_167 / full["images_per_second_per_gpu"])
    assert "Not measured on a GPU yet" in estimate.markdown(rows, rate)


def test_estimate_prefers_the_best_measured_rate_on_a_gpu():
    machine = {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}
    case = {"config": {"batch_size": 64, "device": "cuda"}, "strategies": {"attmask_high": {"achieved_tflops": 300.0}}}
    step = {"machine": machine, "cases": {"vit_s16_multicrop": case}}
    batch = {"machine": machine, "strategy": "attmask_high", "case": "vit_s16_multicrop",
             "trials": [{"batch": 256, "ok": True, "achieved_tflops": 350.0}, {"batch": 512, "ok": False}]}
    rate = estimate.gpu_rate(step, batch)
    assert rate["measured"] and rate["tflops"] == 350.0 and "batch 256" in rate["source"]
    assert estimate.gpu_rate(step, None)["tflops"] == 300.0
    # a CPU dry run of the GPU harness never counts as a GPU rate
    dry = {"machine": {"gpu": None}, "cases": {"vit_s16_multicrop": {**case, "config": {"batch_size": 8, "device": "cpu"}}}}
    assert not estimate.gpu_rate(dry, {**batch, "machine": {"gpu": None}})["measured"]


def _fake_case(device: str) -> dict:
    step = summarize([0.10, 0.11, 0.12])
    entry = {"step_seconds": step, "images_per_second": 64 / 0.11, "flops_per_step": 2e12,
             "flops_by_op": {"aten.convolution": 1e10, "aten.mm": 1.99e12}, "achieved_tflops": 18.18, "mfu": 0.25,
             "analytic_flops_per_step": {"total": 2e12}, "state_mib": 100.0,
             "memory": {"training_peak_mib": 2048.0, "step_growth_mib": 1948.0}}
    return {"config": {"batch_size": 64, "rounds": 3, "warmup_rounds": 1, "steps_per_sample": 1, "device": device,
                       "autocast": "none", "global_size": 224, "local_size": 96, "local_number": 10, "compile": False},
            "peak": {"tflops": 72.7, "source": "test peak"},
            "strategies": {"random": entry, "attmask_high": entry},
            "ratio_to_random": {"random": summarize([1.0]), "attmask_high": summarize([1.01, 1.02])},
            "attmask_overhead_percent": {"attmask_high": 1.5}}


def test_bench_md_renders_fabricated_results(tmp_path):
    machine = {"cpu": "Test CPU", "cpu_count": 2, "usable_cpus": 2, "torch_threads": 2, "memory_gib": 8.0, "gpu": None,
               "packages": {"torch": "9.9"}}
    bench_dir, timing_dir = tmp_path / "bench", tmp_path / "timing"
    bench_dir.mkdir()
    timing_dir.mkdir()
    (bench_dir / "pretrain_step.json").write_text(json.dumps(
        {"machine": machine, "cases": {"vit_s16_multicrop": _fake_case("cpu")}}))
    (timing_dir / "pretrain.json").write_text(json.dumps(
        {"stage": "pretrain", "sacred_run": 3, "wall_seconds": 120.0, "machine": {"device": "cpu", "cpu_model": "Test CPU", "cpus": 2}}))
    text = render.render(render.load_results(bench_dir, timing_dir))
    assert "Test CPU" in text and "torch 9.9" in text
    assert "110.0 ms (100.0-120.0, n=3)" in text  # the median with its range
    assert "25.0%" in text  # MFU
    assert "attmask_high +1.5%" in text
    assert "0.5% of the step's FLOPs" in text  # channels-last argument from the counted convolution share
    assert "| pretrain | 120.0 s | cpu | 3 |" in text and "Not measured yet: generate" in text
    assert render.OWED in text  # no GPU results: owed, not invented
    assert "Not measured on a GPU yet" in text


def test_bench_md_renders_gpu_results_and_failures(tmp_path):
    machine = {"cpu": "Host", "cpu_count": 16, "usable_cpus": 16, "torch_threads": 16, "memory_gib": 128.0,
               "gpu": {"name": "NVIDIA H100 80GB HBM3", "count": 1, "memory_gib": 79.0}, "packages": {}}
    case = _fake_case("cuda")
    case["host_syncs"] = {"random": {"syncs_per_step": 0.0, "where": {}}}
    (tmp_path / "gpu_step.json").write_text(json.dumps({"machine": machine, "cases": {"vit_s16_multicrop": case}}))
    (tmp_path / "gpu_batch.json").write_text(json.dumps({"error": "failed: RuntimeError: boom", "machine": machine}))
    text = render.render(render.load_results(tmp_path, tmp_path / "none"))
    assert "GPU (NVIDIA H100 80GB HBM3)" in text and "2.0 GiB" in text and "random 0" in text
    assert "The GPU run failed: `failed: RuntimeError: boom`" in text
    assert "Measured rate" in text  # the estimate now uses the measured step
    assert "Not measured yet: no `reports/timing" in text


def test_interleaved_timing_collects_every_round_and_the_peak_probe():
    from bench.bench_pretrain import ratios_to, time_interleaved

    calls: list[str] = []

    class FakeTrainer:
        def __init__(self, name: str):
            self.name = name

        def train_step(self, crops, epoch, step):
            calls.append(self.name)

    trainers = {name: FakeTrainer(name) for name in ("random", "attmask_high", "block")}
    probe_calls = []
    measured = time_interleaved(trainers, [], rounds=4, warmup=1, steps_per_sample=2, device=torch.device("cpu"),
                                count_flops=False, probe=lambda: probe_calls.append(1) or 1.0)
    assert all(len(t) == 4 for t in measured["times"].values())
    assert measured["peak_samples"] == [1.0] * 4 and len(probe_calls) == 4
    assert len(calls) == 3 * 5 * 2  # strategies x (warm-up + timed rounds) x steps per sample
    assert calls[:6:2] == ["random", "attmask_high", "block"] and calls[6:12:2] == ["attmask_high", "block", "random"]
    assert ratios_to(measured["times"], "random")["random"]["median"] == 1.0


def test_timing_section_lists_stages_with_run_dirs_and_the_total():
    machine = {"cpu": "AMD EPYC", "cpus": 2, "threads": 2, "device": "cpu"}
    timing = {stage: {"wall_seconds": seconds, "machine": machine,
                      "sacred_run": {"stage": stage, "id": "3", "dir": f"runs/sacred/{stage}/3"}}
              for stage, seconds in [("pretrain", 300.0), ("finetune", 60.0)]}
    text = "\n".join(render.timing_section({"timing": timing}))
    assert "| pretrain | 300.0 s | cpu | runs/sacred/pretrain/3 |" in text
    assert "| **total** | **6.0 min** | | |" in text
    assert "On AMD EPYC, 2 CPUs, 2 torch threads." in text
    assert "Not measured yet: generate, shard, extract, knn, fewshot, linear, linear_sgd, report." in text


@pytest.mark.slow
def test_gpu_harness_dry_run_writes_what_the_report_renders(tmp_path):
    """`bench.gpu --dry-run` (CPU, tiny sizes) runs the GPU parts end to end; bench.md renders their files (~40 s)."""
    from bench import gpu

    status = gpu.main(["--dry-run", "--out", str(tmp_path), "correctness", "step", "batch", "compile"])
    assert sorted(status) == ["batch", "compile", "correctness", "step"], status
    assert all(value.startswith("ok (") for value in status.values()), status
    results = render.load_results(tmp_path, tmp_path / "no-timing")
    correctness = results["gpu_correctness"]
    assert correctness["passed"] and set(correctness["strategies"]) == {"random", "attmask_high"}
    assert results["gpu_batch"]["largest"] >= 8
    text = render.render(results)
    assert "*Dry run of the GPU harness on CPU, not GPU figures:* **bf16 vs float32 loss**" in text
    assert "**Largest batch** (attmask_high)" in text and "**torch.compile** (attmask_high" in text


@pytest.mark.slow
def test_gpu_alert_pass_dry_run_lists_every_stage_with_no_alert_on_cpu(tmp_path):
    """`bench.gpu --dry-run alerts`: one step of every torch stage in one pass; the CPU raises no alert (~30 s)."""
    from bench import gpu
    from bench.stage_steps import STAGES

    status = gpu.main(["--dry-run", "--out", str(tmp_path), "alerts"])
    assert list(status) == ["alerts"] and status["alerts"].startswith("ok ("), status
    result = json.loads((tmp_path / "gpu_alerts.json").read_text())
    assert len(STAGES) == 10 and {"finetune", "extract", "linear_sgd", "knn", "pretrain/attmask_high"} <= set(STAGES)
    assert sorted(result["alerts"]) == sorted(STAGES) and result["stages"] == list(STAGES)  # the file's keys: sorted
    assert result["alerts"] == {stage: [] for stage in STAGES} and result["errors"] == {} and result["clean"]
    assert set(result["stage_seconds"]) == set(STAGES) and result["device"] == "cpu"
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def test_alert_pass_records_every_stages_alerts_goes_on_after_a_failure_and_restores_the_mode():
    """Planted stages: Tensor.put_ (accumulate=False) alerts on the CPU too, forward and backward."""
    from bench.stage_steps import alert_pass

    def put() -> None:
        x = torch.zeros(4, requires_grad=True)
        x.clone().put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0])).sum().backward()

    def broken_build():
        raise ValueError("no such stage")

    stages = {"alerting": lambda: put, "broken": broken_build, "clean": lambda: (lambda: torch.ones(3).sum())}
    torch.use_deterministic_algorithms(True)
    try:
        result = alert_pass({}, None, None, torch.device("cpu"), stages=stages)
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert list(result["alerts"]) == ["alerting", "broken", "clean"]
    [message] = result["alerts"]["alerting"]  # forward and backward alert alike: one message, two places
    assert message.startswith("put_ does not have a deterministic implementation")
    assert len(result["where"]["alerting"][message]) == 2
    assert result["alerts"]["broken"] == [] and result["errors"] == {"broken": "ValueError: no such stage"}
    assert result["alerts"]["clean"] == []


def test_numerics_section_names_what_differs_from_portable_and_the_cost(tmp_path):
    def entry(weights, probe, numpy, differ, ms=(100.0,)):
        runs = [{"step_seconds": m / 1000, "weights": weights, "probe": probe, "numpy": numpy} for m in ms]
        return {"env": {}, "onednn": False, "runs": runs, "same_bits_every_run": True, "differ_from_portable": differ}

    result = {"config": {"rounds": 2, "steps": 4},
              "settings": {"native": entry("w1", "p1", "n1", ["weights", "probe", "numpy"], (80.0, 90.0)),
                           "portable": entry("w0", "p0", "n0", [], (100.0, 110.0)),
                           "portable - NPY_ENABLE_CPU_FEATURES": entry("w0", "p0", "n1", ["numpy"])},
              "portable_over_native_step_time": summarize([1.25, 1.2]), "compatible_over_native_step_time": 2.5}
    (tmp_path / "numerics.json").write_text(json.dumps(result))
    text = "\n".join(render.numerics_section(render.load_results(tmp_path, tmp_path / "none")))
    assert "| portable - NPY_ENABLE_CPU_FEATURES | 100 (n=1) | `w0` | `p0` | `n1` | numpy |" in text
    assert "| native | 90 (n=2) | `w1` | `p1` | `n1` | weights, probe, numpy |" in text
    assert "| portable | 110 (n=2) | `w0` | `p0` | `n0` | - |" in text
    assert "portable / native step time: x1.225 (1.200-1.250, n=2); compatible / native: x2.50" in text
    assert "same bits in every round: yes." in text


def test_open_bench_times_both_verify_levels_and_scales_them_to_imagenet(tiny_shards):
    from bench.bench_data import IMAGENET_TRAIN, time_open

    result = time_open(tiny_shards, repeats=2)
    assert set(result["levels"]) == {"index", "full"} and all(s["n"] == 2 for s in result["levels"].values())
    index, full = result["levels"]["index"]["median"], result["levels"]["full"]["median"]
    assert result["imagenet_seconds"]["index"] == pytest.approx(index / result["samples"] * IMAGENET_TRAIN["images"])
    assert result["imagenet_seconds"]["full"] == pytest.approx(full / result["shard_bytes"] * IMAGENET_TRAIN["shard_bytes"])


def test_data_path_bench_times_both_photometric_modes_and_renders_before_and_after(tiny_shards):
    from bench.bench_data import time_device_ops, time_multicrop
    from pipeline.core.config import AugmentConfig

    batched = AugmentConfig(global_size=16, local_size=8, local_number=2, photometric="batched")
    timing = time_multicrop(tiny_shards, batched, num_workers=0, epochs=1)
    assert timing["images_per_second"]["median"] > 0 and timing["num_workers"] == 0
    ops = time_device_ops(tiny_shards, batched, torch.device("cpu"), repeats=2)
    assert ops["ms_per_batch"]["n"] == 2 and ops["ms_per_image"] == pytest.approx(ops["ms_per_batch"]["median"] / 8)

    def case(photometric, rate):
        return {"image": "JPEG 500x375", "crops": "2 x 224 + 10 x 96 px", "photometric": photometric,
                "workers": {"1": {"images_per_second": summarize([rate, rate]), "per_worker_images_per_second": rate}}}
    result = {"multicrop": {"paper": case("per_image", 20.0), "paper_batched": {**case("batched", 180.0), "device_ops": {
        "cpu": {**ops, "ms_per_batch": summarize([400.0, 410.0]), "ms_per_image": 50.6}}}}}
    text = "\n".join(render.data_section({"data": result}))
    assert "| JPEG 500x375 -> 2 x 224 + 10 x 96 px | per_image | 1 |" in text
    assert "| JPEG 500x375 -> 2 x 224 + 10 x 96 px | batched | 1 |" in text
    assert "colour ops per image in the worker, the best measured here is 20.0" in text
    assert "colour ops batched on the device, the best measured here is 180.0" in text
    assert "on cpu" in text and "(50.60 ms per image)" in text


def test_linear_probe_bench_projects_each_part_to_an_epoch_and_renders_it():
    from bench.bench_linear import CASE, project

    head, backbone = summarize([0.02, 0.03, 0.025]), summarize([1.0, 1.2])
    loader = {"seconds": summarize([0.1, 0.1]), "images": 32}  # 320 images/s per worker
    result = project(head, backbone, loader, head_batch=256, backbone_batch=8, gpu_tflops=400.0, gpu_source="assumed")
    steps = CASE["train_images"] // CASE["batch_size"]
    cpu, gpu = result["cpu_seconds_per_epoch"], result["gpu_seconds_per_epoch"]
    assert cpu["head"] == pytest.approx(0.025 * 4 * steps)  # batch 256 timed, 1024 per step
    assert cpu["backbone_forward"] == pytest.approx(1.1 / 8 * CASE["train_images"])
    assert gpu["loader_16_workers"] == pytest.approx(CASE["train_images"] / (320 * 16))
    assert 8.5 < result["backbone_forward_gflop_per_image"] < 10.0  # ViT-S/16 at 224: 4.6 GMAC = 9.2 GFLOP
    assert gpu["total"] == max(gpu["backbone_forward"], gpu["loader_16_workers"])
    report = {"case": CASE, "threads": 2, "head_step_seconds": head, "head_batch": 256, "backbone_batch_seconds": backbone,
              "backbone_batch": 8, "loader": loader, **result}
    text = "\n".join(render.linear_sgd_section({"linear_sgd": report}))
    assert "| linear head (SGD step) | 25.0 ms (20.0-30.0, n=3) ms" not in text
    assert "| linear head (SGD step) | 25.0 (20.0-30.0, n=3) ms per batch of 256 (2 threads) |" in text
    assert "loader-bound; estimated, not measured" in text


def test_learning_curve_finds_where_the_gap_crosses_the_target_and_renders_it():
    from bench.learning_curve import crossing

    def point(epochs, minutes, knn):
        return {"epochs": epochs, "minutes": minutes, "knn": {"pretrained": knn, "random_init": 16.0, "pixels": 20.0},
                "gap": {"random_init": knn - 16.0, "pixels": knn - 20.0}}
    points = [point(16, 10.0, 33.0), point(4, 2.5, 26.0), point(32, 20.0, 37.0)]
    assert crossing(points, "random_init", target=5.0) == 2.5  # already above at the smallest budget
    # random init: +10 at 2.5 min, +17 at 10 min -> +15 at 5/7 of the way in log(minutes)
    assert crossing(points, "random_init") == pytest.approx(2.5 * (10.0 / 2.5) ** (5 / 7))
    # pixels: +13 at 10 min, +17 at 20 min -> +15 half-way in log(minutes): sqrt(10 * 20)
    assert crossing(points, "pixels") == pytest.approx((10.0 * 20.0) ** 0.5)
    assert crossing(points, "pixels", target=30.0) is None
    result = {"target": 15.0, "k": 20, "seed": 0, "points": points,
              "crosses_at_minutes": {"random_init": crossing(points, "random_init"), "pixels": crossing(points, "pixels")}}
    text = "\n".join(render.learning_curve_section({"learning_curve": result}))
    assert "| 4 | 2.5 min | 26.0 | +10.0 | +6.0 |" in text  # sorted by budget
    assert "margin over raw pixels reaches +15: at about 14.1 min" in text
    result["crosses_at_minutes"] = {"random_init": 2.5, "pixels": None}
    text = "\n".join(render.learning_curve_section({"learning_curve": result}))
    assert "random init reaches +15: already at the smallest budget measured (2.5 min)" in text
    assert "raw pixels reaches +15: not within the measured budgets (up to 20.0 min)" in text


def test_strategy_budget_says_at_which_budget_high_and_low_separate():
    from bench.strategy_budget import summarise, with_overrides

    params = {"seed": 0, "pretrain": {"epochs": 4, "eval_every": 2}, "masking": {"strategy": "attmask_high"}}
    changed = with_overrides(params, 2, 12, "attmask_low")
    assert changed == {"seed": 2, "pretrain": {"epochs": 12, "eval_every": 0, "min_steps": 0}, "masking": {"strategy": "attmask_low"}}
    assert params["pretrain"] == {"epochs": 4, "eval_every": 2}  # a copy, the input is untouched

    def run(seed, epochs, strategy, knn):
        return {"seed": seed, "epochs": epochs, "strategy": strategy, "minutes": epochs / 2, "knn": {"pretrained": knn}}
    # 3 epochs: High 32 +- 1, Low 30 +- 2: +2 is within 1 + 2; 12 epochs: High 36 +- 1, Low 31 +- 1: +5 > 2
    runs = [run(0, 3, "attmask_high", 31.0), run(1, 3, "attmask_high", 32.0), run(2, 3, "attmask_high", 33.0),
            run(0, 3, "attmask_low", 28.0), run(1, 3, "attmask_low", 30.0), run(2, 3, "attmask_low", 32.0),
            run(0, 12, "attmask_high", 35.0), run(1, 12, "attmask_high", 36.0), run(2, 12, "attmask_high", 37.0),
            run(0, 12, "attmask_low", 30.0), run(1, 12, "attmask_low", 31.0), run(2, 12, "attmask_low", 32.0)]
    rows = summarise(runs, [3, 12])
    assert [(r["epochs"], r["high_minus_low"], r["separated"]) for r in rows] == [(3, 2.0, False), (12, 5.0, True)]
    assert rows[1]["minutes"] == 6.0 and rows[1]["seeds"] == 3
    result = {"k": 20, "seeds": [0, 1, 2], "paper_gap": 5.7, "runs": runs, "budgets": rows}
    text = "\n".join(render.strategy_budget_section({"strategy_budget": result}))
    assert "| 3 | 0, 1, 2 | 1.5 min | 32.0 ± 1.0 | 30.0 ± 2.0 | +2.0 | no |" in text
    assert "| 12 | 0, 1, 2 | 6.0 min | 36.0 ± 1.0 | 31.0 ± 1.0 | +5.0 | yes |" in text
    assert "High and Low separate at 12 epochs of the budgets measured (3, 12 epochs)." in text
    rows[1]["separated"] = False
    assert "separate at none of the budgets measured" in "\n".join(render.strategy_budget_section({"strategy_budget": result}))


def test_learning_curve_joins_a_later_longer_budget_and_recomputes_the_crossing():
    def point(epochs, minutes, knn):
        return {"epochs": epochs, "minutes": minutes, "knn": {"pretrained": knn, "random_init": 16.0, "pixels": 20.0},
                "gap": {"random_init": knn - 16.0, "pixels": knn - 20.0}}
    curve = {"target": 15.0, "k": 20, "seed": 0, "points": [point(4, 2.5, 31.0), point(8, 5.0, 33.0)],
             "crosses_at_minutes": {"random_init": 2.5, "pixels": None}}
    long = {"target": 15.0, "k": 20, "seed": 0, "points": [point(60, 40.0, 37.0)],
            "crosses_at_minutes": {"random_init": 40.0, "pixels": 40.0}}
    text = "\n".join(render.learning_curve_section({"learning_curve": curve, "learning_curve_long": long}))
    assert "| 60 | 40.0 min | 37.0 | +21.0 | +17.0 |" in text
    # pixels: +13 at 5 min, +17 at 40 min -> +15 half-way in log(minutes): sqrt(5 * 40)
    assert "raw pixels reaches +15: at about 14.1 min" in text
    assert "random init reaches +15: already at the smallest budget measured (2.5 min)" in text


def test_feature_attributes_reads_what_the_features_hold():
    from bench.feature_attributes import chance_nmi, cluster_nmi, knn_readout, majority_share
    rng = torch.Generator().manual_seed(0)
    n = 600
    labels = torch.randint(0, 10, (n,), generator=rng).numpy()
    colours = torch.randint(0, 6, (n,), generator=rng).numpy()
    attrs = {"class": labels, "object_colour": colours, "background_colour": (colours + 1) % 6}
    # features that hold the object colour and nothing else: colours read perfectly, the class at chance
    features = torch.nn.functional.one_hot(torch.from_numpy(colours), 6).float().numpy()
    features = features + 0.01 * torch.randn(n, 6, generator=rng).numpy()
    train, val = slice(0, 500), slice(500, n)
    read = knn_readout(features[train], features[val], {k: v[train] for k, v in attrs.items()},
                       {k: v[val] for k, v in attrs.items()}, temperature=0.07)
    assert read["object_colour"] == 100.0 and read["background_colour"] == 100.0
    assert read["class"] < 25.0
    attrs["colour_pair"] = attrs["object_colour"] * 6 + attrs["background_colour"]
    nmi = cluster_nmi(colours, attrs)
    assert nmi["object_colour"] == pytest.approx(1.0) and nmi["class"] < 0.05
    assert max(chance_nmi(colours, attrs, seed=0).values()) < 0.05
    assert majority_share([0, 0, 0, 1]) == 75.0


def test_feature_attributes_section_renders_both_tables():
    row = {"class": 33.6, "object_colour": 87.0, "background_colour": 100.0}
    nmi = {"class": 0.04, "object_colour": 0.26, "background_colour": 0.55, "colour_pair": 0.64}
    result = {"k": 20, "seed": 0, "num_train": 5000, "num_val": 500, "out_dim": 64,
              "knn": {v: row for v in ("pretrained", "random_init", "pixels")},
              "majority": {"class": 10.0, "object_colour": 19.6, "background_colour": 18.6},
              "clusters": {n: {"used": 48, "nmi": nmi, "chance_nmi": {k: 0.01 for k in nmi}}
                           for n in ("pretrained_teacher", "random_init")}}
    text = "\n".join(render.feature_attributes_section({"feature_attributes": result}))
    assert "| pre-trained | 33.6 | 87.0 | 100.0 |" in text
    assert "| pretrained teacher | 48 | 0.04 (chance 0.01) | 0.26 (chance 0.01) | 0.55 (chance 0.01) | 0.64 (chance 0.01) |" in text
    assert "Not measured yet" in "\n".join(render.feature_attributes_section({}))


def test_feature_attributes_replays_each_images_own_draws():
    from bench.feature_attributes import split_attributes
    from pipeline.data.synthetic import palette_index, scene

    class FakeSplit:  # what split_attributes reads of a ShardSplit: its name, length and per-sample paths
        split = "val"
        paths = ["val/c02_ring/c02_ring_00004.png", "val/c00_star/c00_star_00001.png"]

        def __len__(self):
            return len(self.paths)

        def metadata(self, i):
            return {"path": self.paths[i]}

    attrs = split_attributes(FakeSplit(), seed=5, image_size=32, progress=False)
    assert attrs["class"].tolist() == [2, 0]
    expected = [palette_index(scene(5, "val", c, i, 32)["background_colour"]) for c, i in ((2, 4), (0, 1))]
    assert attrs["background_colour"].tolist() == expected
    assert attrs["colour_pair"].tolist() == (attrs["object_colour"] * 6 + attrs["background_colour"]).tolist()


def test_feature_attributes_refuses_a_folder_it_has_no_generator_for(tmp_path):
    from bench.feature_attributes import measure
    from pipeline.core.config import load_params
    params = load_params("params.yaml", {"data.source": "imagefolder"})
    with pytest.raises(SystemExit, match="needs data.source: synthetic"):
        measure(params, tmp_path / "shards", tmp_path / "features", tmp_path / "checkpoint.pt", progress=False)


# ------------------------------------------------------------ provenance and wording of bench.md
def test_bench_md_says_where_each_data_file_came_from_and_collects_the_records(tmp_path):
    from pipeline.reporting import provenance

    record = provenance.record(tmp_path, inputs=("bench",), params_sha="p", threads=2)
    machine = {"cpu": "Test CPU", "cpu_count": 2, "usable_cpus": 2, "torch_threads": 2, "memory_gib": 8.0, "gpu": None,
               "packages": {}, "provenance": record}
    (tmp_path / "pretrain_step.json").write_text(json.dumps({"machine": machine, "cases": {"embedded": _fake_case("cpu")}}))
    (tmp_path / "masking.json").write_text(json.dumps({"machine": "x86_64", "batch_size": 8, "device": "cpu",
                                                       "repeats": 1, "per_call": {}}))
    results = render.load_results(tmp_path, tmp_path / "none")
    section = "\n".join(render.provenance_section(results))
    assert f"| `pretrain_step.json` | unknown: not a git checkout | {provenance.describe(record)['machine']} | " \
           f"{record['date']} |" in section
    assert (f"| `masking.json` | {provenance.UNKNOWN} | x86_64 (CPU model not recorded) | {provenance.UNKNOWN} |"
            in section)
    sources = render.provenance_document(results)["provenance"]["sources"]
    assert sources == {"pretrain_step.json": record, "masking.json": None}


def test_machine_info_records_the_provenance_of_the_benchmark_code():
    from bench.machine import machine_info

    record = machine_info()["provenance"]
    assert record["input_paths"][-1] == "bench" and "bench/render.py" in record["inputs"]
    assert "pipeline/reporting/provenance.py" in record["inputs"] and record["date"]


def test_an_overhead_within_its_own_range_is_marked_noise_and_mfu_names_its_denominator():
    case = _fake_case("cpu")
    case["ratio_to_random"] = {"random": summarize([1.0]), "attmask_high": summarize([0.81, 0.88, 1.04]),
                               "attmask_low": summarize([0.71, 0.90, 0.93])}
    case["attmask_overhead_percent"] = {"attmask_high": -12.0, "attmask_low": -9.5}
    notes = "\n".join(render.step_notes(case))
    assert "attmask_high -12.0% (noise), attmask_low -9.5%." in notes
    assert "the rate of a timed matmul, 72.7 TFLOP/s (test peak): the share of what a large matrix product" in notes
    assert "0.880 (0.810-1.040, n=3) noise |" in "\n".join(render.step_table(case))
    case["peak"] = {"tflops": 989.4, "source": "H100 SXM datasheet, dense bf16"}
    assert "/ peak; peak 989 TFLOP/s (H100 SXM datasheet, dense bf16)." in "\n".join(render.step_notes(case))


def test_the_timing_section_gives_repository_relative_paths():
    timing = {"pretrain": {"wall_seconds": 1.0, "machine": {"device": "cpu"},
                           "sacred_run": {"dir": "/some/machine/checkout/runs/sacred/pretrain/3"}}}
    assert "| pretrain | 1.0 s | cpu | runs/sacred/pretrain/3 |" in "\n".join(render.timing_section({"timing": timing}))
