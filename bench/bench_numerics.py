"""Portable CPU numerics: which dispatch control changes the bits here, and what pinning them costs.

    .venv/bin/python -m bench.bench_numerics [--rounds 3] [--steps 4]

Each setting runs in a fresh process (the controls are read when the libraries
load), with the environment of :func:`pipeline.core.numerics.numerics_env`:

- ``native``: no control set, every library picks the widest ISA it finds;
- ``portable``: every control pinned (the default of ``make repro``);
- ``compatible``: portable with MKL's SSE2 branch (identical on Intel and AMD);
- ``portable - X``: portable with one control ``X`` left native. If its bits
  differ from ``portable``'s, ``X`` matters on this CPU, and a CPU with another
  ISA would give other bits without it; ``portable + oneDNN/NNPACK on`` the same
  for torch's oneDNN and NNPACK kernels.

A process trains the embedded model (params.yaml, ``attmask_high``) for
``--steps`` steps on fixed random crops, fits the linear probe's
scikit-learn classifier on fixed random features and takes NumPy's float64
sin, cos, exp and log (what the synthetic generator draws with); it reports
the step time and SHA-256 of the final weights, the classifier's
coefficients and NumPy's results.
``native`` and ``portable`` alternate over ``--rounds`` rounds so that machine
noise hits both; the cost is the per-round ratio of their median step times.

Writes ``reports/bench/numerics.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPORT = Path("reports/bench/numerics.json")


def _digest(arrays: list[Any]) -> str:
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(array.tobytes())
    return hasher.hexdigest()[:16]


def child(steps: int, onednn: bool) -> dict[str, Any]:
    """Train ``steps`` steps and fit one classifier in this process; step time and result hashes."""
    import numpy as np
    import torch

    from bench.bench_pretrain import build_trainers, case_params, fixed_crops
    from pipeline.core.numerics import limit_threads
    from pipeline.core.seeding import configure_determinism
    from pipeline.evaluation.linear_probe import l2_normalize
    from sklearn.linear_model import LogisticRegression

    raw = case_params("embedded")
    limit_threads(raw["threads"])
    configure_determinism()
    torch.backends.mkldnn.enabled = onednn  # as configure_numerics does: oneDNN and NNPACK together
    torch.backends.nnpack.set_flags(onednn)
    with tempfile.TemporaryDirectory(prefix="bench_numerics_") as tmp:
        trainer = build_trainers(raw, ["attmask_high"], Path(tmp), torch.device("cpu"))["attmask_high"]
        crops = fixed_crops(trainer)
        times = []
        for step in range(steps + 1):  # step 0 warms up
            start = time.perf_counter()
            trainer.train_step(crops, epoch=0, step=step)
            times.append(time.perf_counter() - start)
        weights = [p.detach().numpy() for p in trainer.student_module.state_dict().values()]
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2000, 192)).astype(np.float32)
    labels = rng.integers(0, 10, 2000)
    classifier = LogisticRegression(max_iter=raw["linear"]["max_iter"], random_state=0)
    classifier.fit(l2_normalize(features), labels)
    angles = rng.uniform(-10.0, 10.0, 100_000)  # the float64 maths the synthetic generator draws shapes with
    maths = [np.sin(angles), np.cos(angles), np.exp(angles), np.log(np.abs(angles))]
    return {"step_seconds": sorted(times[1:])[len(times[1:]) // 2], "weights": _digest(weights),
            "probe": _digest([classifier.coef_, classifier.intercept_]), "numpy": _digest(maths),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_setting(env: dict[str, str], onednn: bool, steps: int) -> dict[str, Any]:
    """:func:`child` in a fresh process with exactly ``env``'s controls set."""
    from pipeline.core.numerics import CONTROLS

    full = {k: v for k, v in os.environ.items() if k not in CONTROLS}
    full.update(env)
    command = [sys.executable, "-m", "bench.bench_numerics", "--child", str(steps), *(["--onednn"] if onednn else [])]
    out = subprocess.run(command, env=full, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per process")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--onednn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.onednn)))
        return {}
    from bench.machine import machine_info
    from bench.stats import summarize
    from pipeline.core.numerics import numerics_env

    portable = numerics_env("portable")
    # name -> (environment, oneDNN and NNPACK on): the three modes, then portable less one control
    settings = {"native": ({}, True), "portable": (portable, False), "compatible": (numerics_env("compatible"), False)}
    settings.update({f"portable - {name}": ({k: v for k, v in portable.items() if k != name}, False) for name in portable})
    settings["portable + oneDNN/NNPACK on"] = (portable, True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for round_index in range(args.rounds):
        names = ["native", "portable"] if round_index % 2 == 0 else ["portable", "native"]
        if round_index == 0:
            names += [n for n in settings if n not in ("native", "portable")]
        for name in names:
            results[name].append(run_setting(*settings[name], args.steps))
            last = results[name][-1]
            print(f"  {name:34s} {last['step_seconds'] * 1000:8.1f} ms/step  weights {last['weights']}  "
                  f"probe {last['probe']}  numpy {last['numpy']}  ATen {last['cpu_capability']}", flush=True)
    reference = results["portable"][0]
    report: dict[str, Any] = {"machine": machine_info(), "config": {"rounds": args.rounds, "steps": args.steps},
                              "settings": {}}
    for name, runs in results.items():
        report["settings"][name] = {
            "env": settings[name][0], "onednn": settings[name][1], "runs": runs,
            "same_bits_every_run": len({(r["weights"], r["probe"], r["numpy"]) for r in runs}) == 1,
            "differ_from_portable": [k for k in ("weights", "probe", "numpy") if runs[0][k] != reference[k]]}
    ratios = [p["step_seconds"] / n["step_seconds"] for p, n in zip(results["portable"], results["native"])]
    report["portable_over_native_step_time"] = summarize(ratios)
    # compatible runs once, in round 0: its ratio is to that round's native
    report["compatible_over_native_step_time"] = (results["compatible"][0]["step_seconds"]
                                                  / results["native"][0]["step_seconds"])
    print(f"portable / native step time: x{report['portable_over_native_step_time']['median']:.3f} "
          f"over {len(ratios)} rounds; compatible / native x{report['compatible_over_native_step_time']:.2f} (1 round)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


if __name__ == "__main__":
    main()
