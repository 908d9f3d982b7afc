"""Every group in one candidate format: one point per format, at the bits that format gives (targets ignored).
A group that cannot take the format (its shape rules it out) keeps its most precise candidate."""

from __future__ import annotations

from typing import Sequence

from ...formats.registry import NO_QUANT
from ..strategy import Allocation, BaselineStrategy, StudyContext, candidate_formats


class Uniform(BaselineStrategy):
    name = "uniform"

    def allocations(self, context: StudyContext, targets: Sequence[float], *, argument: str = "",
                    seeds: int = 0) -> tuple[Allocation, ...]:
        formats = [argument] if argument else [f for f in context.formats if f != NO_QUANT]
        out = []
        for fmt in formats:
            choices = tuple((g.name, fmt if fmt in candidate_formats(g) else candidate_formats(g)[-1]) for g in context.groups)
            out.append(Allocation(f"uniform:{fmt}", None, choices))
        return tuple(out)


STRATEGY = Uniform()
