"""``vlq report --studies``: a study's three plots and its tables.

* frontiers: measured text KLD against achieved bits, one line per (format set, strategy), the random allocations'
  inter-quartile band shaded around their median, uniform-format points marked;
* proxy vs oracle: each scorer's (group, format) scores against the ablation oracle's, with its Spearman;
* cost: each strategy's scoring time (and peak memory) per format set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..study.analysis import paired_scores, quartiles
from ..study.records import StudyResult, load_study
from ..study.tables import conclusions_tables, cost_table, frontier_table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Written whole: readers never see half a PNG."""
    from ..runtime.files import atomic_write

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True)
    return path


#: Strategies drawn dashed: the references an informed strategy should beat.
_REFERENCE_STYLE = {"inverted": ":", "position": "--", "weight_error": "-."}


def plot_frontiers(result: StudyResult, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    several = len(result.sets) > 1
    for study in result.sets:
        prefix = f"{study.label} " if several else ""
        strategies = dict.fromkeys(p.strategy for p in study.points if p.target_bits is not None)
        for strategy in strategies:
            mine = [p for p in study.points if p.strategy == strategy]
            if strategy == "random":
                rows = []
                for target in sorted({p.target_bits for p in mine}):
                    here = [p for p in mine if p.target_bits == target]
                    q1, median, q3 = quartiles([p.kld() for p in here])
                    rows.append((quartiles([p.achieved_bits for p in here])[1], q1, median, q3))
                xs = [r[0] for r in rows]
                line, = ax.plot(xs, [r[2] for r in rows], "o-", color="grey", label=f"{prefix}random (median, IQR)")
                ax.fill_between(xs, [r[1] for r in rows], [r[3] for r in rows], color=line.get_color(), alpha=0.2)
                continue
            mine.sort(key=lambda p: p.achieved_bits)
            ax.plot([p.achieved_bits for p in mine], [p.kld() for p in mine], marker="o", markersize=4,
                    linestyle=_REFERENCE_STYLE.get(strategy, "-"), label=f"{prefix}{strategy}")
        for p in (p for p in study.points if p.target_bits is None):
            ax.plot([p.achieved_bits], [p.kld()], marker="*", markersize=12, linestyle="none", label=f"{prefix}{p.strategy}")
    ax.set_yscale("log")
    ax.set_xlabel("achieved LM effective bits")
    ax.set_ylabel("mean KLD to BF16 (held-out text)")
    ax.set_title(f"measured frontiers: {result.model_source}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_proxy_vs_oracle(result: StudyResult, path: Path) -> Path | None:
    panels = [(s, c) for s in result.sets for c in s.correlations]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (study, correlation) in zip(axes[0], panels):
        xs, ys = paired_scores(study.scores[correlation.scorer], study.scores["ablation"])
        ax.scatter(ys, xs, s=12)
        ax.set_xscale("log") if min(ys) > 0 else None
        ax.set_yscale("log") if min(xs) > 0 else None
        ax.set_xlabel("oracle: ablation KLD", fontsize=8)
        ax.set_ylabel(f"{correlation.scorer} score", fontsize=8)
        ax.set_title(f"{study.label}: Spearman {correlation.spearman:+.2f} (shuffled {correlation.shuffled:+.2f})", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_costs(result: StudyResult, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels, seconds = [], []
    for study in result.sets:
        for cost in study.costs:
            labels.append(f"{study.label}: {cost.strategy}" if len(result.sets) > 1 else cost.strategy)
            seconds.append(cost.seconds)
    bars = ax.bar(range(len(labels)), seconds)
    for bar, cost in zip(bars, [c for s in result.sets for c in s.costs]):
        if cost.peak_bytes:
            ax.annotate(f"{cost.peak_bytes / 2**30:.1f} GiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("scoring seconds")
    ax.set_title("cost per strategy (peak memory above each bar)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def study_sections(paths: Sequence[str | os.PathLike], out: Path) -> list[str]:
    """The Markdown sections (and PNGs in ``out``) for each saved study."""
    sections = []
    import json

    from ..runtime.errors import VlqError

    results = []
    for path in paths:  # every study is read before anything is drawn: a bad one leaves no half report
        try:
            results.append(load_study(path))
        except FileNotFoundError:
            raise VlqError(f"--studies {path}: no such file; pass a folder written by `vlq study` or its study.json.") from None
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise VlqError(f"--studies {path} is not a vlq study ({exc}); pass a folder written by `vlq study`.") from None
    for index, (path, result) in enumerate(zip(paths, results)):
        stem = Path(path).name if Path(path).is_dir() else Path(path).parent.name or f"study{index}"
        front = plot_frontiers(result, out / f"study_frontiers_{stem}.png")
        scatter = plot_proxy_vs_oracle(result, out / f"study_proxy_vs_oracle_{stem}.png")
        cost = plot_costs(result, out / f"study_cost_{stem}.png")
        parts = [f"## Study: {result.model_source} ({stem})", f"![frontiers]({front.name})"]
        for study in result.sets:
            parts += [f"### {study.label}", frontier_table(study, result.targets), cost_table(study),
                      *conclusions_tables(study)]
        parts += [f"![proxy vs oracle]({scatter.name})" if scatter else "_No oracle in this study: no scatter._",
                  f"![cost per strategy]({cost.name})"]
        sections.append("\n\n".join(parts))
    return sections
