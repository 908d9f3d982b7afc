"""The one solver: every scored strategy is solved the way ``vlq sweep`` re-solves a target.

A strategy's scores replace the ``scores`` of one saved ModelOpt search state (same groups, same costs, same cost
denominator) and ModelOpt's own ``_resolve_best_recipe`` solves the copy (:func:`vlq.search.decisions.resolve_decisions`)
with ``method`` gradient: its LP.  Only the scores differ between strategies, so a difference in their frontiers is
the scores' doing.  The gradient strategy's own scores solved this way are the sweep's decision at the same target,
bit for bit (``tests/test_study.py``).
"""

from __future__ import annotations

from typing import Any

from ..formats.registry import format_for_modelopt_name
from ..runtime.errors import SearchStateError
from ..search.decisions import HPARAM_SUFFIX, groups_within, lm_achieved_bits, resolve_decisions
from .strategy import Allocation, GroupScores

#: ModelOpt's LP (its gradient searcher's solver); ``kl_div`` is its min-max threshold search.
LP = "gradient"


def state_with_scores(state: dict[str, Any], scores: GroupScores | None, *, name_prefix: str,
                      method: str = LP) -> dict[str, Any]:
    """A shallow copy of ModelOpt's search ``state`` with ``scores`` in its candidate stats and ``method`` as its
    solver (``scores`` None: the state's own).  The saved state is never changed."""
    stats = state["candidate_stats"]
    copied = {}
    for hparam, stat in stats.items():
        entry = dict(stat)
        if scores is not None:
            base = hparam[: -len(HPARAM_SUFFIX)] if hparam.endswith(HPARAM_SUFFIX) else hparam
            group = f"{name_prefix}.{base}" if name_prefix else base
            if group not in scores.scores:
                raise SearchStateError(f"{scores.strategy} gave no score for {group}; its scores belong to another search.")
            entry["scores"] = [scores.score(group, format_for_modelopt_name(str(f))) for f in stat["formats"]]
        copied[hparam] = entry
    return {**state, "candidate_stats": copied, "method": method}


def solve(state: dict[str, Any], scores: GroupScores | None, target_bits: float, *, name_prefix: str, lm_path: str,
          method: str = LP, label: str | None = None) -> tuple[Allocation, float]:
    """The allocation ``method`` chooses for ``scores`` at ``target_bits``, and its achieved bits over the LM."""
    decided = resolve_decisions(state_with_scores(state, scores, name_prefix=name_prefix, method=method), target_bits,
                                name_prefix=name_prefix)
    lm = groups_within(decided, lm_path)
    name = label or (scores.strategy if scores is not None else method)
    return Allocation(name, float(target_bits), tuple((g.name, g.chosen) for g in lm)), lm_achieved_bits(lm)


def scores_from_state(state: dict[str, Any], *, name_prefix: str) -> dict[str, dict[str, float]]:
    """ModelOpt's own scores in a search state, per full-VLM group name and vlq format name."""
    out: dict[str, dict[str, float]] = {}
    for hparam, stat in state["candidate_stats"].items():
        base = hparam[: -len(HPARAM_SUFFIX)] if hparam.endswith(HPARAM_SUFFIX) else hparam
        group = f"{name_prefix}.{base}" if name_prefix else base
        out[group] = {format_for_modelopt_name(str(f)): float(s) for f, s in zip(stat["formats"], stat["scores"])}
    return out
