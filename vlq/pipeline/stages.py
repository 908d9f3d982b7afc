"""The one entry that runs vlq's stages in order; the CLI, sweeps, comparisons, tests and benchmarks
all go through it, so a stage changes in one place.

    load_model ─► calibrate ─► search (+ guards, manifest verified) ─► export (+ on-disk checks)
               ─► serve_check (vLLM)                               ─► vlq.report.tables tables

Each stage takes typed inputs and returns a frozen result carrying the :class:`vlq.checks.check.Check`
objects it made.  A stage that cannot keep its guarantees raises that stage's
:class:`vlq.runtime.errors.VlqError`; a check that only reports (serving) is returned failed.  The run
folder's file names live in :class:`vlq.inputs.requests.RunFolder`.

Every stage that writes into a run folder writes through :func:`vlq.runtime.runlock.writing`: under the
folder's lock, into a staging folder, committed together when the stage ends — or, for a stage
inside a larger one (the search and export of :func:`run`, a sweep's targets), when that one ends.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from pathlib import Path
from typing import Sequence

from ..data.calibration import (
    CalibrationSet, image_text_calibration, images_option_from_source, shipped_text, synthetic_text_calibration,
    text_batches,
)
from ..checks.registry import run_stage
from ..runtime.errors import (
    CalibrationDataError, CheckpointError, ManifestMismatch, ModelSourceError, SchemeError, SearchStateError, ServingError, stage_boundary,
)
from ..export.export import add_fp8_kv_cache, export_checkpoint
from ..runtime.files import check_export_dir, kill_point
from ..fidelity.metrics import FidelityMetrics
from ..fidelity.reference import FidelityReference
from ..data.heldout import HELDOUT_PREFIX, HELDOUT_SEED_BASE
from ..inputs.requests import DataRequest, ModelRequest, RunFolder, describe_source
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM, load_vlm
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import writing
from ..search.scheme import Scheme
from ..search.forward import make_forward_step
from ..search.search import search_lm_only
from .results import Searched, Exported, Served
from .measure import text_path, served_engine_args, served_fidelity, record_fidelity

# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def load_model(request: ModelRequest, *, progress: Progress = SILENT) -> LoadedVLM:
    """Stage 1: the BF16 model on ``request.device`` (``auto`` resolved by the caller)."""
    where = request.device if not request.device_map else "+".join(dict.fromkeys(request.device_map.values()))
    progress.stage(f"loading {describe_source(request.source)} on {where}")
    with stage_boundary(f"loading {request.source}", ModelSourceError):
        return load_vlm(request.source, device=request.device, trust_remote_code=request.trust_remote_code,
                        device_map=request.device_map, offload_folder=request.offload_folder)


def calibrate(loaded: LoadedVLM, scheme: Scheme, data: DataRequest = DataRequest(), *, progress: Progress = SILENT) -> CalibrationSet:
    """Stage 2: as many batches as the scheme's calibration and scoring steps need.

    Image+text when ``data.images`` is set; else text from ``data.text`` (or the shipped corpus)
    through the model's tokenizer; a model without a tokenizer (random-weight shapes) gets seeded
    synthetic tokens below the vision markers.
    """
    with stage_boundary("calibration", CalibrationDataError):
        calibration = _calibration_batches(loaded, scheme, data)
    progress.stage(f"calibration: {calibration.num_samples} samples x {calibration.seq_len} tokens from {calibration.source}")
    return calibration


def _calibration_batches(loaded: LoadedVLM, scheme: Scheme, data: DataRequest) -> CalibrationSet:
    batches = max(scheme.num_calib_steps, scheme.num_score_steps)
    if data.images is not None:
        calibration = image_text_calibration(loaded, data.images, num_batches=batches, batch_size=scheme.batch_size,
                                             seq_len=scheme.seq_len, seed=data.seed)
    elif loaded.tokenizer is not None:
        calibration = text_batches(loaded.tokenizer, vocab_size=loaded.vocab_size, num_batches=batches,
                                   batch_size=scheme.batch_size, seq_len=scheme.seq_len, path=text_path(loaded, data))
    else:
        if data.text is not None:
            raise CalibrationDataError(f"{loaded.source} has no tokenizer, so the text in {data.text} cannot be tokenized; "
                                       "load a checkpoint folder with its tokenizer, or drop --data.")
        calibration = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=batches,
                                                 batch_size=scheme.batch_size, seq_len=scheme.seq_len, seed=data.seed)
    return calibration


def search(
    loaded: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    *,
    run: RunFolder | None = None,
    save_manifest: bool = True,
    progress: Progress = SILENT,
) -> Searched:
    """Stages 3–5: the LM-only search on ``loaded`` (quantized in place), its guards, its manifest.

    With ``run`` the search state is saved in the run folder — a search not yet committed resumes from
    its own pending state, else from the committed ``run.search_state`` (a new target re-solves its
    scores) — and, unless ``save_manifest`` is False, the manifest is written after every check holds;
    state and manifest are committed together (inside :func:`run`, with the checkpoint).  On its own
    it refuses to commit a manifest that would no longer describe the checkpoint already in ``run``.
    """
    if run is None:
        return guarded_search(loaded, scheme, calibration, progress=progress)
    with writing(run) as staged:
        searched = guarded_search(loaded, scheme, calibration, state=staged.search_state, resume_from=run.search_state,
                           progress=progress)
        staged.search_state_written()
        if save_manifest:
            if staged.commits:
                _refuse_orphaning(run, searched.manifest)
            searched.manifest.save(staged.manifest)
            kill_point("manifest")  # tests interrupt here: a new manifest written, nothing it describes yet
    if save_manifest:
        progress.stage(f"manifest written to {run.manifest}")
    return searched


def guarded_search(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, *, state: Path | None = None,
            resume_from: Path | None = None, progress: Progress = SILENT) -> Searched:
    """The guarded search, saving its state at ``state`` (resumed from ``resume_from`` while there is none)."""
    with stage_boundary(f"search {scheme.id}", SchemeError):
        result = search_lm_only(loaded, scheme, calibration, checkpoint=state, resume_from=resume_from, progress=progress)
    guards = tuple(c.require() for c in run_stage("search", result=result))
    manifest = Manifest.from_search(result)
    verified = tuple(c.require() for c in run_stage("manifest", manifest=manifest, result=result))
    return Searched(loaded, calibration, result, manifest, guards + verified)


def _refuse_orphaning(run: RunFolder, manifest: Manifest) -> None:
    """A search's manifest replaces the run's only if it still describes the run's checkpoint."""
    if not (run.checkpoint / "config.json").exists():
        return
    if not manifest.verify(checkpoint=run.checkpoint).ok:
        raise CheckpointError(
            f"The search decided differently from the checkpoint already in {run.root}, so its manifest would no "
            f"longer describe that checkpoint; nothing was replaced. Export the new decisions with `vlq run --out "
            f"{run.root} --overwrite` (it resumes from this search's saved scores), or search into another --out.")


def export(
    searched: Searched,
    destination: RunFolder | str | Path,
    *,
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> Exported:
    """Stage 6: write the checkpoint, then prove it on disk and against the manifest.

    Into a run folder the checkpoint is staged and committed with the folder's other files (inside
    :func:`run` or a sweep, when that ends: the returned path is then the staged one, which the caller
    measures and serves first); to a plain path it is swapped in whole.
    """
    if not isinstance(destination, RunFolder):
        exported = _export(searched, Path(destination), overwrite=overwrite, progress=progress)
        progress.stage(f"checkpoint written to {exported.path}")
        return exported
    with writing(destination) as staged:
        check_export_dir(destination.checkpoint, overwrite)  # what --overwrite is about: the committed checkpoint
        exported = _export(searched, staged.checkpoint, shown_as=destination.checkpoint, overwrite=overwrite,
                           progress=progress)
    if staged.joined:
        return exported
    exported = exported_at(exported, destination.checkpoint)
    progress.stage(f"checkpoint written to {exported.path}")
    return exported


def _export(searched: Searched, path: Path, *, shown_as: Path | None = None, overwrite: bool, progress: Progress) -> Exported:
    loaded = searched.loaded
    with progress.bar("export", total=3) as bar, stage_boundary("export", CheckpointError, where=str(shown_as or path)):
        if searched.manifest.scheme.kv_cache_fp8:
            add_fp8_kv_cache(loaded, searched.calibration, make_forward_step(loaded, "extract"))
        bar.update()
        exported = export_checkpoint(loaded, path, overwrite=overwrite, shown_as=shown_as)  # inspects before moving into place
        bar.update()
        checks = tuple(c.require() for c in run_stage("inspect", checkpoint=exported.path, manifest=searched.manifest,
                                                           report=exported.report))
        bar.update()
    return Exported(exported, checks)


def exported_at(exported: Exported, path: Path) -> Exported:
    """``exported`` naming where its checkpoint lives once committed."""
    return dataclasses.replace(exported, export=dataclasses.replace(exported.export, path=path, report=exported.export.report.at(path)))


def serve_check(
    checkpoint: str | Path,
    *,
    manifest: Manifest | None = None,
    reference: str | Path | None = None,
    references: Sequence[FidelityReference] = (),
    progress: Progress = SILENT,
) -> Served:
    """Stage 7: load the checkpoint in vLLM and check it layer by layer (and its outputs).

    Formats without kernels on this machine's vLLM (NVFP4/MXFP8 on CPU) are checked up to config
    parsing and per-layer method resolution; ``note`` says so.  With fidelity ``references`` the same
    engine also measures point c (:func:`measure_served`).  Needs an importable vLLM.
    """
    from ..export.inspect import checkpoint_verdict
    from ..serve.checks import check_resolution, expected_lm_formats, run_checks
    from ..serve.runner import VllmRunner, serve_checkpoint
    from ..serve.environment import default_device
    from ..serve.resolution import preflight, resolve_quant_methods

    path = Path(checkpoint).expanduser().resolve()
    pre = preflight(path)
    if reference is not None:
        preflight(reference)
    if manifest is None and (path.parent / RunFolder.MANIFEST).exists():  # a `vlq run` folder
        manifest = Manifest.load(path.parent / RunFolder.MANIFEST)
    source = "the manifest" if manifest is not None else "the checkpoint's quantization config"
    on_disk = checkpoint_verdict(path, manifest)  # only a consistent checkpoint reaches vLLM
    if not all(c.ok for c in on_disk):
        return Served(path, {}, source, (), on_disk, note="vLLM was not started: the checkpoint on disk is inconsistent.")
    expected = expected_lm_formats(manifest=manifest) if manifest is not None else expected_lm_formats(checkpoint=path)
    device = default_device()
    if device not in pre.runnable_on:
        with progress.bar("vLLM per-layer resolution"), stage_boundary("vLLM per-layer resolution", ServingError):
            resolution = resolve_quant_methods(path)
        note = (f"vLLM has no {device} kernels for {', '.join(pre.algos)}: checked config parsing and per-layer "
                "method resolution only; generation NOT run.")
        return Served(path, expected, source, resolution.layers, on_disk + check_resolution(resolution, manifest=manifest),
                      resolution=resolution, note=note)
    fidelity: tuple[FidelityMetrics, ...] = ()
    with progress.bar(f"vLLM engine ({device})"), stage_boundary(f"serving {path.name} in vLLM", ServingError):
        reference_report = serve_checkpoint(reference, device=device) if reference is not None else None
        with VllmRunner(path, device=device, **served_engine_args(references)) as runner:
            report = runner.report()
            fidelity = served_fidelity(runner, references)
    checks = on_disk + run_checks(report, manifest=manifest, reference=reference_report)
    note = (f"engine start {report.engine_start_s:.1f}s, generation {report.generate_s:.1f}s; text tokens "
            f"{list(report.text.token_ids)}, image tokens {list(report.image.token_ids)}")
    return Served(path, expected, source, report.layers, checks, report=report, note=note, fidelity=fidelity)


def restore(
    folder: RunFolder,
    loaded: LoadedVLM,
    data: DataRequest | None = None,
    *,
    calibration: CalibrationSet | None = None,
    progress: Progress = SILENT,
) -> Searched:
    """Re-apply a saved search (no scoring) to ``loaded``: the same decisions as its manifest, whose
    fidelity block is kept (the manifest is rewritten with it).

    ``data`` defaults to the calibration the manifest names, so an image+text search is restored
    from the batches it was scored on; ``calibration`` gives the batches themselves.
    """
    saved = Manifest.load(folder.manifest)
    if not folder.search_state.exists():
        raise SearchStateError(f"{folder.root} has no {RunFolder.SEARCH_STATE}; run `vlq search --out {folder.root}` first.")
    if calibration is None:
        calibration = calibrate(loaded, saved.scheme, data if data is not None else saved_data_request(saved), progress=progress)
    with writing(folder) as staged:
        # the committed state, under a private name: ModelOpt may save it again, the run's own is never written
        searched = guarded_search(loaded, saved.scheme, calibration, state=staged.scratch(folder.search_state),
                           resume_from=folder.search_state, progress=progress)
        if searched.manifest.groups != saved.groups:
            raise ManifestMismatch("The restored search decided differently from the saved manifest; the search state does not match it.")
        # the same decisions: the fidelity and task accuracy the saved manifest recorded still describe them
        searched = dataclasses.replace(searched, manifest=dataclasses.replace(searched.manifest, accuracy=saved.accuracy))
        return record_fidelity(searched, saved.fidelity, folder)


def saved_data_request(manifest: Manifest) -> DataRequest:
    """The data request that rebuilds the calibration a manifest names (its text file, or its image data
    and seed) and the held-out data its fidelity block was measured on (the held-out image seed)."""
    images, seed = images_option_from_source(manifest.calibration_source)
    text = None
    if images is None:
        shipped = shipped_text(manifest.calibration_source)
        if shipped is not None:
            text = str(shipped)
        elif Path(manifest.calibration_source).is_file():
            text = manifest.calibration_source
    for metrics in manifest.fidelity:  # held-out images come from seed HELDOUT_SEED_BASE + the run's seed
        if metrics.data_kind == "image_text" and metrics.data_source.startswith(HELDOUT_PREFIX):
            _, heldout_seed = images_option_from_source(metrics.data_source[len(HELDOUT_PREFIX):])
            if heldout_seed >= HELDOUT_SEED_BASE:
                seed = heldout_seed - HELDOUT_SEED_BASE
    return DataRequest(text=text, images=images, seed=seed)


def fresh_copy(loaded: LoadedVLM) -> LoadedVLM:
    """A private deep copy to quantize, leaving ``loaded`` BF16 (sweeps, comparisons, test fixtures)."""
    return copy.deepcopy(loaded)


def release_model(loaded: LoadedVLM) -> None:
    device = getattr(loaded.device, "type", "cpu")
    del loaded
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
