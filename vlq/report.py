"""Stage 8 — human-readable tables of what was decided and what was checked."""

from __future__ import annotations

import json as _json
import os as _os
import re
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path as _Path

from tabulate import tabulate

from .checks import Check, checks_table
from .fidelity import SUMMARY_HEADERS, FidelityMetrics
from .manifest import Manifest
from .schemes import NO_QUANT
from .serving import LM_HEAD_NAMES, LM_LINEAR_RE, VISION_PREFIX
from .vllm_runner import ServedLayer

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


@dataclass(frozen=True)
class BenchRow:
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

    def knob(self, knob: str):
        if knob == "num_formats":
            return len(str(self.settings.get("formats", "")).split("+"))
        return self.settings.get(knob)


def load_benchmarks(path: str | _os.PathLike) -> tuple[dict, list[BenchRow]]:
    """Rows of one pytest-benchmark JSON file, with the machine info it was saved with."""
    data = _json.loads(_Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        rows.append(BenchRow(
            name=bench["name"], variant=extra.get("variant", bench["name"]), seconds=float(bench["stats"]["mean"]),
            calibrate_s=extra.get("calibrate_s"), score_s=extra.get("score_s"), solve_s=extra.get("solve_s"),
            peak_rss_gib=extra.get("peak_rss_gib"), peak_gpu_gib=extra.get("peak_gpu_gib"),
            achieved_bits=extra.get("achieved_bits", extra.get("effective_bits")), settings=extra,
        ))
    return data.get("machine_info", {}), rows


def benchmark_table(rows: list[BenchRow], fmt: str = "github") -> str:
    def f(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    return tabulate(
        [[r.name.split("[")[-1].rstrip("]"), f(r.seconds, 1), f(r.calibrate_s, 1), f(r.score_s, 1), f(r.solve_s, 1),
          f(r.peak_rss_gib), f(r.peak_gpu_gib), f(r.achieved_bits, 3)] for r in rows],
        headers=["benchmark", "search s", "calibrate s", "score s", "solve s", "peak RSS GiB", "peak GPU GiB", "LM bits"],
        tablefmt=fmt,
    )


def compare_runs(baseline: list[BenchRow], candidate: list[BenchRow], threshold: float = REGRESSION_THRESHOLD):
    """Per benchmark: baseline vs candidate time and memory, and whether it regressed."""
    base = {r.name: r for r in baseline}
    out = []
    for row in candidate:
        old = base.get(row.name)
        if old is None:
            continue
        time_ratio = row.seconds / old.seconds if old.seconds else float("inf")
        mem_old = old.peak_gpu_gib if old.peak_gpu_gib is not None else old.peak_rss_gib
        mem_new = row.peak_gpu_gib if row.peak_gpu_gib is not None else row.peak_rss_gib
        mem_ratio = (mem_new / mem_old) if mem_old and mem_new is not None else None
        regressed = time_ratio > 1 + threshold or (mem_ratio is not None and mem_ratio > 1 + threshold)
        out.append((row.name, old.seconds, row.seconds, time_ratio, mem_old, mem_new, mem_ratio, regressed))
    return out


def comparison_table(comparison, fmt: str = "github") -> str:
    rows = []
    for name, t_old, t_new, tr, m_old, m_new, mr, regressed in comparison:
        mark = "**REGRESSION**" if regressed else "ok"
        rows.append([name.split("[")[-1].rstrip("]"), f"{t_old:.2f}", f"{t_new:.2f}", f"{tr:.2f}x",
                     "-" if m_old is None else f"{m_old:.2f}", "-" if m_new is None else f"{m_new:.2f}",
                     "-" if mr is None else f"{mr:.2f}x", mark])
    return tabulate(rows, headers=["benchmark", "base s", "new s", "time", "base GiB", "new GiB", "memory", "verdict"], tablefmt=fmt)


def _achieved(point: dict) -> float:
    """Achieved bits of a saved sweep point (files before scheme version 2 call it effective_bits)."""
    return float(point.get("achieved_bits", point.get("effective_bits")))


def _save_png(fig, path: _Path) -> None:
    """Write a figure atomically: readers never see half a PNG."""
    from .files import atomic_write

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


FORMAT_COLORS = {"none": "#d9d9d9", "fp8": "#4e79a7", "int4_awq": "#e15759", "w4a8_awq": "#f28e2b", "int8_sq": "#76b7b2",
                 "nvfp4": "#59a14f", "w4a16_nvfp4": "#edc948", "mxfp8": "#b07aa1"}


def plot_format_map(manifest: Manifest, path: _Path) -> _Path:
    """Layer index x decision group, colored by the chosen format."""
    plt = _plt()
    from matplotlib.patches import Patch

    rows = layer_rows(manifest)
    columns, body = rows[0][1:], rows[1:]
    formats = sorted({c for r in body for c in r[1:]})
    index = {f: i for i, f in enumerate(formats)}
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([FORMAT_COLORS.get(f, "#000000") for f in formats])
    grid = [[index[c] for c in r[1:]] for r in body]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 1 + 0.22 * len(body)))
    ax.imshow(grid, cmap=cmap, aspect="auto", vmin=-0.5, vmax=len(formats) - 0.5, interpolation="nearest")
    ax.set_xticks(range(len(columns)), columns, rotation=20, fontsize=7)
    ax.set_yticks(range(len(body)), [r[0] for r in body], fontsize=6)
    ax.set_ylabel("decoder layer")
    ax.set_title(f"{manifest.scheme.id}: {manifest.achieved_bits:.2f} LM bits", fontsize=8)
    ax.legend(handles=[Patch(color=FORMAT_COLORS.get(f, "#000"), label=f) for f in formats], fontsize=7,
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
    from .files import atomic_write_text

    out = _Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# vlq report"]
    all_rows: list[BenchRow] = []
    for path in benchmarks:
        machine, rows = load_benchmarks(path)
        all_rows += rows
        gpu = machine.get("gpu") or "CPU"
        sections.append(f"## Benchmarks: `{_Path(path).name}` ({gpu}, {machine.get('versions', {})})\n\n" + benchmark_table(rows))
    for png in plot_scaling(all_rows, out):
        sections.append(f"### Scaling: {png.stem.removeprefix('scaling_')}\n\n![{png.stem}]({png.name})")
    if baseline is not None and benchmarks:
        _, base_rows = load_benchmarks(baseline)
        comparison = compare_runs(base_rows, all_rows)
        sections.append(f"## Comparison with `{_Path(baseline).name}` (regression: > {REGRESSION_THRESHOLD:.0%} slower or larger)\n\n"
                        + comparison_table(comparison))
    for path in manifests:
        manifest = Manifest.load(path)
        stem = _Path(path).parent.name or "manifest"
        png = plot_format_map(manifest, out / f"format_map_{stem}.png")
        sections.append(f"## Per-layer formats: {manifest.scheme.id}\n\n{layer_table(manifest)}\n\n![format map]({png.name})")
        if manifest.fidelity:
            sections.append(f"### Fidelity to BF16: {manifest.scheme.id}\n\n{fidelity_table(manifest.fidelity)}")
    for path in sweeps:
        sweep = _json.loads(_Path(path).read_text())
        png = plot_pareto(sweep, out / f"pareto_{_Path(path).parent.name or 'sweep'}.png")
        table = tabulate([[p["target_bits"], f"{_achieved(p):.3f}", f"{p['total_score']:.4g}", p["format_counts"],
                           f"{p['resolve_s']:.2f}", f"{p['export_s']:.2f}", p["verified"]] for p in sweep["points"]],
                         headers=["target", "achieved", "score", "formats", "re-solve s", "export+verify s", "verified"], tablefmt="github")
        sections.append(f"## Sweep: search {sweep['search_s']:.1f}s, all decisions {sweep['decisions_s']:.1f}s, "
                        f"with exports {sweep['total_s']:.1f}s\n\n{table}\n\n![pareto]({png.name})")
    for path in comparisons:
        from .compare import CalibrationComparison, load_comparison

        comparison = load_comparison(path)
        plot = None
        if isinstance(comparison, CalibrationComparison):
            plot = comparison.plot(out / f"comparison_{_Path(path).parent.name or 'calibration'}.png").name
        text = comparison.markdown(plot_path=plot) if plot else comparison.markdown()
        sections.append(("## Comparison: " + text.removeprefix("## ")).rstrip())
    return atomic_write_text(out / "README.md", "\n\n".join(sections) + "\n")
