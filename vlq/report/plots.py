"""The report's PNG plots: search phases, peak memory, scaling knobs, before/after a baseline, per-layer format
maps, sweep frontiers.  matplotlib is imported on first use (Agg backend), written atomically."""

from __future__ import annotations

from pathlib import Path as _Path
from typing import Sequence

from ..formats.registry import color_of
from ..manifest.manifest import Manifest
from .benchmarks import PHASES, REGRESSION_THRESHOLD, SCALING_KNOBS, BenchRow, RunComparison
from .tables import layer_rows


def achieved_bits(point: dict) -> float:
    """Achieved bits of a saved sweep point (files before scheme version 2 call it effective_bits)."""
    return float(point.get("achieved_bits", point.get("effective_bits")))


def _save_png(fig, path: _Path) -> None:
    """Write a figure atomically: readers never see half a PNG."""
    from ..runtime.files import atomic_write

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), binary=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(rows: list[BenchRow], out_dir: _Path) -> list[_Path]:
    """Time and memory against each scaling knob (rows that vary only that knob)."""
    plt = _plt()
    written = []
    for knob in SCALING_KNOBS:
        points = sorted({(r.knob(knob), r.seconds, r.peak_gpu_gib if r.peak_gpu_gib is not None else r.peak_rss_gib)
                         for r in rows if r.knob(knob) is not None and f"scale-{knob}" in r.name})
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(1, 2, figsize=(8, 3))
        ax[0].plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax[0].set_xlabel(knob), ax[0].set_ylabel("search time (s)")
        ax[1].plot([p[0] for p in points], [p[2] for p in points], "o-", color="tab:red")
        ax[1].set_xlabel(knob), ax[1].set_ylabel("peak memory (GiB)")
        fig.tight_layout()
        path = out_dir / f"scaling_{knob}.png"
        _save_png(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def _labels(rows) -> list[str]:
    """Benchmark ids, with what each measures when the rows measure different things."""
    mixed = len({r.measures for r in rows}) > 1
    return [f"{r.short_name} [{r.measures}]" if mixed else r.short_name for r in rows]


REST_OF_MEASURED_TIME = "rest of the measured time (guards, manifest checks)"


def plot_phases(rows: Sequence[BenchRow], path: _Path, title: str) -> _Path | None:
    """Each search's measured time as stacked phases (extension build, calibrate, score, solve, the rest).
    ``None`` (nothing drawn) when no row recorded phase times."""
    searches = [r for r in rows if r.has_phases]
    if not searches:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.4 * len(searches)))
    y = list(range(len(searches)))
    left = [0.0] * len(searches)
    for attr, label, color in PHASES:
        values = [getattr(r, attr) or 0.0 for r in searches]
        if any(values):
            ax.barh(y, values, left=left, color=color, label=label, height=0.6)
            left = [a + b for a, b in zip(left, values)]
    rest = [max(0.0, r.seconds - done) for r, done in zip(searches, left)]
    if any(x > 0.01 * r.seconds for x, r in zip(rest, searches)):
        ax.barh(y, rest, left=left, color="#d9d9d9", label=REST_OF_MEASURED_TIME, height=0.6)
    longest = max(max(r.seconds, done) for r, done in zip(searches, left))
    for i, r in enumerate(searches):
        ax.annotate(f"{r.seconds:.1f} s", (max(r.seconds, left[i]), i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.set_xlim(0, longest * 1.15)
    ax.set_yticks(y, _labels(searches), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.45 / (1.6 + 0.4 * len(searches)), 1, 1))
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_memory(rows: Sequence[BenchRow], path: _Path, title: str) -> _Path | None:
    """Peak host RSS and peak GPU memory per benchmark; ``None`` when no row recorded either."""
    shown = [r for r in rows if r.peak_rss_gib is not None or r.peak_gpu_gib is not None]
    if not shown:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 1.3 + 0.45 * len(shown)))
    y = list(range(len(shown)))
    series = [(attr, label, color) for attr, label, color in (("peak_rss_gib", "peak RSS (host)", "#76b7b2"),
                                                              ("peak_gpu_gib", "peak GPU (max allocated)", "#e15759"))
              if any(getattr(r, attr) is not None for r in shown)]
    height = 0.8 / len(series)
    for k, (attr, label, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * height
        values = [getattr(r, attr) for r in shown]
        if values:
            ax.barh([i + offset for i in y], [v or 0.0 for v in values], height=height, color=color, label=label)
            for i, v in enumerate(values):
                if v is not None:
                    ax.annotate(f"{v:.2f}", (v, i + offset), xytext=(3, 0), textcoords="offset points", va="center", fontsize=6)
    largest = max(v for r in shown for v in (r.peak_rss_gib, r.peak_gpu_gib) if v is not None)
    ax.set_xlim(0, largest * 1.15 or 1)
    ax.set_yticks(y, _labels(shown), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("peak memory (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_before_after(comparison: Sequence[RunComparison], path: _Path, *, baseline: str, candidate: str) -> _Path | None:
    """Measured time and peak memory of each benchmark in the baseline and the new run, regressions in red;
    ``None`` when the runs share no benchmark."""
    if not comparison:
        return None
    plt = _plt()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(11, 1.5 + 0.45 * len(comparison)), sharey=True)
    y = list(range(len(comparison)))
    new_colors = ["#e15759" if c.regressed else "#4e79a7" for c in comparison]
    panels = (("base_s", "new_s", "time_ratio", "measured time (s)"),
              ("base_gib", "new_gib", "memory_ratio", "peak memory (GiB; GPU where recorded, else RSS)"))
    for ax, (old, new, ratio, label) in zip(axes, panels):
        ax.barh([i - 0.2 for i in y], [getattr(c, old) or 0.0 for c in comparison], height=0.4, color="#bab0ac")
        ax.barh([i + 0.2 for i in y], [getattr(c, new) or 0.0 for c in comparison], height=0.4, color=new_colors)
        for i, c in enumerate(comparison):
            if getattr(c, ratio) is not None:
                ax.annotate(f"{getattr(c, ratio):.2f}x", (getattr(c, new) or 0.0, i + 0.2), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=6)
        ax.set_xlim(0, 1.15 * max([getattr(c, k) or 0.0 for c in comparison for k in (old, new)] + [1e-9]))
        ax.set_xlabel(label, fontsize=8)
    labels = [f"{c.short_name} [{c.measures}]" + ("  REGRESSION" if c.regressed else "") for c in comparison]
    axes[0].set_yticks(y, labels, fontsize=7)
    for tick, c in zip(axes[0].get_yticklabels(), comparison):
        tick.set_color("#c0392b" if c.regressed else "black")
    axes[0].invert_yaxis()
    fig.legend(handles=[Patch(color="#bab0ac", label=f"before: {baseline}"), Patch(color="#4e79a7", label=f"after: {candidate}"),
                        Patch(color="#e15759", label=f"after, > {REGRESSION_THRESHOLD:.0%} slower or larger (regression)")],
               fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"before / after, against {baseline}", fontsize=9)
    fig.tight_layout(rect=(0, 0.9 / (1.5 + 0.45 * len(comparison)) / 1.5, 1, 1))
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_format_map(manifest: Manifest, path: _Path) -> _Path:
    """Layer index x decision group, colored by the chosen format."""
    plt = _plt()
    from matplotlib.patches import Patch

    rows = layer_rows(manifest)
    columns, body = rows[0][1:], rows[1:]
    formats = sorted({c for r in body for c in r[1:]})
    index = {f: i for i, f in enumerate(formats)}
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([color_of(f) for f in formats])
    grid = [[index[c] for c in r[1:]] for r in body]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 1 + 0.22 * len(body)))
    ax.imshow(grid, cmap=cmap, aspect="auto", vmin=-0.5, vmax=len(formats) - 0.5, interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns, rotation=20, fontsize=7)
    ax.set_yticks(range(len(body)), [r[0] for r in body], fontsize=6)
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{manifest.scheme.id}: {manifest.achieved_bits:.2f} LM bits", fontsize=8)
    ax.legend(handles=[Patch(color=color_of(f), label=f) for f in formats], fontsize=7,
              bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_pareto(sweep: dict, path: _Path) -> _Path:
    """Achieved bits against ModelOpt's proxy score and, beside it, against measured KLD to BF16."""
    plt = _plt()
    points = sorted((achieved_bits(p), p["total_score"], p["target_bits"], measured_kld(p)) for p in sweep["points"])
    measured = [p for p in points if p[3] is not None]
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(9 if measured else 5, 3.2), squeeze=False)
    panels = [(axes[0][0], 1, "proxy: total sensitivity score")]
    if measured:
        panels.append((axes[0][1], 3, "measured: mean KLD to BF16 (held-out text)"))
    for ax, column, label in panels:
        shown = points if column == 1 else measured
        ax.plot([p[0] for p in shown], [p[column] for p in shown], "o-")
        for p in shown:
            ax.annotate(f"{p[2]:g}", (p[0], p[column]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("achieved LM effective bits"), ax.set_ylabel(label, fontsize=8)
    fig.suptitle("score once, solve many: " + "+".join(sweep["scheme"]["formats"]), fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def measured_kld(point: dict) -> float | None:
    for m in point.get("fidelity", ()):
        if m.get("data_kind") == "text" and m.get("measurement_point") == "fake_quant":
            return float(m["kld_mean"])
    return None
