"""Saved benchmark runs (pytest-benchmark JSON): read into typed rows, tabulated, and compared with a baseline
(regressions flagged)."""

from __future__ import annotations

import json as _json
import os as _os
from dataclasses import dataclass
from pathlib import Path as _Path
from typing import Sequence

from tabulate import tabulate


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
    "ablation scores": "ablation scores s",
    "study": "study s",
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
