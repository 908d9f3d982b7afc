"""What a search decided, typed: the one adapter over ModelOpt's nested search-state dict.

:func:`decisions_from_state` turns ``mtq.auto_quantize``'s state into :class:`GroupDecision` objects (one per
group of modules that share a format); :func:`resolve_decisions` re-solves another target from the saved
scores (:func:`vlq.search.search.apply_decisions` switches the searched model's live quantizers to them).
Everything downstream reads these, never the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..formats.registry import NO_QUANT, format_for_modelopt_name
from ..runtime.errors import SchemeError, SearchStateError



@dataclass(frozen=True)
class Candidate:
    format: str
    score: float
    cost: float


@dataclass(frozen=True)
class GroupDecision:
    """One AutoQuant decision: a group of modules that share one format (q/k/v, gate/up, ...)."""

    name: str  # full-VLM name of the group key, e.g. model.language_model.layers.0.self_attn
    members: tuple[str, ...]  # full-VLM module names
    chosen: str
    candidates: tuple[Candidate, ...]
    searched: bool  # False when the group was disabled (only "none" allowed)
    cost_weight: float

    def candidate(self, fmt: str) -> Candidate:
        for c in self.candidates:
            if c.format == fmt:
                return c
        raise KeyError(f"{fmt} is not a candidate of {self.name}")


HPARAM_SUFFIX = ".quant_recipe"


def full_name(name: str, prefix: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def decisions_from_state(state: dict[str, Any], *, name_prefix: str, recipe: dict[str, Any] | None = None) -> tuple[GroupDecision, ...]:
    """Typed decisions from ModelOpt's ``auto_quantize`` state.

    ``name_prefix`` maps names of the searched model to full-VLM names (the LM's path for
    ``extract``, empty for ``mask``).  ``recipe`` overrides ``state['best']['recipe']`` (a re-solve).
    """
    try:
        stats = state["candidate_stats"]
        best = recipe if recipe is not None else state["best"]["recipe"]
    except (KeyError, TypeError) as exc:
        raise SearchStateError(f"Not an AutoQuant search state (missing {exc}).") from exc
    groups = []
    for hparam_name, stat in stats.items():
        formats = [format_for_modelopt_name(str(f)) for f in stat["formats"]]
        candidates = tuple(
            Candidate(fmt, float(score), float(cost))
            for fmt, score, cost in zip(formats, stat["scores"], stat["costs"])
        )
        chosen_recipe = best.get(hparam_name)
        if chosen_recipe is None:
            raise SearchStateError(f"Search state has no decision for {hparam_name}.")
        base = hparam_name[: -len(HPARAM_SUFFIX)] if hparam_name.endswith(HPARAM_SUFFIX) else hparam_name
        groups.append(
            GroupDecision(
                name=full_name(base, name_prefix),
                members=tuple(full_name(m, name_prefix) for m in stat["module_names"]),
                chosen=format_for_modelopt_name(str(chosen_recipe)),
                candidates=candidates,
                searched=len([f for f in formats if f != NO_QUANT]) > 0,
                cost_weight=float(stat.get("cost_weight", 1.0)),
            )
        )
    return tuple(groups)


def resolve_decisions(state: dict[str, Any], target_bits: float, *, name_prefix: str) -> tuple[GroupDecision, ...]:
    """Re-solve a finished search for another effective-bits target without re-scoring.

    Uses the same solver ModelOpt's ``get_auto_quantize_config(state, constraints)`` runs (its
    ``_resolve_best_recipe``), but keeps the per-group recipes instead of flattening them into a
    quantize config.  ``tests/test_sweep.py`` pins that the result equals a fresh search.
    """
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    bits = float(target_bits)
    if not 0 < bits <= 16:
        raise SchemeError(f"target_bits must be in (0, 16], got {target_bits}.")
    try:
        recipe = _resolve_best_recipe(state, {"effective_bits": bits})
    except (KeyError, TypeError) as exc:
        raise SearchStateError(f"Cannot re-solve: not an AutoQuant search state (missing {exc}).") from exc
    return decisions_from_state(state, name_prefix=name_prefix, recipe=recipe)


def groups_within(groups, module_path: str) -> tuple:
    """The groups whose every member lies under ``module_path`` (the language model's, usually)."""
    prefix = module_path + "."
    return tuple(g for g in groups if all(m.startswith(prefix) for m in g.members))


def _cost(group, fmt: str, default: float | None = None) -> float:
    for c in group.candidates:
        if c.format == fmt:
            return c.cost
    if default is None:
        raise KeyError(f"{fmt} is not a candidate of {group.name}")
    return default


def lm_achieved_bits(groups) -> float:
    """Effective bits over ``groups`` (decisions or manifest groups): chosen cost over uncompressed cost, x16."""
    chosen = sum(_cost(g, g.chosen) for g in groups)
    full = sum(_cost(g, NO_QUANT, default=0.0) for g in groups)
    if full <= 0:
        raise SearchStateError("No language-model weight is counted in the search state (zero cost denominator).")
    return chosen / full * 16.0
