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

import contextlib
import copy
import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..data.calibration import (
    CalibrationSet, default_text_path, image_text_calibration, images_option_from_source, shipped_text, synthetic_text_calibration,
    text_batches,
)
from ..checks.check import Check
from ..checks.registry import get_check, in_registry_order, run_stage
from ..fidelity.comparison import CalibrationComparison, MethodComparison, compare_calibration_manifests, compare_method_manifests
from ..runtime.errors import (
    CalibrationDataError, CheckpointError, ManifestMismatch, ModelSourceError, SchemeError, SearchStateError, ServingError, stage_boundary,
)
from ..export.export import ExportResult, add_fp8_kv_cache, export_checkpoint, unify_fused_scales
from ..runtime.files import check_export_dir, kill_point
from ..fidelity.metrics import FidelityMetrics, NonFiniteLogits, hidden_logits_forward, logits_forward
from ..fidelity.reference import FidelityReference, capture_reference, measure_against
from ..data.heldout import HELDOUT_PREFIX, HELDOUT_SEED_BASE, heldout_image_text_batches, heldout_text_batches
from ..inputs.requests import POINT_NAMES, DataRequest, ModelRequest, RunFolder, describe_source
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM, load_vlm
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import Staged, writing
from ..formats.registry import FORMATS, NO_QUANT
from ..search.scheme import Scheme
from ..search.results import SearchResult
from ..search.search import apply_decisions
from ..search.forward import make_forward_step
from ..search.search import plan_lm_formats, search_lm_only
from ..fidelity.quantized_weights import HostOriginals, weights_quantized_once
from ..manifest.sweep import SweepPoint, SweepResult, manifest_for_target
from ..serve.results import QuantResolution, ServedLayer, ServingReport

# ------------------------------------------------------------------------------------------------
# Stage results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Searched:
    """A finished LM-only search whose guards held and whose manifest matches the searcher state
    and the live quantizers.  ``loaded`` now carries the quantizers (fake-quantized in place)."""

    loaded: LoadedVLM
    calibration: CalibrationSet
    result: SearchResult
    manifest: Manifest
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Exported:
    """A checkpoint on disk that matches its manifest and keeps every on-disk guarantee."""

    export: ExportResult
    checks: tuple[Check, ...]

    @property
    def path(self) -> Path:
        return self.export.path


@dataclass(frozen=True)
class Served:
    """What vLLM made of a checkpoint: per-layer methods, and generations where kernels exist."""

    checkpoint: Path
    expected: dict[str, str]  # vLLM layer name -> expected format
    expectations_from: str
    layers: tuple[ServedLayer, ...]
    checks: tuple[Check, ...]
    report: ServingReport | None = None  # None when only resolved (no kernels on this device)
    resolution: QuantResolution | None = None
    note: str = ""
    fidelity: tuple[FidelityMetrics, ...] = ()  # measurement point c, when references were given

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class RunOutcome:
    run: RunFolder
    searched: Searched  # its manifest carries the fidelity block
    exported: Exported
    served: Served | None = None
    serve_skipped: str = ""  # why serving was not checked, when it was not

    @property
    def checks(self) -> tuple[Check, ...]:
        """Every check of the run, each once, in registry order (serving re-reads the checkpoint from disk before
        vLLM starts: that verdict shows where it failed, if it did)."""
        return in_registry_order(self.searched.checks + self.exported.checks + (self.served.checks if self.served else ()))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class ComparisonRun:
    comparison: CalibrationComparison
    text_manifest: Manifest  # each manifest carries its scheme's fidelity block (point a)
    image_text_manifest: Manifest


@dataclass(frozen=True)
class MethodComparisonRun:
    comparison: MethodComparison
    manifests: tuple[Manifest, Manifest]  # in the order of the methods; each carries its fidelity block (point a)


@dataclass(frozen=True)
class MeasuredRun:
    """Measurement points taken again on a finished run folder, recorded in its manifest."""

    run: RunFolder
    manifest: Manifest  # the run's manifest with the new metrics in its fidelity block (as saved)
    measured: tuple[FidelityMetrics, ...]  # what this call measured, in the order of the points asked


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
                                   batch_size=scheme.batch_size, seq_len=scheme.seq_len, path=_text_path(loaded, data))
    else:
        if data.text is not None:
            raise CalibrationDataError(f"{loaded.source} has no tokenizer, so the text in {data.text} cannot be tokenized; "
                                       "load a checkpoint folder with its tokenizer, or drop --data.")
        calibration = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=batches,
                                                 batch_size=scheme.batch_size, seq_len=scheme.seq_len, seed=data.seed)
    return calibration


def _text_path(loaded: LoadedVLM, data: DataRequest) -> str | Path:
    """The text file calibration and held-out rows are read from: ``--data``, else the model's shipped default."""
    return data.text if data.text is not None else default_text_path(loaded.source)


#: Held-out rows measured for fidelity: a few for the tiny model, 32 (x the scheme's seq_len) for full-size ones.
FIDELITY_ROWS_TINY = 8
FIDELITY_ROWS_FULL_SIZE = 32
#: Rows share a forward up to this many tokens (3B at 512 tokens: 16 rows).  Both sides of a measurement keep
#: final hidden states (vlq.fidelity.metrics.LazyLogits: 2 MB per 3B row) and make logits 1024 positions at a time,
#: so a forward's memory is its activations; fewer, bigger forwards share the fake-quantized model's
#: per-module overhead (H200: ~0.14 s per forward).
FIDELITY_TOKENS_PER_FORWARD = 8192


def fidelity_references(
    loaded: LoadedVLM,
    scheme: Scheme,
    data: DataRequest = DataRequest(),
    *,
    calibration: CalibrationSet | None = None,
    rows: int | None = None,
    kinds: Sequence[str] = ("text", "image_text"),
    progress: Progress = SILENT,
) -> tuple[FidelityReference, ...]:
    """Stage 2b: held-out batches disjoint from calibration, and the BF16 model's logits on them.

    Call it before ``loaded`` is quantized.  Text comes from the end of the calibration text (or the
    shipped corpus), or — without a tokenizer — from seeded tokens of a held-out seed range; image+text
    from generated images of a held-out seed range.  With ``calibration`` the held-out data must be
    disjoint from it.
    """
    if rows is None:
        rows = FIDELITY_ROWS_TINY if loaded.vocab_size <= 4096 else FIDELITY_ROWS_FULL_SIZE  # tiny models: 1024
    forward = hidden_logits_forward(loaded.vlm)
    references = []
    with progress.bar("fidelity reference (BF16)", total=len(kinds)) as bar:
        for kind in kinds:
            if kind == "text":
                if loaded.tokenizer is not None:
                    heldout = heldout_text_batches(
                        loaded.tokenizer, vocab_size=loaded.vocab_size, num_batches=rows, seq_len=scheme.seq_len,
                        path=_text_path(loaded, data), calibration=calibration if calibration is not None and calibration.kind == "text" else None)
                else:
                    heldout = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=rows,
                                                         seq_len=scheme.seq_len, seed=HELDOUT_SEED_BASE + data.seed)
            elif kind == "image_text":
                image_calibration = calibration if calibration is not None and calibration.kind == "image_text" else None
                heldout = heldout_image_text_batches(loaded, num_batches=rows, seed=data.seed, calibration=image_calibration)
            else:
                raise SchemeError(f"Unknown fidelity data kind {kind!r}; use text or image_text.")
            per_forward = max(1, FIDELITY_TOKENS_PER_FORWARD // scheme.seq_len)
            references.append(capture_reference(forward, heldout.to(loaded.device), rows_per_forward=per_forward))
            bar.update()
    return tuple(references)


def measure_fake_quant(loaded: LoadedVLM, references: Sequence[FidelityReference], *, progress: Progress = SILENT,
                       originals: HostOriginals | None = None) -> tuple[FidelityMetrics, ...]:
    """Measurement point a: the fake-quantized model right after the search, against the BF16 reference.
    A sweep passes one ``originals`` for all its in-place targets (:class:`vlq.search.search.HostOriginals`)."""
    forward = hidden_logits_forward(loaded.vlm)
    with progress.bar("fidelity (fake-quantized)", total=len(references)) as bar, \
            weights_quantized_once(loaded.vlm, originals=originals):
        metrics = []
        for reference in references:
            metrics.append(measure_against(reference, forward, measurement_point="fake_quant"))
            bar.update()
    return tuple(metrics)


def measure_checkpoint(checkpoint: str | Path, references: Sequence[FidelityReference], *,
                       progress: Progress = SILENT) -> tuple[FidelityMetrics, ...]:
    """Measurement point b: the exported checkpoint re-read from disk by the independent dequantizer
    (:mod:`vlq.export.dequant`: safetensors + quantization config -> BF16 weights plus the activation
    quantization the config prescribes), against the BF16 reference."""
    from ..export.dequant import dequantize_checkpoint

    device = references[0].batches[0]["input_ids"].device if references else "cpu"
    with progress.bar("fidelity (checkpoint from disk)", total=len(references)) as bar, \
            stage_boundary("fidelity of the checkpoint read back from disk", CheckpointError):
        built = dequantize_checkpoint(checkpoint).build_model(device=device)
        forward = hidden_logits_forward(built.model)
        metrics = []
        for reference in references:
            metrics.append(measure_against(reference, forward, measurement_point="checkpoint"))
            bar.update()
        built.remove_hooks()
        del built
    return tuple(metrics)


def measure_served(checkpoint: str | Path, references: Sequence[FidelityReference], *,
                   progress: Progress = SILENT) -> tuple[FidelityMetrics, ...]:
    """Measurement point c: vLLM's prompt log-probabilities (full vocabulary) of the checkpoint, against
    the BF16 reference.  Text references only: vLLM expands image placeholders itself, so image+text
    prompts do not line up token for token with the held-out batches.  Needs a vLLM that has kernels
    for the checkpoint's formats on this machine."""
    from ..serve.runner import VllmRunner

    with progress.bar("fidelity (vLLM)"), VllmRunner(checkpoint, **served_engine_args(references)) as runner:
        return served_fidelity(runner, references)


def served_engine_args(references: Sequence[FidelityReference]) -> dict:
    """Full-vocabulary prompt logprobs, and a context that holds the longest held-out row plus the token vLLM
    generates after it (a real checkpoint's 512-token rows need 513)."""
    from ..serve.runner import context_length_for

    longest = max((b["input_ids"].shape[1] for r in references if r.data_kind == "text" for b in r.batches), default=0)
    return {"max_logprobs": -1, "max_model_len": context_length_for(longest)}


def served_fidelity(runner, references: Sequence[FidelityReference], *, top_k: int | None | str = "auto"
                     ) -> tuple[FidelityMetrics, ...]:
    """Point c on each text reference: vLLM's whole-vocabulary prompt logprobs for small vocabularies, each
    position's top :data:`vlq.serve.runner.PROMPT_LOGPROBS_TOP_K` for Qwen-sized ones (completed in the BF16
    tail's shape, a lower bound on the KLD; the metrics say which).  ``top_k``: "auto", None (whole
    vocabulary) or a number."""
    import torch

    from ..fidelity.metrics import LazyLogits, complete_with_reference_tail
    from ..serve.runner import FULL_PROMPT_LOGPROBS_VOCAB, PROMPT_LOGPROBS_TOP_K

    metrics = []
    for reference in (r for r in references if r.data_kind == "text"):
        vocab = reference.logits[0].shape[-1]
        k = (None if vocab <= FULL_PROMPT_LOGPROBS_VOCAB else PROMPT_LOGPROBS_TOP_K) if top_k == "auto" else top_k
        stored = dict(zip(map(id, reference.batches), reference.logits))

        def forward(batch, vocab=vocab, k=k, stored=stored):
            tables = runner.prompt_logprobs(batch["input_ids"].tolist(), vocab, top_k=k)
            if k is None:
                return torch.stack([t.logprobs for t in tables])
            base = stored[id(batch)]
            rows = []
            for i, table in enumerate(tables):
                logits = base[i : i + 1].materialize()[0] if isinstance(base, LazyLogits) else base[i]
                rows.append(complete_with_reference_tail(table.logprobs, table.returned, logits.to(table.logprobs.device)))
            return torch.stack(rows)

        measured = measure_against(reference, forward, measurement_point="vllm")
        if k is not None:
            measured = dataclasses.replace(measured, vocabulary=f"top-{k}")
        metrics.append(measured)
    return tuple(metrics)


def export_agreement(manifest: Manifest, fake_quant: FidelityReference, checkpoint: str | Path, *,
                     bf16_to_fake_quant: FidelityMetrics) -> Check:
    """Point b agrees with point a: the exported checkpoint, rebuilt from disk, is within the format's
    export-agreement factor (:attr:`vlq.formats.spec.QuantFormat.export_agreement`) of the fake-quantized model (``fake_quant`` holds a's logits)."""
    chosen = {g.chosen for g in manifest.groups} - {NO_QUANT}
    factor = max((FORMATS[f].export_agreement.factor for f in chosen), default=0.0)
    allowed = factor * bf16_to_fake_quant.kld_mean
    spec = get_check("export_agreement")
    try:
        between = measure_checkpoint(checkpoint, [fake_quant])[0]
    except NonFiniteLogits as exc:  # e.g. an E4M3 scale that overflowed to NaN on disk: a verdict, not a crash
        return spec.result((f"checkpoint read back from disk gives non-finite logits ({exc}): scales or weights on disk "
                            "are broken",), 0, "")
    problems = [] if between.kld_mean <= allowed else [
        f"checkpoint read back from disk is {between.kld_mean:.3g} nats/token from the fake-quantized model, more than "
        f"{factor:g} x its {bf16_to_fake_quant.kld_mean:.3g} from BF16 ({', '.join(sorted(chosen))}): scales or weights on "
        "disk do not encode what the search measured"]
    return spec.result(problems, between.tokens, f"KLD {between.kld_mean:.3g} <= {allowed:.3g} ({factor:g} x KLD to BF16)")


def export_agreement_check(*, manifest: Manifest, fake_quant: FidelityReference, checkpoint: str | Path,
                           bf16_to_fake_quant: FidelityMetrics, **_) -> Check:
    """The fidelity stage's registered check (:func:`export_agreement`)."""
    return export_agreement(manifest, fake_quant, checkpoint, bf16_to_fake_quant=bf16_to_fake_quant)


def record_fidelity(searched: Searched, metrics: Sequence[FidelityMetrics], run: RunFolder | None = None) -> Searched:
    """``searched`` with ``metrics`` in its manifest (rewritten in ``run`` when given)."""
    manifest = searched.manifest.with_fidelity(*metrics)
    if run is not None:
        with writing(run) as staged:
            manifest.save(staged.manifest)
    return dataclasses.replace(searched, manifest=manifest)


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
        return _search(loaded, scheme, calibration, progress=progress)
    with writing(run) as staged:
        searched = _search(loaded, scheme, calibration, state=staged.search_state, resume_from=run.search_state,
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


def _search(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, *, state: Path | None = None,
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
    exported = _exported_at(exported, destination.checkpoint)
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


def _exported_at(exported: Exported, path: Path) -> Exported:
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


# ------------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------------


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
    return dataclasses.replace(outcome, exported=_exported_at(outcome.exported, folder.checkpoint), served=served)


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
        searched = _search(loaded, saved.scheme, calibration, state=staged.scratch(folder.search_state),
                           resume_from=folder.search_state, progress=progress)
        if searched.manifest.groups != saved.groups:
            raise ManifestMismatch("The restored search decided differently from the saved manifest; the search state does not match it.")
        # the same decisions: the fidelity the saved manifest recorded still describes them
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


def _release(loaded: LoadedVLM) -> None:
    device = getattr(loaded.device, "type", "cpu")
    del loaded
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


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
    base = _search(loaded, first, calibration, state=staged.search_state, progress=progress)
    staged.search_state_written()
    search_s = time.perf_counter() - start
    in_place = not any(f.folds_weights for f in first.format_objects)

    def restored(target: float) -> Searched:
        # restores the saved calibration and scores from folder.search_state: nothing is re-scored
        searched = _search(fresh_copy(pristine), first.with_(target_bits=target), calibration, state=staged.search_state,
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
                _release(copy_.loaded)
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
                _release(searched.loaded)
        manifest_at[target].save(staged.target(target).manifest)
        points.append(SweepPoint(target, manifest_at[target], resolve_s[target], path, export_s, verified,
                                 measure_s.get(target, 0.0)))
    result = SweepResult(first, tuple(points), search_s, pristine.source, reference_s,
                         references[0].rows if references else 0)
    result.save(staged.sweep)
    return result


def _search_and_measure(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet,
                        references: Sequence[FidelityReference], *, progress: Progress) -> Manifest:
    """One guarded search on a private copy of ``loaded``; its manifest with point a measured against
    ``references`` (none: no fidelity block).  The copy is released."""
    copy_ = fresh_copy(loaded)
    searched = search(copy_, scheme, calibration, progress=progress)
    manifest = searched.manifest
    if references:
        manifest = manifest.with_fidelity(*measure_fake_quant(copy_, references, progress=progress))
    del searched
    _release(copy_)
    return manifest


def compare_calibration(
    loaded: LoadedVLM,
    scheme: Scheme,
    text_calibration: CalibrationSet,
    image_text_calibration: CalibrationSet,
    *,
    data: DataRequest = DataRequest(),
    measure: bool = True,
    out_dir: str | Path | None = None,
    progress: Progress = SILENT,
) -> ComparisonRun:
    """Search ``scheme`` on a fresh copy of ``loaded`` with each calibration set; compare the decisions.

    Each search passes every guard and manifest check.  With ``measure`` (default) each resulting
    scheme is measured at point a against one BF16 reference on held-out text (disjoint from the text
    calibration; from ``data.text`` or the shipped corpus) and held-out image+text (disjoint from the
    image+text calibration), and the comparison reports both KLDs.  With ``out_dir`` the manifests go
    to ``out_dir/text/`` and ``out_dir/image_text/`` and the comparison's JSON, Markdown and plot next
    to them.
    """
    if image_text_calibration.kind != "image_text":
        raise SchemeError(f"The image+text side got {image_text_calibration.kind!r} calibration data ({image_text_calibration.source}).")
    if text_calibration.kind == "image_text":
        raise SchemeError(f"The text-only side got image+text calibration data ({text_calibration.source}).")
    references: tuple[FidelityReference, ...] = ()
    if measure:
        references = (fidelity_references(loaded, scheme, data, calibration=text_calibration, kinds=("text",), progress=progress)
                      + fidelity_references(loaded, scheme, data, calibration=image_text_calibration, kinds=("image_text",),
                                            progress=progress))
    manifests = {}
    with _writing_to(out_dir) as staged:
        for label, calibration in (("text", text_calibration), ("image_text", image_text_calibration)):
            progress.stage(f"{label} search on {calibration.source}")
            manifests[label] = _search_and_measure(loaded, scheme, calibration, references, progress=progress)
            if staged is not None:
                manifests[label].save(RunFolder(staged.root / label).manifest)
        comparison = compare_calibration_manifests(manifests["text"], manifests["image_text"])
        if staged is not None:
            comparison.write(staged.root)
    return ComparisonRun(comparison, manifests["text"], manifests["image_text"])


def _writing_to(out_dir: str | Path | None):
    """A comparison's folder, written together (nothing to write without one)."""
    return writing(RunFolder(Path(out_dir))) if out_dir is not None else contextlib.nullcontext(None)


def write_comparison(comparison: CalibrationComparison | MethodComparison, out_dir: str | Path) -> Path:
    """A comparison of saved manifests, written into ``out_dir`` together; the folder."""
    with writing(RunFolder(Path(out_dir))) as staged:
        comparison.write(staged.root)
    return Path(out_dir)


def compare_methods(
    loaded: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    *,
    methods: tuple[str, str] = ("gradient", "kl_div"),
    data: DataRequest = DataRequest(),
    measure: bool = True,
    out_dir: str | Path | None = None,
    progress: Progress = SILENT,
) -> MethodComparisonRun:
    """Search ``scheme`` once per sensitivity method (same model, formats, bits and calibration), each on
    a fresh copy of ``loaded``; compare the decisions and — with ``measure`` — each scheme's fidelity to
    BF16 (point a) on held-out text and image+text.

    With ``out_dir`` the manifests go to ``out_dir/<method>/`` and ``comparison.json`` / ``.md`` next
    to them.  The same method twice is allowed (a negative control: it must agree everywhere).
    """
    if len(methods) != 2:
        raise SchemeError(f"A method comparison takes two methods, got {list(methods)}.")
    schemes = [scheme.with_(method=m) for m in methods]  # validates each method before any work
    references: tuple[FidelityReference, ...] = ()
    if measure:
        references = fidelity_references(loaded, scheme, data, calibration=calibration, progress=progress)
    folders = list(methods) if methods[0] != methods[1] else [methods[0], f"{methods[1]}-2"]
    manifests = []
    with _writing_to(out_dir) as staged:
        for folder, method_scheme in zip(folders, schemes):
            progress.stage(f"{method_scheme.method} search on {calibration.source}")
            manifests.append(_search_and_measure(loaded, method_scheme, calibration, references, progress=progress))
            if staged is not None:
                manifests[-1].save(RunFolder(staged.root / folder).manifest)
        comparison = compare_method_manifests(manifests[0], manifests[1])
        if staged is not None:
            comparison.write(staged.root)
    return MethodComparisonRun(comparison, (manifests[0], manifests[1]))


# ------------------------------------------------------------------------------------------------
# One measurement point at a time, on a finished run folder
# ------------------------------------------------------------------------------------------------

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


__all__ = [
    "ComparisonRun", "Exported", "MeasuredRun", "MethodComparisonRun", "RunOutcome", "Searched", "Served",
    "calibrate", "compare_calibration", "compare_methods", "export", "fidelity_references", "fresh_copy", "load_model",
    "export_agreement", "measure_checkpoint", "measure_fake_quant", "measure_run", "measure_served", "record_fidelity",
    "restore", "run", "saved_data_request", "search", "serve_check", "served_engine_args", "served_fidelity",
    "serving_skip_reason", "sweep", "write_comparison",
]
