"""Score once, solve many: an effective-bits sweep that calibrates and scores a single time.

One full search saves ModelOpt's search state (calibration + scores).  Each target is then

* *decided* by re-solving the saved scores (:func:`vlq.search.resolve_decisions`, seconds), and
* optionally *exported*: a fresh copy of the model restores the saved state through
  ``auto_quantize(checkpoint=...)`` (no calibration, no scoring), the restored decisions must equal
  the re-solved ones, and the checkpoint is exported and verified like any other.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .calibration import CalibrationSet
from .errors import ManifestMismatch, SchemeError
from .manifest import Manifest, ManifestGroup
from .models import LoadedVLM
from .schemes import Scheme
from .search import SearchResult, groups_within, lm_effective_bits, resolve_decisions, search_lm_only

SWEEP_VERSION = 1
STATE_FILE = "search_state.pth"


@dataclass(frozen=True)
class SweepPoint:
    target_bits: float
    manifest: Manifest
    resolve_s: float
    export_path: Path | None = None
    export_s: float = 0.0  # restore + export + on-disk verification
    verified: bool = False

    @property
    def effective_bits(self) -> float:
        return self.manifest.effective_bits

    @property
    def total_score(self) -> float:
        return self.manifest.total_score


@dataclass(frozen=True)
class SweepResult:
    scheme: Scheme  # the scheme of the one full search (its target is the first point's)
    points: tuple[SweepPoint, ...]
    search_s: float
    model_source: str

    @property
    def decisions_s(self) -> float:
        """Time to decide every target: the one search plus the re-solves."""
        return self.search_s + sum(p.resolve_s for p in self.points[1:])

    @property
    def total_s(self) -> float:
        return self.decisions_s + sum(p.export_s for p in self.points)

    def to_dict(self) -> dict:
        return {
            "vlq_sweep_version": SWEEP_VERSION,
            "scheme": self.scheme.to_dict(),
            "model_source": self.model_source,
            "search_s": self.search_s,
            "decisions_s": self.decisions_s,
            "total_s": self.total_s,
            "points": [
                {
                    "target_bits": p.target_bits,
                    "effective_bits": p.effective_bits,
                    "total_score": p.total_score,
                    "format_counts": p.manifest.format_counts(),
                    "resolve_s": p.resolve_s,
                    "export_s": p.export_s,
                    "export_path": str(p.export_path) if p.export_path else None,
                    "verified": p.verified,
                }
                for p in self.points
            ],
        }

    def save(self, path: str | os.PathLike) -> Path:
        from .export import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def manifest_for_target(base: Manifest, result: SearchResult, target_bits: float) -> Manifest:
    """The manifest a search at ``target_bits`` would write, from ``result``'s saved scores."""
    decided = resolve_decisions(result.modelopt_state, target_bits, name_prefix=base.strategy_prefix)
    lm = groups_within(decided, result.loaded.lm_path)
    groups = [ManifestGroup.from_decision(d) for d in lm]
    manifest = base.with_groups(groups, effective_bits=lm_effective_bits(lm))
    return dataclasses.replace(manifest, scheme=base.scheme.with_(effective_bits=float(target_bits)))


def sweep_targets(
    pristine: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    targets: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    export: bool = True,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Search once at ``targets[0]``, then decide (and export) every target from the saved state.

    ``pristine`` is never modified: every search and export works on a deep copy.
    """
    from .export import export_checkpoint

    say = progress or (lambda _msg: None)
    targets = [float(t) for t in targets]
    if not targets:
        raise SchemeError("A sweep needs at least one effective-bits target.")
    if len(set(targets)) != len(targets):
        raise SchemeError(f"Sweep targets repeat: {targets}.")
    for t in targets:
        scheme.with_(effective_bits=t)  # validates each target (range, feasibility) before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    if state_path.exists() and not overwrite:
        raise SchemeError(f"{state_path} exists; pass overwrite=True to start a new sweep there.")
    state_path.unlink(missing_ok=True)

    first = scheme.with_(effective_bits=targets[0])
    loaded = copy.deepcopy(pristine)
    start = time.perf_counter()
    result = search_lm_only(loaded, first, calibration, checkpoint=state_path, progress=say)
    search_s = time.perf_counter() - start
    base = Manifest.from_search(result)

    points: list[SweepPoint] = []
    for index, target in enumerate(targets):
        t0 = time.perf_counter()
        manifest = base if index == 0 else manifest_for_target(base, result, target)
        resolve_s = 0.0 if index == 0 else time.perf_counter() - t0
        say(f"sweep {target:g} bits: {manifest.effective_bits:.3f} achieved, score {manifest.total_score:.4g}")
        path, export_s, verified = None, 0.0, False
        if export:
            t1 = time.perf_counter()
            target_dir = out / f"{target:g}b"
            if index == 0:
                target_loaded = loaded
            else:
                target_loaded = copy.deepcopy(pristine)
                restored = search_lm_only(target_loaded, first.with_(effective_bits=target), calibration, checkpoint=state_path)
                restored_manifest = Manifest.from_search(restored)
                if restored_manifest.groups != manifest.groups:
                    raise ManifestMismatch(
                        f"Restoring the saved search for {target:g} bits decided differently from the re-solve; "
                        "the search state and the solver disagree."
                    )
            manifest.verify(model=target_loaded.vlm).require()
            exported = export_checkpoint(target_loaded, target_dir / "checkpoint", overwrite=overwrite)
            manifest.verify(checkpoint=exported.path).require()
            manifest.save(target_dir / "manifest.json")
            path, verified = exported.path, True
            export_s = time.perf_counter() - t1
            if target_loaded is not loaded:
                del target_loaded
                gc.collect()
        else:
            manifest.save(out / f"{target:g}b" / "manifest.json")
        points.append(SweepPoint(target, manifest, resolve_s, path, export_s, verified))
    sweep = SweepResult(first, tuple(points), search_s, pristine.source)
    sweep.save(out / "sweep.json")
    return sweep


def decision_agreement(a: Manifest, b: Manifest) -> float:
    """Fraction of decision groups (matched by name) with the same chosen format."""
    mine = {g.name: g.chosen for g in a.groups}
    theirs = {g.name: g.chosen for g in b.groups}
    if set(mine) != set(theirs):
        raise ManifestMismatch("The two manifests decide different groups; they are not of the same model.")
    if not mine:
        return 1.0
    return sum(mine[k] == theirs[k] for k in mine) / len(mine)
