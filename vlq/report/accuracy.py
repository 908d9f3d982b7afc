"""Task accuracy (``vlq eval``) as tables and a plot: per task and measurement point, the BF16 score, the quantized
score and recovery = quantized / BF16, each with its standard error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..evaluation.results import TaskAccuracy

POINT_LABELS = {"fake_quant": "a fake-quantized", "checkpoint": "b checkpoint (dequantized)", "vllm": "c vLLM"}


def _pm(value: float, error: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f} ± {error:.{digits}f}" if not math.isnan(error) else f"{value:.{digits}f}"


def accuracy_table(results: Sequence[TaskAccuracy], *, with_model: bool = False) -> str:
    """One Markdown row per task, metric and point."""
    from tabulate import tabulate

    rows = []
    for a in results:
        row = [a.task, a.metric, POINT_LABELS.get(a.measurement_point, a.measurement_point), a.samples,
               _pm(a.base, a.base_stderr), _pm(a.quantized, a.quantized_stderr), _pm(a.recovery, a.recovery_stderr),
               "" if a.chance is None else f"{a.chance:.2f}"]
        rows.append(([a.model_source] if with_model else []) + row)
    headers = (["run"] if with_model else []) + ["task", "metric", "point", "samples", "BF16", "quantized", "recovery", "chance"]
    return tabulate(rows, headers=headers, tablefmt="github")


def accuracy_plot(named: Sequence[tuple[str, Sequence[TaskAccuracy]]], path: str | Path) -> Path:
    """Recovery with its error bar per run (x) and point (marker), one panel per task; the 0.95 line llm-compressor
    gates its examples on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({a.task for _, results in named for a in results})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4 + 2 * len(named), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for offset, point in enumerate(POINT_LABELS):
            xs, ys, es = [], [], []
            for i, (_, results) in enumerate(named):
                for a in results:
                    if a.task == task and a.measurement_point == point:
                        xs.append(i + 0.12 * (offset - 1))
                        ys.append(a.recovery)
                        es.append(a.recovery_stderr)
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=POINT_LABELS[point])
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(named)), [name for name, _ in named], rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(named) - 0.5)
        ax.set_title(task)
        ax.set_ylabel("recovery (quantized / BF16)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_sections(manifests: Sequence[str | Path], out: str | Path) -> list[str]:
    """`vlq report`'s task-accuracy section: one table over every manifest that records accuracy, and the
    recovery plot (empty when none does)."""
    from ..manifest.manifest import Manifest

    named = []
    for path in manifests:
        manifest = Manifest.load(path)
        if manifest.accuracy:
            named.append((f"{Path(path).parent.name or 'run'}: {manifest.scheme.id}", manifest.accuracy))
    if not named:
        return []
    rows = [a for _, results in named for a in results]
    table = accuracy_table([_with_run(a, name) for name, results in named for a in results], with_model=True)
    png = accuracy_plot(named, Path(out) / "accuracy.png")
    return [f"## Task accuracy (lm-eval; recovery = quantized / BF16 ± standard error; {len(rows)} rows)\n\n{table}\n\n"
            f"![recovery]({png.name})"]


def _with_run(result: TaskAccuracy, name: str) -> TaskAccuracy:
    import dataclasses

    return dataclasses.replace(result, model_source=name)
