"""Where the stages read and write: the paths dvc.yaml declares, named once.

A stage imports its paths from here, so a path changes in one place (and in
dvc.yaml, which ``tests/stages/test_paths.py`` checks against this module).
"""
from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
SHARDS = Path("data/shards")
FINETUNE_SHARDS = Path("data/finetune_shards")
FEATURES = Path("data/features")
PRETRAIN_MODELS = Path("models/pretrain")
BACKBONE = PRETRAIN_MODELS / "backbone.safetensors"
FINETUNE_MODELS = Path("models/finetune")
LINEAR_SGD_MODELS = Path("models/linear_sgd")
REPORTS = Path("reports")
PRETRAIN_REPORTS = REPORTS / "pretrain"
EVAL_REPORTS = REPORTS / "eval"
METRICS = REPORTS / "metrics.json"
TIMING = REPORTS / "timing"

# Written but deliberately not DVC outputs: clock readings (wall times differ per run), and the
# shards of a user's fine-tuning folder (finetune.data_root), rebuilt from that folder when needed.
UNDECLARED = (TIMING, FINETUNE_SHARDS)
