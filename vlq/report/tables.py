"""Stage 8 — human-readable tables of what was decided and what was checked."""

from __future__ import annotations

import json as _json
import os as _os
import re
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path as _Path

from tabulate import tabulate

from ..checks.check import Check, checks_table
from ..fidelity.metrics import SUMMARY_HEADERS, FidelityMetrics
from ..manifest.manifest import Manifest
from ..formats.registry import NO_QUANT, color_of
from ..serve.checks import LM_HEAD_NAMES, LM_LINEAR_RE, VISION_PREFIX
from ..serve.results import ServedLayer

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.(.+)$")


def layer_rows(manifest: Manifest) -> list[list[str]]:
    """One row per decoder layer: the format chosen for each decision group in it."""
    columns: list[str] = []
    rows: dict[int, dict[str, str]] = {}
    for group in manifest.groups:
        match = _LAYER_RE.search(group.members[0])
        if not match:
            continue
        layer = int(match.group(1))
        label = "+".join(m.rsplit(".", 1)[1] for m in group.members)
        if label not in columns:
            columns.append(label)
        rows.setdefault(layer, {})[label] = group.chosen
    return [["layer", *columns]] + [[str(i), *(rows[i].get(c, "-") for c in columns)] for i in sorted(rows)]


def layer_table(manifest: Manifest, fmt: str = "github") -> str:
    rows = layer_rows(manifest)
    return tabulate(rows[1:], headers=rows[0], tablefmt=fmt)


def summary_table(manifest: Manifest, checks: Sequence[Check], fmt: str = "github") -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(manifest.format_counts().items()))
    head = tabulate(
        [
            ["scheme", manifest.scheme.id],
            ["LM effective bits", f"{manifest.achieved_bits:.3f} (target {manifest.scheme.target_bits:g})"],
            ["decision groups", f"{len(manifest.groups)} ({counts})"],
            ["total sensitivity score", f"{manifest.total_score:.6g}"],
        ],
        tablefmt=fmt,
    )
    return head + "\n\n" + checks_table(checks, fmt)


def served_layer_table(layers: Sequence[ServedLayer], expected: dict[str, str] | None = None, fmt: str = "github") -> str:
    """vLLM's per-layer view: every vision linear, LM linear and lm_head with its quant method and dtype."""
    rows = []
    for layer in layers:
        lm = LM_LINEAR_RE.match(layer.name)
        if not (layer.name.startswith(VISION_PREFIX) or lm or layer.name in LM_HEAD_NAMES):
            continue
        want = (expected or {}).get(layer.name, NO_QUANT if not lm else "?")
        rows.append([layer.name, layer.layer_cls, layer.quant_method, layer.weight_dtype or "-", want])
    return tabulate(rows, headers=["layer (vLLM)", "class", "quant method", "weight dtype", "expected"], tablefmt=fmt)


def fidelity_table(metrics: Sequence[FidelityMetrics], fmt: str = "github") -> str:
    """llama.cpp-style fidelity to BF16: one row per data kind and measurement point."""
    return tabulate([m.summary_row() for m in metrics], headers=list(SUMMARY_HEADERS), tablefmt=fmt)


def sweep_table(points: Sequence, fmt: str = "github") -> str:
    """One row per effective-bits target of a sweep (SweepPoint objects): proxy score and measured fidelity."""
    def kld(p, kind):
        m = p.fidelity(kind)
        return "-" if m is None else f"{m.kld_mean:.4g}"

    def top(p):
        m = p.fidelity("text")
        return "-" if m is None else f"{100 * m.same_top_rate:.1f}%"

    rows = [[p.target_bits, f"{p.achieved_bits:.3f}", f"{p.total_score:.4g}", kld(p, "text"), kld(p, "image_text"), top(p),
             p.manifest.format_counts(), f"{p.resolve_s:.2f}", "-" if p.export_path is None else f"{p.export_s:.2f}",
             "-" if p.export_path is None else ("PASS" if p.verified else "FAIL")] for p in points]
    return tabulate(rows, headers=["target bits", "achieved", "proxy score", "KLD text", "KLD image+text", "same top (text)",
                                   "formats", "re-solve s", "export+verify s", "verified"], tablefmt=fmt)


# ------------------------------------------------------------------------------------------------
# Reports from saved results: benchmark JSON (pytest-benchmark), manifests, sweeps
# ------------------------------------------------------------------------------------------------

SCALING_KNOBS = ("num_score_steps", "seq_len", "batch_size", "num_formats")
REGRESSION_THRESHOLD = 0.10  # a run more than 10% slower / larger than the baseline is flagged

#: What a benchmark's one measured action is (its ``extra_info["measures"]``, set by
#: ``benchmarks/conftest.py``'s ``record_benchmark``) -> the heading of its time column.
MEASURED_ACTIONS = {
    "search": "search s",
    "fidelity": "fidelity measurement s",
    "sweep": "sweep s",
    "search grid": "search grid s",
    "search and fidelity": "search + fidelity s",
    "task accuracy": "lm-eval s",
}
#: Runs saved before benchmarks said what they measure, whose keys do not tell either.
UNKNOWN_ACTION = "benchmark"

#: A search's phases in the order they run: (BenchRow attribute, label, colour).
PHASES = (
    ("extension_build_s", "CUDA extension build/load", "#9c755f"),
    ("calibrate_s", "calibrate", "#4e79a7"),
    ("score_s", "score", "#f28e2b"),
    ("solve_s", "solve", "#59a14f"),
)


def measured_action(extra: dict) -> str:
    """``extra["measures"]``; for runs saved before that key, read from the keys they recorded."""
    if "measures" in extra:
        return str(extra["measures"])
    if "decisions_s" in extra:
        return "sweep"
    if "kld_mean" in extra and "rows" in extra:
        return "fidelity"
    if "grid" in extra:
        return "search grid"
    if "settings" in extra:  # the recommended-settings study; its reference search measured fidelity since kl_ratio_goal
        return "search and fidelity" if "kl_ratio_goal" in extra else "search"
    if "calibrate_s" in extra or "search_s" in extra:
        return "search"
    return UNKNOWN_ACTION


def _float(value) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class BenchRow:
    """One saved benchmark: its measured time (pytest-benchmark's mean), what that time measures, a
    search's phases where recorded (``None`` where not), peak memory and bits."""

    name: str
    variant: str
    seconds: float
    calibrate_s: float | None
    score_s: float | None
    solve_s: float | None
    peak_rss_gib: float | None
    peak_gpu_gib: float | None
    achieved_bits: float | None
    settings: dict
    measures: str = UNKNOWN_ACTION
    extension_build_s: float | None = None

    def knob(self, knob: str):
        if knob == "num_formats":
            return len(str(self.settings.get("formats", "")).split("+"))
        return self.settings.get(knob)

    @property
    def short_name(self) -> str:
        """The parametrized id (``fp8+nvfp4-6b-gradient-extract``), else the test's name."""
        return self.name.split("[")[-1].rstrip("]")

    @property
    def time_heading(self) -> str:
        return MEASURED_ACTIONS.get(self.measures, "measured s")

    @property
    def has_phases(self) -> bool:
        return any(getattr(self, attr) is not None for attr, _, _ in PHASES[1:])

    @property
    def peak_gib(self) -> float | None:
        """The peak a comparison holds against: GPU where recorded, else host RSS."""
        return self.peak_gpu_gib if self.peak_gpu_gib is not None else self.peak_rss_gib


class NotABenchmarkFile(ValueError):
    """A JSON file that is not a pytest-benchmark save (no ``benchmarks`` list)."""


def load_benchmarks(path: str | _os.PathLike) -> tuple[dict, list[BenchRow]]:
    """Rows of one pytest-benchmark JSON file, with the machine info it was saved with."""
    data = _json.loads(_Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise NotABenchmarkFile(f"{path} is not a pytest-benchmark save (no \"benchmarks\" list)")
    rows = []
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        gpu = extra.get("peak_gpu_gib", extra.get("peak_gib"))  # the family benchmarks name their GPU peak peak_gib
        rows.append(BenchRow(
            name=bench["name"], variant=extra.get("variant", bench["name"]), seconds=float(bench["stats"]["mean"]),
            calibrate_s=_float(extra.get("calibrate_s")), score_s=_float(extra.get("score_s")), solve_s=_float(extra.get("solve_s")),
            peak_rss_gib=_float(extra.get("peak_rss_gib")), peak_gpu_gib=_float(gpu),
            achieved_bits=_float(extra.get("achieved_bits", extra.get("effective_bits"))), settings=extra,
            measures=measured_action(extra), extension_build_s=_float(extra.get("extension_build_s")),
        ))
    return data.get("machine_info", {}), rows


def _by_action(rows: Sequence[BenchRow]) -> dict[str, list[BenchRow]]:
    groups: dict[str, list[BenchRow]] = {}
    for row in rows:
        groups.setdefault(row.measures, []).append(row)
    return groups


def benchmark_table(rows: list[BenchRow], fmt: str = "github") -> str:
    """One table per measured action, its time column named by it (a fidelity measurement's time is not a
    search time); phase columns only where some row recorded them."""
    def f(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    tables = []
    groups = _by_action(rows)
    for action, group in groups.items():
        phases = [(attr, label) for attr, label, _ in PHASES
                  if any(getattr(r, attr) is not None for r in group) and (attr != "extension_build_s" or any(r.has_phases for r in group))]
        body = [[r.short_name, f(r.seconds, 1), *(f(getattr(r, attr), 1) for attr, _ in phases),
                 f(r.peak_rss_gib), f(r.peak_gpu_gib), f(r.achieved_bits, 3)] for r in group]
        headers = ["benchmark", group[0].time_heading, *(f"{label} s" for _, label in phases), "peak RSS GiB", "peak GPU GiB", "LM bits"]
        table = tabulate(body, headers=headers, tablefmt=fmt)
        tables.append(table if len(groups) == 1 else f"Measured action: **{action}**\n\n{table}")
    return "\n\n".join(tables)


@dataclass(frozen=True)
class RunComparison:
    """One benchmark in a baseline and a candidate run: time and peak memory before and after."""

    name: str
    measures: str
    base_s: float
    new_s: float
    time_ratio: float
    base_gib: float | None
    new_gib: float | None
    memory_ratio: float | None
    regressed: bool

    @property
    def short_name(self) -> str:
        return self.name.split("[")[-1].rstrip("]")


def compare_runs(baseline: list[BenchRow], candidate: list[BenchRow], threshold: float = REGRESSION_THRESHOLD) -> list[RunComparison]:
    """Per benchmark in both runs: baseline vs candidate time and memory, and whether it regressed."""
    base = {r.name: r for r in baseline}
    out = []
    for row in candidate:
        old = base.get(row.name)
        if old is None:
            continue
        time_ratio = row.seconds / old.seconds if old.seconds else float("inf")
        mem_old, mem_new = old.peak_gib, row.peak_gib
        mem_ratio = (mem_new / mem_old) if mem_old and mem_new is not None else None
        regressed = time_ratio > 1 + threshold or (mem_ratio is not None and mem_ratio > 1 + threshold)
        out.append(RunComparison(row.name, row.measures, old.seconds, row.seconds, time_ratio, mem_old, mem_new, mem_ratio, regressed))
    return out


def comparison_table(comparison: Sequence[RunComparison], fmt: str = "github") -> str:
    rows = []
    for c in comparison:
        rows.append([c.short_name, c.measures, f"{c.base_s:.2f}", f"{c.new_s:.2f}", f"{c.time_ratio:.2f}x",
                     "-" if c.base_gib is None else f"{c.base_gib:.2f}", "-" if c.new_gib is None else f"{c.new_gib:.2f}",
                     "-" if c.memory_ratio is None else f"{c.memory_ratio:.2f}x", "**REGRESSION**" if c.regressed else "ok"])
    return tabulate(rows, headers=["benchmark", "measures", "base s", "new s", "time", "base GiB", "new GiB", "memory", "verdict"],
                    tablefmt=fmt)


def _achieved(point: dict) -> float:
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
    points = sorted((_achieved(p), p["total_score"], p["target_bits"], _measured_kld(p)) for p in sweep["points"])
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


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def _measured_kld(point: dict) -> float | None:
    for m in point.get("fidelity", ()):
        if m.get("data_kind") == "text" and m.get("measurement_point") == "fake_quant":
            return float(m["kld_mean"])
    return None


def write_report(
    out_dir: str | _os.PathLike,
    *,
    benchmarks: list[str | _os.PathLike] = (),
    manifests: list[str | _os.PathLike] = (),
    sweeps: list[str | _os.PathLike] = (),
    baseline: str | _os.PathLike | None = None,
    comparisons: list[str | _os.PathLike] = (),
) -> _Path:
    """Write ``out_dir/README.md`` with tables and the PNG plots next to it. Returns the Markdown path.

    ``comparisons`` are ``comparison.json`` files of ``vlq compare-calibration`` / ``vlq compare-methods``:
    decision agreement beside each scheme's fidelity to BF16 (and the score scatter for calibrations).
    """
    from ..runtime.errors import VlqError
    from ..runtime.files import atomic_write_text
    from .accuracy import accuracy_sections

    def read(path, flag):
        """Every benchmark file is read before anything is written: a bad one leaves no half report."""
        try:
            return load_benchmarks(path)
        except FileNotFoundError:
            raise VlqError(f"{flag} {path}: no such file; pass a pytest-benchmark JSON (--benchmark-save writes them under .benchmarks/).") from None
        except _json.JSONDecodeError as exc:
            raise VlqError(f"{flag} {path} is not JSON ({exc}); pass a pytest-benchmark JSON.") from None

    runs = []
    for path in benchmarks:
        try:
            runs.append((_Path(path), *read(path, "--benchmarks")))
        except NotABenchmarkFile as exc:
            runs.append((_Path(path), None, str(exc)))
    base_rows = None
    if baseline is not None:
        try:
            _, base_rows = read(baseline, "--baseline")
        except NotABenchmarkFile as exc:
            raise VlqError(f"--baseline {exc}; compare against a saved pytest-benchmark run.") from None

    out = _Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# vlq report"]
    all_rows: list[BenchRow] = []
    stems: set[str] = set()
    for path, machine, rows in runs:
        if machine is None:
            sections.append(f"## Benchmarks: `{path.name}`\n\n_{rows}: nothing to tabulate or draw._")
            continue
        all_rows += rows
        stem = _unique(path.stem, stems)
        gpu = machine.get("gpu") or "CPU"
        sections.append(f"## Benchmarks: `{path.name}` ({gpu}, {machine.get('versions', {})})\n\n" + benchmark_table(rows))
        png = plot_phases(rows, out / f"phases_{stem}.png", f"search time by phase: {path.name}")
        sections.append(f"### Search time by phase: `{path.name}`\n\n" + (
            f"![search phases]({png.name})" if png else
            "_No phase plot: no benchmark in this file recorded a search's phase times (calibrate_s / score_s / solve_s)._"))
        png = plot_memory(rows, out / f"memory_{stem}.png", f"peak memory: {path.name}")
        sections.append(f"### Peak memory: `{path.name}`\n\n" + (
            f"![peak memory]({png.name})" if png else
            "_No memory plot: no benchmark in this file recorded peak RSS or GPU memory._"))
    for png in plot_scaling(all_rows, out):
        sections.append(f"### Scaling: {png.stem.removeprefix('scaling_')}\n\n![{png.stem}]({png.name})")
    if base_rows is not None and all_rows:
        comparison = compare_runs(base_rows, all_rows)
        files = [p.name for p, machine, _ in runs if machine is not None]
        candidate = files[0] if len(files) == 1 else f"the {len(files)} benchmark files above"
        png = plot_before_after(comparison, out / f"before_after_{_Path(baseline).stem}.png", baseline=_Path(baseline).name,
                                candidate=candidate)
        sections.append(f"## Comparison with `{_Path(baseline).name}` (regression: > {REGRESSION_THRESHOLD:.0%} slower or larger)\n\n"
                        + (comparison_table(comparison) + f"\n\n![before and after]({png.name})" if png else
                           "_No benchmark appears in both runs: nothing to compare._"))
    for path in manifests:
        manifest = Manifest.load(path)
        stem = _Path(path).parent.name or "manifest"
        png = plot_format_map(manifest, out / f"format_map_{stem}.png")
        sections.append(f"## Per-layer formats: {manifest.scheme.id}\n\n{layer_table(manifest)}\n\n![format map]({png.name})")
        if manifest.fidelity:
            sections.append(f"### Fidelity to BF16: {manifest.scheme.id}\n\n{fidelity_table(manifest.fidelity)}")
    sections += accuracy_sections(manifests, out)
    for path in sweeps:
        sweep = _json.loads(_Path(path).read_text())
        png = plot_pareto(sweep, out / f"pareto_{_Path(path).parent.name or 'sweep'}.png")
        table = tabulate([[p["target_bits"], f"{_achieved(p):.3f}", f"{p['total_score']:.4g}", p["format_counts"],
                           f"{p['resolve_s']:.2f}", f"{p['export_s']:.2f}", p["verified"]] for p in sweep["points"]],
                         headers=["target", "achieved", "score", "formats", "re-solve s", "export+verify s", "verified"], tablefmt="github")
        sections.append(f"## Sweep: search {sweep['search_s']:.1f}s, all decisions {sweep['decisions_s']:.1f}s, "
                        f"with exports {sweep['total_s']:.1f}s\n\n{table}\n\n![pareto]({png.name})")
    for path in comparisons:
        from ..fidelity.comparison import CalibrationComparison, load_comparison

        comparison = load_comparison(path)
        plot = None
        if isinstance(comparison, CalibrationComparison):
            plot = comparison.plot(out / f"comparison_{_Path(path).parent.name or 'calibration'}.png").name
        text = comparison.markdown(plot_path=plot) if plot else comparison.markdown()
        sections.append(("## Comparison: " + text.removeprefix("## ")).rstrip())
    return atomic_write_text(out / "README.md", "\n\n".join(sections) + "\n")
