"""Score once, solve many: an effective-bits sweep that calibrates and scores a single time.

One full search saves ModelOpt's search state (calibration + scores).  Each target is then

* *decided* by re-solving the saved scores (:func:`vlq.search.search.resolve_decisions`, seconds), and
* optionally *exported*: a fresh copy of the model restores the saved state through
  ``auto_quantize(checkpoint=...)`` (no calibration, no scoring), the restored decisions must equal
  the re-solved ones, and the checkpoint is exported and verified like any other.

This module holds the sweep's data and the re-solve; :func:`vlq.pipeline.sweep` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import ManifestMismatch
from .manifest import Manifest, ManifestGroup
from ..search.scheme import Scheme
from ..search.results import SearchResult
from ..search.decisions import groups_within, lm_achieved_bits, resolve_decisions

SWEEP_VERSION = 2  # 2: achieved_bits (was effective_bits), measured fidelity per target


@dataclass(frozen=True)
class SweepPoint:
    target_bits: float
    manifest: Manifest
    resolve_s: float
    export_path: Path | None = None
    export_s: float = 0.0  # restore + export + on-disk verification
    verified: bool = False
    measure_s: float = 0.0  # fidelity measurement (switch decisions or restore, then held-out forwards)

    @property
    def achieved_bits(self) -> float:
        return self.manifest.achieved_bits

    @property
    def total_score(self) -> float:
        return self.manifest.total_score

    def fidelity(self, data_kind: str = "text"):
        """The fake-quant fidelity measured for ``data_kind`` at this target, or None."""
        return next((m for m in self.manifest.fidelity if m.data_kind == data_kind and m.measurement_point == "fake_quant"), None)


@dataclass(frozen=True)
class SweepResult:
    scheme: Scheme  # the scheme of the one full search (its target is the first point's)
    points: tuple[SweepPoint, ...]
    search_s: float
    model_source: str
    reference_s: float = 0.0  # the BF16 reference logits every target is measured against (captured once)
    rows: int = 0  # held-out rows per data kind that each target is measured on (0: not measured)

    @property
    def decisions_s(self) -> float:
        """Time to decide every target: the one search plus the re-solves."""
        return self.search_s + sum(p.resolve_s for p in self.points[1:])

    @property
    def measured_s(self) -> float:
        """The BF16 reference, the one search, the re-solves and every target's fidelity measurement (no exports)."""
        return self.reference_s + self.decisions_s + sum(p.measure_s for p in self.points)

    @property
    def total_s(self) -> float:
        return self.measured_s + sum(p.export_s for p in self.points)

    def to_dict(self) -> dict:
        return {
            "vlq_sweep_version": SWEEP_VERSION,
            "scheme": self.scheme.to_dict(),
            "model_source": self.model_source,
            "search_s": self.search_s,
            "reference_s": self.reference_s,
            "fidelity_rows": self.rows,
            "decisions_s": self.decisions_s,
            "measured_s": self.measured_s,
            "total_s": self.total_s,
            "points": [
                {
                    "target_bits": p.target_bits,
                    "achieved_bits": p.achieved_bits,
                    "total_score": p.total_score,
                    "format_counts": p.manifest.format_counts(),
                    "resolve_s": p.resolve_s,
                    "export_s": p.export_s,
                    "export_path": str(p.export_path) if p.export_path else None,
                    "verified": p.verified,
                    "measure_s": p.measure_s,
                    "fidelity": [m.to_dict() for m in p.manifest.fidelity],
                }
                for p in self.points
            ],
        }

    def save(self, path: str | os.PathLike) -> Path:
        from ..runtime.files import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def manifest_for_target(base: Manifest, result: SearchResult, target_bits: float) -> Manifest:
    """The manifest a search at ``target_bits`` would write, from ``result``'s saved scores."""
    decided = resolve_decisions(result.modelopt_state, target_bits, name_prefix=base.strategy_prefix)
    lm = groups_within(decided, result.loaded.lm_path)
    groups = [ManifestGroup.from_decision(d) for d in lm]
    manifest = base.with_groups(groups, achieved_bits=lm_achieved_bits(lm))
    return dataclasses.replace(manifest, scheme=base.scheme.with_(target_bits=float(target_bits)))


def decision_agreement(a: Manifest, b: Manifest) -> float:
    """Fraction of decision groups (matched by name) with the same chosen format."""
    mine = {g.name: g.chosen for g in a.groups}
    theirs = {g.name: g.chosen for g in b.groups}
    if set(mine) != set(theirs):
        raise ManifestMismatch("The two manifests decide different groups; they are not of the same model.")
    if not mine:
        return 1.0
    return sum(mine[k] == theirs[k] for k in mine) / len(mine)
