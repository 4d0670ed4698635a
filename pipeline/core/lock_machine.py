"""Which CPU made the committed ``dvc.lock``, and whether this CPU can check it byte for byte.

``dvc.lock`` holds the MD5 of every output; whether another machine gets the
same bytes depends on its CPU and on ``params.yaml``'s ``numerics``
(:mod:`pipeline.core.numerics`). The report stage, the last one, writes
:data:`RECORD_NAME` beside the lock: the numerics mode and, per stage, the
device and CPU (vendor, x86 family and model) it ran on, from the stages' own
timing records. Git tracks it with the lock; nobody writes it by hand.

CI (``.ci/check-lock``) asks :func:`verdict` before it reruns the pipeline on a
fresh clone and compares the lock: it checks wherever the bytes are promised
(:func:`can_reproduce`, :func:`machine_class`) and says in one line why it skips elsewhere::

    python -m pipeline.core.lock_machine     # exit 0: check; 3: skip (the reason on stdout)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.core.files import write_json

RECORD_NAME = "dvc.lock.machine.json"
INTEL = "GenuineIntel"
SKIP_EXIT = 3


def stage_machine(timing: dict[str, Any] | None) -> dict[str, Any] | None:
    """The device and CPU of one stage's timing record (``reports/timing/<stage>.json``); None without one."""
    machine = (timing or {}).get("machine")
    if not machine:
        return None
    return {"device": machine.get("device"), "cpu": machine.get("cpu"), "vendor": machine.get("cpu_vendor"),
            "family": machine.get("cpu_family"), "model": machine.get("cpu_model_number")}


def build_record(timings: dict[str, dict[str, Any] | None], numerics: str) -> dict[str, Any]:
    """The record of ``dvc.lock``'s machines: ``numerics`` and stage -> :func:`stage_machine` (None: not recorded)."""
    return {"numerics": numerics, "stages": {stage: stage_machine(timing) for stage, timing in timings.items()}}


def write_record(record: dict[str, Any], path: Path) -> None:
    write_json(record, path)


def describe(machine: dict[str, Any]) -> str:
    return f"{machine.get('cpu')} ({machine.get('vendor')} family {machine.get('family')} model {machine.get('model')})"


def machine_class(machine: dict[str, Any], numerics: str) -> str:
    """The group of CPUs promised the bytes that ``machine`` computes under ``numerics``.

    ``portable`` and ``compatible`` pin MKL's branch, which MKL honours on Intel
    CPUs only: every Intel CPU is one group. Anything else (another vendor, or
    ``native``) is promised its exact family and model only. ``compatible`` is
    MKL's documented Intel-and-AMD branch, yet the tiny golden pipeline's weights
    on an AMD EPYC (family 25 model 17) differ from an Intel Xeon's (family 6
    model 167), so no cross-vendor group is claimed.
    """
    if machine.get("vendor") == INTEL and numerics in ("portable", "compatible"):
        return INTEL
    return f"{machine.get('vendor')} family {machine.get('family')} model {machine.get('model')}"


def can_reproduce(made: dict[str, Any], here: dict[str, Any], numerics: str) -> tuple[bool, str]:
    """Whether CPU ``here`` is promised the bytes that ``made`` computed under ``numerics``, and why (one clause)."""
    if made.get("device") != "cpu":
        return False, f"it was computed on {made.get('device')}, not on a CPU"
    group = machine_class(made, numerics)
    if machine_class(here, numerics) == group:
        where = "any Intel CPU" if group == INTEL else "this family and model"
        return True, f"numerics {numerics} promises the same bytes on {where}"
    rule = ("pins MKL on Intel CPUs only" if numerics in ("portable", "compatible")
            else "promises the same model only")
    return False, f"numerics {numerics} {rule}, and this CPU is {describe(here)}"


def verdict(record: dict[str, Any] | None, here: dict[str, Any]) -> tuple[bool, str]:
    """(check?, one line): whether this machine can check the lock that ``record`` describes."""
    if not record:
        return True, f"{RECORD_NAME} is missing: checking, so that the lock and its record are committed together"
    numerics = record.get("numerics", "portable")
    machines = {stage: m for stage, m in record.get("stages", {}).items() if m}
    if not machines:
        return True, f"{RECORD_NAME} names no stage's machine: checking"
    for stage, made in machines.items():
        ok, why = can_reproduce(made, here, numerics)
        if not ok:
            return False, f"dvc.lock check skipped: stage {stage} ran on {describe(made)}; {why}"
    first = next(iter(machines.values()))
    _, why = can_reproduce(first, here, numerics)
    return True, f"dvc.lock check: the lock was made on {describe(first)}; {why}"


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.tracking import machine_info

    path = Path((argv or sys.argv[1:] or [RECORD_NAME])[0])
    record = json.loads(path.read_text()) if path.is_file() else None
    here = stage_machine({"machine": machine_info()})
    check, line = verdict(record, here)
    print(line)
    return 0 if check else SKIP_EXIT


if __name__ == "__main__":
    sys.exit(main())
