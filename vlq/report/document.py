"""``vlq report``: one Markdown document (``README.md``) with the tables and PNG plots of saved benchmarks,
manifests, sweeps and comparisons.  Every input is read before anything is written: a bad file leaves no half
report."""

from __future__ import annotations

import json as _json
import os as _os
from pathlib import Path as _Path

from tabulate import tabulate

from ..manifest.manifest import Manifest
from ..runtime.errors import VlqError
from .benchmarks import REGRESSION_THRESHOLD, BenchRow, NotABenchmarkFile, benchmark_table, compare_runs, comparison_table, load_benchmarks
from .plots import achieved_bits, plot_before_after, plot_format_map, plot_memory, plot_pareto, plot_phases, plot_scaling
from .tables import fidelity_table, layer_table


def write_report(
    out_dir: str | _os.PathLike,
    *,
    benchmarks: list[str | _os.PathLike] = (),
    manifests: list[str | _os.PathLike] = (),
    sweeps: list[str | _os.PathLike] = (),
    baseline: str | _os.PathLike | None = None,
    comparisons: list[str | _os.PathLike] = (),
    studies: list[str | _os.PathLike] = (),
) -> _Path:
    """Write ``out_dir/README.md`` with tables and the PNG plots next to it. Returns the Markdown path.

    ``comparisons`` are ``comparison.json`` files of ``vlq compare-calibration`` / ``vlq compare-methods``:
    decision agreement beside each scheme's fidelity to BF16 (and the score scatter for calibrations).
    """
    from ..runtime.files import atomic_write_text

    runs = [_read_run(path) for path in benchmarks]
    base_rows = _read_baseline(baseline) if baseline is not None else None
    out = _Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# vlq report"]
    bench_sections, all_rows = _benchmark_sections(runs, out)
    sections += bench_sections
    if base_rows is not None and all_rows:
        sections.append(_baseline_section(runs, all_rows, base_rows, _Path(baseline), out))
    sections += [_manifest_section(path, out) for path in manifests]
    if manifests:
        from .accuracy import accuracy_sections

        sections += accuracy_sections(manifests, out)
    sections += [_sweep_section(path, out) for path in sweeps]
    sections += [_comparison_section(path, out) for path in comparisons]
    if studies:
        from .studies import study_sections

        sections += study_sections(studies, out)
    return atomic_write_text(out / "README.md", "\n\n".join(s for s in sections if s) + "\n")


def _load(path, flag: str):
    try:
        return load_benchmarks(path)
    except FileNotFoundError:
        raise VlqError(f"{flag} {path}: no such file; pass a pytest-benchmark JSON (--benchmark-save writes them under .benchmarks/).") from None
    except _json.JSONDecodeError as exc:
        raise VlqError(f"{flag} {path} is not JSON ({exc}); pass a pytest-benchmark JSON.") from None


def _read_run(path) -> tuple[_Path, dict | None, list[BenchRow] | str]:
    """(path, machine, rows); a JSON that is not a benchmark run gets (path, None, why) and a note in the report."""
    try:
        return (_Path(path), *_load(path, "--benchmarks"))
    except NotABenchmarkFile as exc:
        return _Path(path), None, str(exc)


def _read_baseline(path) -> list[BenchRow]:
    try:
        return _load(path, "--baseline")[1]
    except NotABenchmarkFile as exc:
        raise VlqError(f"--baseline {exc}; compare against a saved pytest-benchmark run.") from None


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def _benchmark_sections(runs, out: _Path) -> tuple[list[str], list[BenchRow]]:
    """Per benchmark file: its table, phase and memory plots; then the scaling plots over all of them."""
    sections: list[str] = []
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
    return sections, all_rows


def _baseline_section(runs, all_rows: list[BenchRow], base_rows: list[BenchRow], baseline: _Path, out: _Path) -> str:
    comparison = compare_runs(base_rows, all_rows)
    files = [p.name for p, machine, _ in runs if machine is not None]
    candidate = files[0] if len(files) == 1 else f"the {len(files)} benchmark files above"
    png = plot_before_after(comparison, out / f"before_after_{baseline.stem}.png", baseline=baseline.name, candidate=candidate)
    return (f"## Comparison with `{baseline.name}` (regression: > {REGRESSION_THRESHOLD:.0%} slower or larger)\n\n"
            + (comparison_table(comparison) + f"\n\n![before and after]({png.name})" if png else
               "_No benchmark appears in both runs: nothing to compare._"))


def _manifest_section(path, out: _Path) -> str:
    manifest = Manifest.load(path)
    stem = _Path(path).parent.name or "manifest"
    png = plot_format_map(manifest, out / f"format_map_{stem}.png")
    text = f"## Per-layer formats: {manifest.scheme.id}\n\n{layer_table(manifest)}\n\n![format map]({png.name})"
    if manifest.fidelity:
        text += f"\n\n### Fidelity to BF16: {manifest.scheme.id}\n\n{fidelity_table(manifest.fidelity)}"
    return text


def _sweep_section(path, out: _Path) -> str:
    sweep = _json.loads(_Path(path).read_text())
    png = plot_pareto(sweep, out / f"pareto_{_Path(path).parent.name or 'sweep'}.png")
    table = tabulate([[p["target_bits"], f"{achieved_bits(p):.3f}", f"{p['total_score']:.4g}", p["format_counts"],
                       f"{p['resolve_s']:.2f}", f"{p['export_s']:.2f}", p["verified"]] for p in sweep["points"]],
                     headers=["target", "achieved", "score", "formats", "re-solve s", "export+verify s", "verified"], tablefmt="github")
    return (f"## Sweep: search {sweep['search_s']:.1f}s, all decisions {sweep['decisions_s']:.1f}s, "
            f"with exports {sweep['total_s']:.1f}s\n\n{table}\n\n![pareto]({png.name})")


def _comparison_section(path, out: _Path) -> str:
    from ..fidelity.comparison import CalibrationComparison, load_comparison

    comparison = load_comparison(path)
    plot = None
    if isinstance(comparison, CalibrationComparison):
        plot = comparison.plot(out / f"comparison_{_Path(path).parent.name or 'calibration'}.png").name
    text = comparison.markdown(plot_path=plot) if plot else comparison.markdown()
    return ("## Comparison: " + text.removeprefix("## ")).rstrip()
