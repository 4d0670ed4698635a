"""The masking strategies: the one table of their names, labels and needs.

Every module that lists, validates or labels strategies reads this table:
``params.yaml`` validation (:mod:`pipeline.core.config`), mask generation
(:mod:`pipeline.method.masking`), the report, the comparison and the figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Strategy:
    """One masking strategy.

    ``name`` is the ``masking.strategy`` value; ``label`` the paper's name for it;
    ``short_label`` fits a figure title; ``needs_attention``: masks come from the
    teacher's last-layer [CLS] attention.
    """

    name: str
    label: str
    short_label: str
    needs_attention: bool


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("block", "random block-wise (BEiT)", "block", needs_attention=False),
    Strategy("random", "random", "random", needs_attention=False),
    Strategy("attmask_high", "AttMask-High", "AttMask-High", needs_attention=True),
    Strategy("attmask_hint", "AttMask-Hint", "AttMask-Hint", needs_attention=True),
    Strategy("attmask_low", "AttMask-Low", "AttMask-Low", needs_attention=True),
)
BY_NAME = {strategy.name: strategy for strategy in STRATEGIES}
MASKING_STRATEGIES = tuple(BY_NAME)
ATTENTION_STRATEGIES = tuple(s.name for s in STRATEGIES if s.needs_attention)
StrategyName = Literal[MASKING_STRATEGIES]  # type: ignore[valid-type]  # params validation reads its values


def strategy_label(name: str, short: bool = False) -> str:
    """The display label of a strategy name (the name itself when unknown)."""
    strategy = BY_NAME.get(name)
    if strategy is None:
        return name
    return strategy.short_label if short else strategy.label
