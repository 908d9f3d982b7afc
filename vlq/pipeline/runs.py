"""Whole runs: ``vlq run`` (calibrate, reference, search, point a, export, point b, vLLM and point c) and ``vlq
fidelity`` (measurement points again on a finished run folder)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..checks.registry import run_stage
from ..runtime.errors import (
    CheckpointError, SchemeError, SearchStateError, ServingError,
)
from ..export.export import unify_fused_scales
from ..fidelity.metrics import FidelityMetrics, logits_forward
from ..fidelity.reference import capture_reference
from ..inputs.requests import POINT_NAMES, DataRequest, RunFolder
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import writing
from ..search.scheme import Scheme
from ..search.search import plan_lm_formats
from .results import RunOutcome, MeasuredRun
from .measure import fidelity_references, measure_fake_quant, measure_checkpoint, measure_served, record_fidelity
from .stages import calibrate, search, export, exported_at, serve_check, restore, saved_data_request


def serving_skip_reason(scheme: Scheme) -> str | None:
    """Why ``vlq run`` cannot check this scheme's export in vLLM here (None when it can)."""
    from ..runtime.capabilities import vllm_platform

    verdict = scheme.vllm_servability()
    if not verdict.servable:
        return verdict.reason
    if vllm_platform() is None:
        return "vLLM is not installed here (scripts/install.sh installs the CPU build)"
    return None


def run(
    loaded: LoadedVLM,
    scheme: Scheme,
    data: DataRequest,
    folder: RunFolder,
    *,
    overwrite: bool = False,
    serve: bool = True,
    rows: int | None = None,
    progress: Progress = SILENT,
) -> RunOutcome:
    """calibrate → BF16 reference → search → fidelity (a) → export → fidelity from disk (b) → vLLM checks
    and fidelity (c) on ``loaded``, which is quantized in place.  ``rows``: held-out rows per data kind
    (default :data:`FIDELITY_ROWS_FULL_SIZE` / ``_TINY``).

    Search state, manifest (with its fidelity block) and checkpoint are committed together when the run
    ends: a run that stops before leaves the folder's previous files as they were (with --overwrite,
    the previous run stays whole until the new one is complete).
    """
    plan_lm_formats(loaded, scheme)  # a format that fits no layer, or an unreachable target: refused before any work
    with writing(folder) as staged:
        outcome = _run_staged(loaded, scheme, data, folder, overwrite=overwrite, serve=serve, rows=rows, progress=progress)
    if staged.joined:
        return outcome
    served = outcome.served and dataclasses.replace(outcome.served, checkpoint=folder.checkpoint)
    progress.stage(f"run folder {folder.root}: search state, manifest and checkpoint committed together")
    return dataclasses.replace(outcome, exported=exported_at(outcome.exported, folder.checkpoint), served=served)


def _run_staged(loaded: LoadedVLM, scheme: Scheme, data: DataRequest, folder: RunFolder, *, overwrite: bool, serve: bool,
                rows: int | None, progress: Progress) -> RunOutcome:
    calibration = calibrate(loaded, scheme, data, progress=progress)
    references = fidelity_references(loaded, scheme, data, calibration=calibration, rows=rows, progress=progress)
    searched = search(loaded, scheme, calibration, run=folder, progress=progress)
    # point a is measured as it will be exported: fused q/k/v and gate/up share one scale (vLLM needs it)
    unify_fused_scales(loaded.language_model)
    fake_quant = measure_fake_quant(loaded, references, progress=progress)
    searched = record_fidelity(searched, fake_quant, folder)
    text = next(i for i, r in enumerate(references) if r.data_kind == "text")
    # a's own logits on held-out text, kept to check the checkpoint against (the export packs the live weights)
    fake_quant_logits = capture_reference(logits_forward(loaded.vlm), references[text].batches,
                                          data_source=references[text].data_source, data_kind="text")
    exported = export(searched, folder, overwrite=overwrite, progress=progress)
    searched = record_fidelity(searched, measure_checkpoint(exported.path, references, progress=progress), folder)
    agreement = run_stage("fidelity", manifest=searched.manifest, fake_quant=fake_quant_logits, checkpoint=exported.path,
                          bf16_to_fake_quant=fake_quant[text])
    exported = dataclasses.replace(exported, checks=exported.checks + agreement)
    skipped = serving_skip_reason(scheme) if serve else "--no-serve"
    served = None
    if skipped is None:
        served = serve_check(exported.path, manifest=searched.manifest, references=references, progress=progress)
        if served.fidelity:
            searched = record_fidelity(searched, served.fidelity, folder)
    return RunOutcome(folder, searched, exported, served, skipped or "")


def measure_run(
    folder: RunFolder,
    loaded: LoadedVLM,
    points: Sequence[str] = ("checkpoint",),
    data: DataRequest | None = None,
    *,
    rows: int | None = None,
    progress: Progress = SILENT,
) -> MeasuredRun:
    """Measure a finished run folder again at the asked measurement points, against ``loaded`` (the BF16
    model the run searched, not yet quantized), and record the results in its manifest.

    * ``fake_quant`` (a): restores the saved search on ``loaded`` (no scoring; ``loaded`` ends up
      quantized), unifies fused scales as ``vlq run`` does before its own point a, measures;
    * ``checkpoint`` (b): the exported checkpoint re-read by the independent dequantizer;
    * ``vllm`` (c): vLLM's prompt log-probabilities of the checkpoint (held-out text only).

    The held-out data is what ``vlq run`` measured on (``data`` defaults to the calibration the
    manifest names), so an untouched run folder measures the numbers its manifest already holds.
    """
    asked = []
    for point in points:
        if point not in POINT_NAMES:
            raise SchemeError(f"Unknown measurement point {point!r}; use fake, checkpoint or served.")
        if POINT_NAMES[point] not in asked:
            asked.append(POINT_NAMES[point])
    if not asked:
        raise SchemeError("Name at least one measurement point: fake, checkpoint or served.")
    saved = Manifest.load(folder.manifest)
    if {"checkpoint", "vllm"} & set(asked) and not (folder.checkpoint / "config.json").exists():
        raise CheckpointError(f"{folder.root} has no exported checkpoint ({RunFolder.CHECKPOINT}/config.json); "
                              f"run `vlq export {folder.root}` first, or measure --point fake.")
    if "fake_quant" in asked and not folder.search_state.exists():
        raise SearchStateError(f"{folder.root} has no {RunFolder.SEARCH_STATE} to restore the fake-quantized model from; "
                               "measure --point checkpoint instead.")
    if "vllm" in asked:
        from ..serve.environment import default_device
        from ..serve.resolution import preflight

        pre = preflight(folder.checkpoint)
        if default_device() not in pre.runnable_on:
            raise ServingError(f"vLLM on {default_device()} has no kernels for {', '.join(pre.algos)}, so it cannot serve "
                               f"{folder.checkpoint} to measure point c; measure --point checkpoint instead.")
    data = data if data is not None else saved_data_request(saved)
    calibration = calibrate(loaded, saved.scheme, data, progress=progress)
    kinds = ("text",) if asked == ["vllm"] else ("text", "image_text")  # vLLM measures held-out text only
    references = fidelity_references(loaded, saved.scheme, data, calibration=calibration, kinds=kinds, rows=rows, progress=progress)
    measured: list[FidelityMetrics] = []
    with writing(folder) as staged:
        for point in asked:
            if point == "fake_quant":
                restore(folder, loaded, calibration=calibration, progress=progress)
                unify_fused_scales(loaded.language_model)  # as `vlq run` measures point a: fused scales as exported
                measured += measure_fake_quant(loaded, references, progress=progress)
            elif point == "checkpoint":
                measured += measure_checkpoint(folder.checkpoint, references, progress=progress)
            else:
                measured += measure_served(folder.checkpoint, references, progress=progress)
        current = staged.manifest if staged.manifest.exists() else folder.manifest  # restore may have rewritten it
        manifest = Manifest.load(current).with_fidelity(*measured)
        manifest.save(staged.manifest)
    progress.stage(f"fidelity recorded in {folder.manifest}")
    return MeasuredRun(folder, manifest, tuple(measured))
