"""ModelOpt's gradient score: the Fisher-style loss increase per group and format from the base search."""

from __future__ import annotations

from ..solve import scores_from_state
from ..strategy import GroupScores, ScoredStrategy, StudyContext


class ModelOptScores(ScoredStrategy):
    """The scores a ModelOpt search with ``method`` saved (scoring cost: that search's calibration + scoring)."""

    def __init__(self, method: str):
        self.name = self.method = method

    def scores(self, context: StudyContext) -> GroupScores:
        searched = context.modelopt_search(self.method)
        scores = scores_from_state(searched.state, name_prefix=searched.name_prefix)
        lm = {g.name for g in context.groups}
        detail = "restored from the saved search state" if searched.restored else f"ModelOpt {self.method} search"
        return GroupScores(self.name, {g: s for g, s in scores.items() if g in lm}, searched.seconds, searched.peak_bytes,
                           searched.memory, detail)


STRATEGY = ModelOptScores("gradient")
