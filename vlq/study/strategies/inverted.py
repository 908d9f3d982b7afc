"""Gradient's ranking reversed: within each format, the group gradient finds least sensitive gets the highest
score and the most sensitive the lowest (``max + min - score``), then the LP solves it like any scored strategy.
It quantizes the groups gradient protects first: a frontier every informed strategy should beat."""

from __future__ import annotations

from ...formats.registry import NO_QUANT
from ..strategy import GroupScores, ScoredStrategy, StudyContext


def inverted_scores(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    formats = {f for fs in scores.values() for f in fs if f != NO_QUANT}
    bounds = {f: [s[f] for s in scores.values() if f in s] for f in formats}
    return {g: {f: (max(bounds[f]) + min(bounds[f]) - v if f != NO_QUANT else 0.0) for f, v in fs.items()}
            for g, fs in scores.items()}


class Inverted(ScoredStrategy):
    name = "inverted"
    saved = False

    def scores(self, context: StudyContext) -> GroupScores:
        gradient = context.scores_of("gradient")
        return GroupScores(self.name, inverted_scores({g: dict(s) for g, s in gradient.scores.items()}), 0.0, None,
                           gradient.memory, "gradient's scores, reversed (its cost is gradient's)")


STRATEGY = Inverted()
