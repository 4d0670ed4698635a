"""The strategy table (pipeline/core/strategies.py) is the one list every module uses."""
from __future__ import annotations

import typing

from pipeline.core import strategies
from pipeline.core.config import MaskingConfig
from pipeline.method import masking


def test_the_table_drives_validation_masking_and_labels():
    names = tuple(s.name for s in strategies.STRATEGIES)
    assert names == ("block", "random", "attmask_high", "attmask_hint", "attmask_low")
    hints = typing.get_type_hints(MaskingConfig)
    assert typing.get_args(hints["strategy"]) == names  # params validation accepts exactly these
    assert masking.ATTENTION_STRATEGIES == ("attmask_high", "attmask_hint", "attmask_low")
    assert strategies.strategy_label("block") == "random block-wise (BEiT)"
    assert strategies.strategy_label("block", short=True) == "block"
    assert strategies.strategy_label("unknown") == "unknown"
