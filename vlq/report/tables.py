"""Stage 8 — human-readable tables of what was decided and what was checked."""

from __future__ import annotations

import re
from typing import Sequence

from tabulate import tabulate

from ..checks.check import Check, checks_table
from ..fidelity.metrics import SUMMARY_HEADERS, FidelityMetrics
from ..manifest.manifest import Manifest
from ..formats.registry import NO_QUANT
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
