"""What a study concludes, computed from its records (plain Python, no torch).

* :func:`spearman` - rank correlation of a scorer's (group, format) scores with the oracle's, beside
  :func:`shuffled_control` (the same scores in a seeded random order: what chance gives);
* :func:`regrets` - per target, each strategy's KLD over the best strategy's KLD at that target;
* :func:`frontier_area` - the area under a frontier over the targets, divided by their span (its mean KLD over the
  target range: comparable between strategies because every strategy is solved at the same targets);
* :func:`additive_prediction` - the sum of the chosen groups' oracle KLDs, held against the measured KLD of the
  allocation (how far a per-layer model of the loss can be trusted).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Mapping, Sequence

from ..formats.registry import NO_QUANT

#: Random orders the shuffled control draws; its threshold is the 95th percentile of their correlations.
SHUFFLES = 200


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2  # ties share their average rank
        i = j + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"a correlation needs two sequences of the same length >= 2, got {len(xs)} and {len(ys)}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties averaged); 0 when either side is constant."""
    return pearson(_ranks(xs), _ranks(ys))


def shuffled_control(xs: Sequence[float], ys: Sequence[float], *, seed: int = 0, shuffles: int = SHUFFLES) -> tuple[float, float]:
    """``xs`` shuffled against ``ys``: the correlation of one seeded shuffle, and the 95th percentile over ``shuffles``."""
    rng = random.Random(seed)
    values = []
    for _ in range(shuffles):
        shuffled = list(xs)
        rng.shuffle(shuffled)
        values.append(spearman(shuffled, ys))
    ordered = sorted(values)
    return values[0], ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def paired_scores(scorer: Mapping[str, Mapping[str, float]], oracle: Mapping[str, Mapping[str, float]]
                  ) -> tuple[list[float], list[float]]:
    """The (group, quantized format) pairs both score, in one order: the scorer's and the oracle's values."""
    xs, ys = [], []
    for group in sorted(set(scorer) & set(oracle)):
        for fmt in sorted(set(scorer[group]) & set(oracle[group]) - {NO_QUANT}):
            xs.append(float(scorer[group][fmt]))
            ys.append(float(oracle[group][fmt]))
    return xs, ys


def regrets(kld_at: Mapping[str, Mapping[float, float]]) -> dict[float, dict[str, float | None]]:
    """Per target, each strategy's KLD over the lowest KLD any strategy reached there (None: the best is 0 and
    this one is not)."""
    targets = sorted({t for series in kld_at.values() for t in series}, reverse=True)
    out: dict[float, dict[str, float | None]] = {}
    for target in targets:
        here = {s: series[target] for s, series in kld_at.items() if target in series}
        best = min(here.values())
        out[target] = {s: (v / best if best > 0 else (1.0 if v == 0 else None)) for s, v in here.items()}
    return out


def frontier_area(series: Mapping[float, float]) -> float:
    """Trapezoidal area under KLD over the targets, divided by their span (one target: its KLD)."""
    points = sorted(series.items())
    if len(points) == 1:
        return points[0][1]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def additive_prediction(choices: Mapping[str, str], oracle: Mapping[str, Mapping[str, float]]) -> float:
    """The sum of the oracle's KLD for each group's chosen format (``none`` adds 0)."""
    return sum(oracle[g][f] for g, f in choices.items() if f != NO_QUANT)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linearly interpolated."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quartiles of nothing")

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return at(0.25), at(0.5), at(0.75)
