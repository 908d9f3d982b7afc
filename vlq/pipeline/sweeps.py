"""Score once, solve many: one search, every effective-bits target decided from its saved scores (``vlq sweep``)."""

from __future__ import annotations

import time
from typing import Sequence

from ..data.calibration import (
    CalibrationSet,
)
from ..runtime.errors import (
    ManifestMismatch, SchemeError, SearchStateError,
)
from ..inputs.requests import DataRequest, RunFolder
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import Staged, writing
from ..search.scheme import Scheme
from ..search.search import apply_decisions
from ..search.search import plan_lm_formats
from ..fidelity.quantized_weights import HostOriginals
from ..manifest.sweep import SweepPoint, SweepResult, manifest_for_target
from .results import Searched
from .measure import fidelity_references, measure_fake_quant
from .stages import guarded_search, export, fresh_copy, release_model


def sweep(
    pristine: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    targets: Sequence[float],
    folder: RunFolder,
    *,
    export_targets: Sequence[float] | bool = True,
    measure: bool = True,
    rows: int | None = None,
    data: DataRequest = DataRequest(),
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> SweepResult:
    """Score once, solve many: one search at ``targets[0]``, every target decided from its saved scores.

    With ``measure`` every target's fidelity to BF16 is measured on held-out text and image+text (``rows``
    per kind, default :data:`FIDELITY_ROWS_FULL_SIZE` / ``_TINY``; every target on the same rows):
    in place on the searched model (:func:`vlq.search.search.apply_decisions`, seconds) or — for AWQ /
    SmoothQuant schemes, which fold scales into the weights — on a fresh copy that restores the saved
    state.  Targets in ``export_targets`` (``True``: all) are exported from such a restored copy (no
    calibration, no scoring); restored decisions must equal the re-solve.  ``pristine`` is never modified.
    """
    targets = [float(t) for t in targets]
    if not targets:
        raise SchemeError("A sweep needs at least one effective-bits target.")
    if len(set(targets)) != len(targets):
        raise SchemeError(f"Sweep targets repeat: {targets}.")
    for t in targets:
        scheme.with_(target_bits=t)  # validates each target (range, feasibility) before any work
    exported_set = set(targets) if export_targets is True else {float(t) for t in (export_targets or ())}
    unknown = sorted(exported_set - set(targets))
    if unknown:
        raise SchemeError(f"Export targets {unknown} are not among the sweep targets {targets}.")
    for t in targets:
        plan_lm_formats(pristine, scheme.with_(target_bits=t))  # shape limits: refused before any work
    with writing(folder) as staged:
        result = _sweep_staged(pristine, scheme, calibration, targets, folder, staged, exported_set=exported_set,
                               measure=measure, rows=rows, data=data, overwrite=overwrite, progress=progress)
    progress.stage(f"sweep written to {folder.sweep}")
    return result


def _sweep_staged(pristine: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, targets: list[float], folder: RunFolder,
                  staged: Staged, *, exported_set: set[float], measure: bool, rows: int | None, data: DataRequest, overwrite: bool,
                  progress: Progress) -> SweepResult:
    from ..search.state import sidecar_path

    for state in (folder.search_state, staged.search_state):
        if state.exists() and not overwrite:
            raise SearchStateError(f"{state} exists; pass --overwrite to start a new sweep there.")
    for state in (staged.search_state, sidecar_path(staged.search_state)):
        state.unlink(missing_ok=True)  # a new sweep scores afresh (the committed state stays until it commits)
    first = scheme.with_(target_bits=targets[0])
    t0 = time.perf_counter()
    references = (fidelity_references(pristine, first, data, calibration=calibration, rows=rows, progress=progress)
                  if measure else ())
    reference_s = time.perf_counter() - t0
    loaded = fresh_copy(pristine)
    start = time.perf_counter()
    base = guarded_search(loaded, first, calibration, state=staged.search_state, progress=progress)
    staged.search_state_written()
    search_s = time.perf_counter() - start
    in_place = not any(f.folds_weights for f in first.format_objects)

    def restored(target: float) -> Searched:
        # restores the saved calibration and scores from folder.search_state: nothing is re-scored
        searched = guarded_search(fresh_copy(pristine), first.with_(target_bits=target), calibration, state=staged.search_state,
                           progress=progress)
        if searched.manifest.groups != manifest_at[target].groups:
            raise ManifestMismatch(f"Restoring the saved search for {target:g} bits decided differently from the re-solve; "
                                   "the search state and the solver disagree.")
        return searched

    # 1) decide every target, and measure it before any export changes the model (fused-scale unification)
    manifest_at: dict[float, Manifest] = {}
    resolve_s: dict[float, float] = {}
    measure_s: dict[float, float] = {}
    originals = HostOriginals() if in_place else None  # the searched model's weights, copied out once
    for index, target in enumerate(targets):
        t0 = time.perf_counter()
        manifest = base.manifest if index == 0 else manifest_for_target(base.manifest, base.result, target)
        resolve_s[target] = 0.0 if index == 0 else time.perf_counter() - t0
        manifest_at[target] = manifest
        if references:
            t1 = time.perf_counter()
            if index == 0 or in_place:
                if index:
                    apply_decisions(base.result, manifest.groups)
                metrics = measure_fake_quant(base.loaded, references, originals=originals)
            else:
                copy_ = restored(target)
                metrics = measure_fake_quant(copy_.loaded, references)
                release_model(copy_.loaded)
            manifest_at[target] = manifest.with_fidelity(*metrics)
            measure_s[target] = time.perf_counter() - t1
        text = next((m for m in manifest_at[target].fidelity if m.data_kind == "text"), None)
        progress.stage(f"sweep {target:g} bits: {manifest.achieved_bits:.3f} achieved, score {manifest.total_score:.4g}"
                       + (f", mean KLD {text.kld_mean:.4g} on held-out text" if text else ""))
    if references and in_place and len(targets) > 1:
        apply_decisions(base.result, base.result.groups)  # back to the searched target before exporting it
    del originals  # page-locked host memory the size of the language model's linears

    # 2) export what was asked
    points: list[SweepPoint] = []
    for index, target in enumerate(targets):
        sub = folder.target(target)
        path, export_s, verified = None, 0.0, False
        if target in exported_set:
            t1 = time.perf_counter()
            searched = base if index == 0 else restored(target)
            exported = export(searched, sub, overwrite=overwrite, progress=progress)
            path, verified = sub.checkpoint, all(c.ok for c in exported.checks)  # where it is once committed
            export_s = time.perf_counter() - t1
            if searched is not base:
                release_model(searched.loaded)
        manifest_at[target].save(staged.target(target).manifest)
        points.append(SweepPoint(target, manifest_at[target], resolve_s[target], path, export_s, verified,
                                 measure_s.get(target, 0.0)))
    result = SweepResult(first, tuple(points), search_s, pristine.source, reference_s,
                         references[0].rows if references else 0)
    result.save(staged.sweep)
    return result
