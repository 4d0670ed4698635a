"""The stages' clock readings, summarised: ``reports/timing/summary.md`` and the report stage's terminal output.

Wall times, throughput, CPU seconds and sacred run ids change on every run, so
they stay out of every tracked report; they are read from the machine-local
``reports/timing/<stage>.json`` (:mod:`pipeline.core.tracking`) and land beside them.
"""
from __future__ import annotations

import datetime
import socket
from typing import Any, Mapping

_TIMING_KEYS = {"stage", "sacred_run", "wall_seconds", "machine", "process_cpu_seconds"}


def format_seconds(value: float | None) -> str:
    """``9.1 s`` / ``2 min 13 s``; ``not recorded`` for None."""
    if value is None:
        return "not recorded"
    minutes, seconds = divmod(float(value), 60)
    return f"{seconds:.1f} s" if minutes == 0 else f"{int(minutes)} min {seconds:02.0f} s"


def sacred_run(stage: str, value: Any) -> str:
    """``runs/sacred/<stage>/<id>`` of a timing record's ``sacred_run`` (an id or ``{"id", ...}``)."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None:
        return "not recorded"
    text = str(value)
    return f"`runs/sacred/{text}`" if "/" in text else f"`runs/sacred/{stage}/{text}`"


def _extras(timing: Mapping[str, Any]) -> str:
    """Stage-specific figures (e.g. images_per_second), compactly."""
    parts = []
    for key, value in sorted(timing.items()):
        if key in _TIMING_KEYS or isinstance(value, (dict, list, bool)):
            continue
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f"{key.replace('_', ' ')} {shown}")
    return "; ".join(parts)


def timing_table(timings: Mapping[str, dict[str, Any] | None], pending: str | None = None) -> list[str]:
    """One row per stage: sacred run, wall time, CPU seconds, notes; and the total.

    ``pending``: the stage that is running now (its record is written after it ends).
    """
    lines = ["| stage | sacred run | wall time | CPU seconds | notes |", "|---|---|---|---|---|"]
    for stage, timing in timings.items():
        if timing is None:
            note = "running now: recorded when it ends" if stage == pending else ""
            lines.append(f"| {stage} | not recorded | not recorded | | {note} |")
            continue
        cpu = timing.get("process_cpu_seconds")
        lines.append(f"| {stage} | {sacred_run(stage, timing.get('sacred_run'))} | "
                     f"{format_seconds(timing.get('wall_seconds'))} | {'' if cpu is None else f'{cpu:.1f}'} | "
                     f"{_extras(timing)} |")
    recorded = [t["wall_seconds"] for t in timings.values() if t and t.get("wall_seconds") is not None]
    if recorded:
        lines.append(f"| **total** | | {format_seconds(sum(recorded))} | | {len(recorded)} of {len(timings)} "
                     "stages recorded |")
    return lines


def render_summary(timings: Mapping[str, dict[str, Any] | None], pending: str | None = None,
                   now: datetime.datetime | None = None) -> str:
    """``reports/timing/summary.md``: the table, with the host and time it was written (machine-local)."""
    stamp = (now or datetime.datetime.now().astimezone()).isoformat(timespec="seconds")
    lines = ["# Stage clock readings", "",
             f"Written by the report stage on `{socket.gethostname()}` at {stamp} from `reports/timing/<stage>.json`. "
             "Machine-local and not tracked by git: these change on every run, so `reports/README.md` leaves "
             "them out. Sacred records live under `runs/sacred/<stage>/<id>/`.", "",
             *timing_table(timings, pending)]
    return "\n".join(lines) + "\n"
