"""``study.md``: per format set, the frontiers (KLD at each target), the uniform points, the costs, the correlation
with the oracle, the regrets, the areas and the additivity, as Markdown tables."""

from __future__ import annotations

from tabulate import tabulate

import json
import os
from pathlib import Path

from .records import STUDY_JSON, STUDY_MD, FormatSetStudy, StudyResult


def _g(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}g}"


def _bytes(value: int | None, kind: str) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB ({kind})"


def strategy_order(study: FormatSetStudy) -> list[str]:
    """Per-target strategies in the order they were measured."""
    return list(dict.fromkeys(p.strategy for p in study.points if p.target_bits is not None))


def frontier_table(study: FormatSetStudy, targets) -> str:
    """Text KLD (achieved bits) per strategy and target; random shows its median [inter-quartile range]."""
    from .analysis import quartiles

    rows = []
    for strategy in strategy_order(study):
        row = [strategy]
        for target in targets:
            here = [p for p in study.points if p.strategy == strategy and p.target_bits == target]
            if not here:
                row.append("-")
            elif len(here) == 1:
                row.append(f"{_g(here[0].kld())} ({here[0].achieved_bits:.2f}b)")
            else:
                q1, median, q3 = quartiles([p.kld() for p in here])
                bits = quartiles([p.achieved_bits for p in here])[1]
                row.append(f"{_g(median)} [{_g(q1, 3)}, {_g(q3, 3)}] ({bits:.2f}b)")
        rows.append(row)
    return tabulate(rows, ["strategy", *(f"{t:g} bits: KLD (achieved)" for t in targets)], tablefmt="github")


def points_table(study: FormatSetStudy) -> str:
    """Every non-random point with its full fidelity (text and image+text)."""
    rows = []
    for p in study.points:
        if p.seed is not None:
            continue
        for m in p.fidelity:
            rows.append([p.strategy, "-" if p.target_bits is None else f"{p.target_bits:g}", f"{p.achieved_bits:.3f}",
                         m.data_kind, _g(m.kld_mean), _g(m.kld_median), _g(m.kld_p99),
                         f"{100 * m.same_top_rate:.2f} ± {100 * m.same_top_stderr:.2f} %", f"{m.ppl_ratio:.5f}"])
    return tabulate(rows, ["strategy", "target", "achieved bits", "data", "mean KLD", "median KLD", "p99 KLD", "same top",
                           "PPL ratio"], tablefmt="github")


def cost_table(study: FormatSetStudy) -> str:
    rows = [[c.strategy, f"{c.seconds:.2f}", _bytes(c.peak_bytes, c.memory), c.detail] for c in study.costs]
    return tabulate(rows, ["strategy", "scoring s", "peak memory", "how"], tablefmt="github")


def conclusions_tables(study: FormatSetStudy) -> list[str]:
    blocks = []
    if study.correlations:
        rows = [[c.scorer, c.pairs, f"{c.spearman:+.3f}", f"{c.shuffled:+.3f}", f"{c.shuffled_p95:+.3f}",
                 "yes" if c.spearman > c.shuffled_p95 else "no"] for c in study.correlations]
        blocks.append("Rank correlation with the oracle (ablation), over (group, quantized format) pairs:\n\n" + tabulate(
            rows, ["scorer", "pairs", "Spearman", "shuffled", "shuffled p95", "beyond chance"], tablefmt="github"))
    if study.regrets:
        strategies = strategy_order(study)
        rows = [[f"{t:g}", *(_g(r.get(s), 3) for s in strategies)] for t, r in sorted(study.regrets.items(), reverse=True)]
        blocks.append("Regret (KLD / the best strategy's KLD at that target; random: its median):\n\n"
                      + tabulate(rows, ["target", *strategies], tablefmt="github"))
    if study.areas:
        rows = [[s, _g(a)] for s, a in sorted(study.areas.items(), key=lambda kv: kv[1])]
        blocks.append("Area under each frontier (mean text KLD over the target range; lower is better):\n\n"
                      + tabulate(rows, ["strategy", "area"], tablefmt="github"))
    if study.additivity:
        rows = [[a.strategy, f"{a.target_bits:g}", _g(a.predicted), _g(a.measured), _g(a.ratio, 3)] for a in study.additivity]
        blocks.append("Additivity of the oracle (sum of the chosen groups' ablation KLDs vs the measured KLD):\n\n"
                      + tabulate(rows, ["strategy", "target", "sum of ablations", "measured", "measured / sum"],
                                 tablefmt="github"))
    return blocks


def study_markdown(result: StudyResult) -> str:
    parts = [f"# vlq study: {result.model_source}",
             f"Targets {', '.join(f'{t:g}' for t in result.targets)} bits; strategies {', '.join(result.strategies)}; "
             f"{result.random_seeds} random allocations per target; every point measured at point a on "
             f"{result.evaluation_rows} held-out rows per kind; the oracle scored on {result.scoring_rows} other held-out "
             f"text rows; {result.total_s:.1f} s in all."]
    for study in result.sets:
        parts += [f"## {study.label}", frontier_table(study, result.targets), points_table(study), cost_table(study),
                  *conclusions_tables(study)]
    return "\n\n".join(parts) + "\n"


def save_study(result: StudyResult, folder: str | os.PathLike) -> Path:
    """``study.json`` and ``study.md`` into ``folder`` (each written whole); the JSON's path."""
    from ..runtime.files import atomic_write_text

    folder = Path(folder)
    atomic_write_text(folder / STUDY_MD, study_markdown(result))
    return atomic_write_text(folder / STUDY_JSON, json.dumps(result.to_dict(), indent=2) + "\n")
