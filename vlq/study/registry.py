"""Study strategies by name: each is one module under :mod:`vlq.study.strategies` exposing ``STRATEGY``.

Adding a strategy is one module plus one row in :data:`STRATEGY_MODULES`; the CLI, the records and the tables
read this registry.  Names are checked here without importing torch (``uniform`` expands to one
``uniform:<format>`` per candidate format of a format set).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..runtime.errors import SchemeError

#: Strategy name -> (module defining ``STRATEGY``, one line saying what it is).
STRATEGY_MODULES: dict[str, tuple[str, str]] = {
    "gradient": ("gradient", "ModelOpt's gradient (Fisher) score per group and format, solved by the LP"),
    "kl_div": ("kl_div", "ModelOpt's kl_div score (calibration rows), solved by the LP; also shown as ModelOpt "
                         "solves it (kl_div@modelopt, its min-max threshold search)"),
    "ablation": ("ablation", "the measured oracle: only that group in that format, KLD to BF16 on the scoring split"),
    "weight_error": ("weight_error", "data-free: relative weight error of each format's real quantizer, size-weighted"),
    "uniform": ("uniform", "every group in one candidate format (one point per format, at its own bits)"),
    "position": ("position", "first and last k decoder layers in the most precise candidate, the rest in the cheapest"),
    "random": ("random", "N seeded random allocations per target (median and inter-quartile band)"),
    "inverted": ("inverted", "gradient's ranking reversed within each format, solved by the LP"),
}

#: What ``vlq study`` runs without --strategies.
DEFAULT_STRATEGIES = ("gradient", "kl_div", "ablation", "weight_error", "uniform", "position", "random", "inverted")

#: The row of ModelOpt's kl_div scores solved by ModelOpt's own threshold search (not a registered strategy).
KL_DIV_MODELOPT = "kl_div@modelopt"


def parse_strategies(text: str | None) -> tuple[str, ...]:
    """Comma-separated strategy names, validated (``uniform:fp8`` names one uniform point; ``uniform`` all)."""
    if text is None:
        return DEFAULT_STRATEGIES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise SchemeError(f"--strategies needs at least one of {', '.join(STRATEGY_MODULES)}.")
    for name in names:
        base, _, arg = name.partition(":")
        if base not in STRATEGY_MODULES or (arg and base != "uniform"):
            raise SchemeError(f"Unknown strategy {name!r}; use one of {', '.join(STRATEGY_MODULES)} "
                              "(uniform:<format> for one format).")
        if arg:
            from ..formats.registry import get_format

            get_format(arg)
    if len(set(names)) != len(names):
        raise SchemeError(f"Strategies repeat in {text!r}; list each once.")
    return names


@dataclass(frozen=True)
class StrategyName:
    """A strategy as asked: its registered base name and its argument (``uniform:fp8`` -> uniform, fp8)."""

    base: str
    argument: str = ""

    @classmethod
    def parse(cls, name: str) -> "StrategyName":
        base, _, argument = name.partition(":")
        return cls(base, argument)


def get_strategy(name: str):
    """The ``STRATEGY`` object of a registered strategy (its module imported on first use)."""
    base = StrategyName.parse(name).base
    if base not in STRATEGY_MODULES:
        raise SchemeError(f"Unknown strategy {name!r}; use one of {', '.join(STRATEGY_MODULES)}.")
    module = importlib.import_module(f"{__package__}.strategies.{STRATEGY_MODULES[base][0]}")
    return module.STRATEGY


def require_study_formats(formats) -> None:
    """A study switches every allocation in place on one searched model: formats that fold smoothing scales into
    the weights (AWQ, SmoothQuant) cannot be switched back, so they are refused up front, naming the fix."""
    from ..formats.registry import FORMATS

    folding = [f for f in formats if FORMATS[f].folds_weights]
    if folding:
        raise SchemeError(f"vlq study measures every allocation in place on one searched model; {', '.join(folding)} "
                          f"fold{'s' if len(folding) == 1 else ''} scales into the weights and cannot be switched back. Drop {', '.join(folding)} from "
                          "--formats (compare them with `vlq sweep`, which restores a fresh copy per target).")


def require_arguments_in(strategies, format_sets) -> None:
    """``uniform:<format>`` names a format of at least one format set."""
    for name in strategies:
        argument = StrategyName.parse(name).argument
        if argument and not any(argument in s for s in format_sets):
            raise SchemeError(f"{name}: {argument} is in none of the format sets {['+'.join(s) for s in format_sets]}; "
                              "add it to --formats or drop the strategy.")
