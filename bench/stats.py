"""Median and spread of repeated measurements: every figure in reports/bench.md is one of these."""
from __future__ import annotations

import statistics
from collections.abc import Sequence


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """``n``, ``median``, ``min``, ``max``, quartiles ``q1``/``q3`` and ``spread_pct``.

    ``spread_pct`` is (max - min) / median in percent: with the handful of
    repeats a benchmark can afford, the full range says more than a standard
    deviation would.
    """
    values = sorted(float(v) for v in samples)
    if not values:
        raise ValueError("summarize needs at least one sample")
    median = statistics.median(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    spread = 100.0 * (values[-1] - values[0]) / abs(median) if median else 0.0
    return {"n": len(values), "median": median, "min": values[0], "max": values[-1], "q1": q1, "q3": q3,
            "spread_pct": spread, "samples": values}


def format_summary(summary: dict[str, float], scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """``"12.3 ms (11.9-13.0, n=5)"``: median then the full range, ``scale`` applied to all three."""
    fmt = f"{{:.{digits}f}}"
    median, low, high = (fmt.format(summary[k] * scale) for k in ("median", "min", "max"))
    return f"{median}{unit} ({low}-{high}, n={summary['n']})"
