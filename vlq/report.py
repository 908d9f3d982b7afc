"""Stage 8 — human-readable tables of what was decided and what was checked."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tabulate import tabulate

from .manifest import Manifest

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class CheckLine:
    check: str
    ok: bool
    detail: str


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


def summary_table(manifest: Manifest, checks: list[CheckLine], fmt: str = "github") -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(manifest.format_counts().items()))
    head = tabulate(
        [
            ["scheme", manifest.scheme.id],
            ["LM effective bits", f"{manifest.effective_bits:.3f} (target {manifest.scheme.effective_bits:g})"],
            ["decision groups", f"{len(manifest.groups)} ({counts})"],
            ["total sensitivity score", f"{manifest.total_score:.6g}"],
        ],
        tablefmt=fmt,
    )
    body = tabulate([[c.check, "PASS" if c.ok else "FAIL", c.detail] for c in checks], headers=["check", "result", "detail"], tablefmt=fmt)
    return head + "\n\n" + body
