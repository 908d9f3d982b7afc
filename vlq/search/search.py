"""The LM-only AutoQuant search: ``mtq.auto_quantize`` on the language model of a Qwen2.5-VL only.

Two restriction strategies:

``extract``
    ``mtq.auto_quantize`` runs on the extracted text model only.  Its output is hidden states, so
    the forward step applies the parent's ``lm_head`` to get logits; neither the vision tower nor
    ``lm_head`` is inside the searched model, so neither can be quantized.
``mask``
    ``mtq.auto_quantize`` runs on the whole VLM with the vision tower and ``lm_head`` in
    ``disabled_layers`` *and* in the cost model's ``excluded_module_name_patterns``.  Disabling alone
    is not enough: disabled layers still count at 16 bits in ``effective_bits``.

Only :mod:`vlq.search.decisions` reads ModelOpt's nested search-state dict; everything downstream gets
typed :class:`vlq.search.decisions.GroupDecision` objects.  The guards that prove the vision tower stayed
BF16 are in :mod:`vlq.search.guards`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.calibration import CalibrationSet
from ..data.models import LoadedVLM
from ..formats.applicability import FormatPlan, lm_layer_shapes, plan_formats
from ..formats.registry import format_for_modelopt_name
from ..runtime.cuda_extensions import ExtensionLoad, load_for_formats, loaded_in_process
from ..runtime.errors import ResourceError, SchemeError, SearchStateError
from ..runtime.files import kill_point
from ..runtime.progress import SILENT, Progress
from .accounting import PeakRss, PhaseBars, PhaseClock
from .calibration_feed import CalibrationThenScoring, calibrating, calibration_forwards
from .decisions import HPARAM_SUFFIX, decisions_from_state, lm_achieved_bits
from .forward import make_forward_step
from .losses import causal_lm_loss, chunked_causal_lm_loss
from .results import SearchResult, timing_summary
from .scheme import LOSS_CHUNK_TOKENS, Scheme


def searched_module(loaded: LoadedVLM, strategy: str) -> tuple[nn.Module, str]:
    """The module ``mtq.auto_quantize`` runs on for ``strategy``, and the prefix that maps its module
    names to full-VLM names: the extracted text model (``extract``) or the whole VLM (``mask``).
    The one place a strategy decides what is searched."""
    if strategy == "extract":
        return loaded.language_model, loaded.lm_path
    if strategy == "mask":
        return loaded.vlm, ""
    raise SchemeError(f"Unknown strategy {strategy!r}; use extract or mask.")


def restriction_patterns(loaded: LoadedVLM) -> tuple[str, ...]:
    """Module-name patterns (fnmatch, full-VLM names) that cover the vision tower and lm_head."""
    head_name = next(n for n, m in loaded.vlm.named_modules() if m is loaded.lm_head)
    return (f"{loaded.vision.root}.*", loaded.vision.root, head_name, f"*{head_name}")


def modelopt_group_key(model: nn.Module, name: str) -> str:
    """The decision group ModelOpt's AutoQuant puts module ``name`` in (its ``quant_grouping_rules``)."""
    import re

    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    for rule in AutoQuantizeGradientSearcher.quant_grouping_rules:
        key = rule(model, name) if callable(rule) else (m.group(1) if (m := re.match(rule, name)) else None)
        if key is not None:
            return key
    return name


def plan_lm_formats(loaded: LoadedVLM, scheme: Scheme) -> FormatPlan:
    """Which of ``scheme``'s formats fit which LM decision groups (:mod:`vlq.formats.applicability`), refused
    up front (SchemeError naming the layers) when a format fits nothing or the target needs what was removed."""
    plan = plan_formats(scheme.formats, lm_layer_shapes(loaded), lambda name: modelopt_group_key(loaded.vlm, name))
    return plan.require(scheme)


def _is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


@contextlib.contextmanager
def _gradient_checkpointing(model, enabled: bool):
    """Keep ModelOpt's gradient checkpointing for HF models (``enabled``), or score ``model`` without it.

    ModelOpt picks the first entry of ``AutoQuantizeGradientSearcher._custom_support`` whose checker
    accepts the model; an entry for this model object alone, placed first for the search's duration,
    skips the HF entry that enables checkpointing (tests/test_search.py pins this ModelOpt contract).
    """
    if enabled:
        yield
        return
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    @contextlib.contextmanager
    def no_cache(m):  # what ModelOpt's HF context does besides checkpointing: no KV cache while scoring
        config = getattr(m, "config", None)
        previous = getattr(config, "use_cache", None)
        if config is not None and previous is not None:
            config.use_cache = False
        try:
            yield
        finally:
            if config is not None and previous is not None:
                config.use_cache = previous

    # activation gradients need only the embedding's weight to require grad (as ModelOpt's HF entry)
    entry = (lambda m: m is model, no_cache, lambda name, m: "embed" in name)
    AutoQuantizeGradientSearcher._custom_support.insert(0, entry)
    try:
        yield
    finally:
        AutoQuantizeGradientSearcher._custom_support.remove(entry)


def search_lm_only(
    loaded: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    disable_vision: bool = True,
    exclude_cost: bool = True,
    verbose: bool = False,
    progress: Progress | None = None,
    loss_chunk_tokens: int | None = LOSS_CHUNK_TOKENS,
) -> SearchResult:
    """Run ``mtq.auto_quantize`` on the language model of ``loaded`` only.

    ``disable_vision`` and ``exclude_cost`` exist for negative controls: turning either off makes
    the ``mask`` strategy search the vision tower or count it in the bit budget, which the guards
    and tests must catch.  Gradient scoring under ``extract`` takes its loss chunk by chunk
    (:func:`vlq.search.losses.chunked_causal_lm_loss`); ``loss_chunk_tokens=None`` holds the whole batch's
    logits, as ModelOpt's examples do.  The model in ``loaded`` is quantized in place.

    ``checkpoint`` is where ModelOpt saves (and resumes) the search state; while it does not exist, a
    state at ``resume_from`` (a committed run's) is checked, and resumed under ``checkpoint``'s name.
    """
    progress = progress or SILENT
    _refuse_unsearchable(loaded, scheme, calibration)
    plan = plan_lm_formats(loaded, scheme)  # before any calibration: a format that cannot apply is never searched
    target = _search_target(loaded, scheme, plan, disable_vision=disable_vision, exclude_cost=exclude_cost)
    if plan.restricted:
        progress.stage(plan.summary())
    calls = _SearchCalls(loaded, scheme, calibration, progress, loss_chunk_tokens)
    saved = _saved_state(loaded, scheme, calibration, checkpoint, resume_from)
    progress.stage(f"search {scheme.id}: {len(calls.scoring_batches)} batches of {calibration.batch_size}x{calibration.seq_len} "
                   "tokens" + (f", calibrated in {len(calls.calibration_batches)} forwards"
                               if len(calls.calibration_batches) != scheme.num_calib_steps else ""))
    extensions = _load_extensions(progress, scheme, loaded.device.type)
    memory = _GpuMemory.start(loaded)
    with PeakRss() as rss:
        state = _auto_quantize(loaded, scheme, target, calls, saved.path, verbose=verbose)
    late = memory.extensions_loaded_since()
    if late:
        progress.stage(f"ModelOpt loaded CUDA extension(s) {', '.join(late)} during the search: that time is inside "
                       "calibrate/score, not in the extension phase")
    result = SearchResult(
        scheme=scheme,
        loaded=loaded,
        groups=decisions_from_state(state, name_prefix=target.prefix),
        achieved_bits=0.0,
        modelopt_achieved_bits=float(state["best"]["constraints"].get("effective_bits", float("nan"))),
        total_score=float(state["best"]["score"]),
        is_satisfied=bool(state["best"]["is_satisfied"]),
        times=replace(calls.clock.times(), extension_build_s=extensions.seconds),
        peak_rss_bytes=rss.peak,
        peak_gpu_bytes=memory.peak(calls.gpu_peak_seen),
        peak_gpu_bytes_per_device=memory.per_device(),
        modelopt_state=state,
        searched_model=target.model,
        disabled_layers=target.disabled,
        cost_excluded=target.excluded,
        restored_from_checkpoint=saved.restored,
        name_prefix=target.prefix,
        calibration_source=calibration.source,
        score_calls=calls.clock.score_calls,
        calibration_calls=calls.calibration_calls,
        peak_gpu_own_bytes=memory.own_peak(calls.gpu_peak_seen),
        format_exclusions=plan.exclusions,
        extensions=extensions,
        extensions_loaded_while_searching=late,
    )
    result.achieved_bits = lm_achieved_bits(result.lm_groups())
    progress.stage(
        f"search {scheme.id}: {result.achieved_bits:.3f} effective bits over the LM, {timing_summary(result)}"
        + (f"; calibration and scores restored from {saved.source}, no scoring step ran"
           if saved.restored and not result.score_calls else "")
    )
    return result


def _refuse_unsearchable(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet) -> None:
    """Formats this device cannot run, too few batches, data of another vocabulary, a model already quantized."""
    scheme.require_device(str(loaded.device))
    calibration.require_steps(scheme.num_calib_steps, scheme.num_score_steps)
    if calibration.vocab_size > loaded.vocab_size:
        raise SchemeError(
            f"Calibration data was built for a vocabulary of {calibration.vocab_size} but the model has "
            f"{loaded.vocab_size}; rebuild it with this model's tokenizer."
        )
    _refuse_already_quantized(loaded)


@dataclass(frozen=True)
class _SearchTarget:
    """The module ModelOpt searches, and what it is told to leave alone."""

    model: nn.Module
    prefix: str  # maps the searched module's names to full-VLM names
    disabled: tuple[str, ...]  # disabled_layers: forced to "none"
    excluded: tuple[str, ...]  # the cost model's excluded_module_name_patterns
    search_spaces: list[dict[str, Any]]  # module_search_spaces: groups that lost candidates to the shape rules

    @property
    def constraints(self) -> dict[str, Any]:
        return {"cost": {"excluded_module_name_patterns": list(self.excluded)}} if self.excluded else {}


def _search_target(loaded: LoadedVLM, scheme: Scheme, plan: FormatPlan, *, disable_vision: bool, exclude_cost: bool) -> _SearchTarget:
    model, prefix = searched_module(loaded, scheme.strategy)
    disabled: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    if scheme.strategy == "mask":
        patterns = restriction_patterns(loaded)
        disabled = patterns if disable_vision else ()
        excluded = patterns if exclude_cost else ()
    search_spaces, unfit = plan.search_spaces(lambda name: name[len(prefix) + 1:] if prefix else name)
    # a recipe's patterns and search spaces after vlq's own: the shape rules and the LM-only restriction hold first
    search_spaces += [space.to_modelopt() for space in scheme.search_spaces]
    return _SearchTarget(model, prefix, disabled + tuple(unfit) + scheme.disabled_layers,
                         excluded + scheme.cost_excluded_layers, search_spaces)


class _SearchCalls:
    """The ``forward_step`` and ``loss_func`` handed to ModelOpt: they run vlq's forward and loss, and count,
    time and show the calls ModelOpt makes (it reports nothing a caller can hook)."""

    def __init__(self, loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, progress: Progress,
                 loss_chunk_tokens: int | None):
        self.loaded, self.scheme = loaded, scheme
        self.chunk_tokens = loss_chunk_tokens if loss_chunk_tokens is not None and scheme.loss_in_chunks else None
        self.forward = make_forward_step(loaded, scheme.strategy, logits=self.chunk_tokens is None)
        # calibration discards the output: under extract the lm_head (never searched) need not run
        self.calibration_forward = (make_forward_step(loaded, "extract", logits=False) if scheme.strategy == "extract"
                                    else self.forward)
        self.batch_size, self.seq_len = calibration.batch_size, calibration.seq_len
        self.scoring_batches = list(calibration.to(loaded.device).batches)
        self.calibration_batches = calibration_forwards(scheme, self.scoring_batches)
        self.clock = PhaseClock()
        self.bars = PhaseBars(progress, scheme, len(self.calibration_batches))
        self.gpu_peak_seen = 0
        self.calibration_calls = 0

    @property
    def data(self) -> CalibrationThenScoring:
        return CalibrationThenScoring(self.calibration_batches, self.scoring_batches)

    def _seen(self, out: torch.Tensor) -> torch.Tensor:
        if out.is_cuda:
            # ModelOpt's gradient searcher resets CUDA's peak counter when scoring starts, so the
            # calibration peak is read here, before that reset can happen.
            self.gpu_peak_seen = max(self.gpu_peak_seen, torch.cuda.max_memory_allocated())
        return out

    def forward_step(self, model, batch):
        if torch.is_inference_mode_enabled():  # kl_div scoring runs under inference mode
            kill_point("score-step")
            self.clock.mark_score()
            self.bars.scored()
        elif calibrating():
            self.calibration_calls += 1
            self.bars.forward()
            return self._seen(self.calibration_forward(model, batch))
        return self._seen(self.forward(model, batch))

    def loss_func(self, output, batch):
        kill_point("score-step")  # tests interrupt a real scoring step here
        self.clock.mark_score()
        self.bars.scored()
        if self.chunk_tokens is not None:
            return chunked_causal_lm_loss(output, self.loaded.lm_head, batch, self.chunk_tokens)
        return causal_lm_loss(output, batch)


@dataclass(frozen=True)
class _SavedState:
    path: Path | None  # where ModelOpt saves (and resumes) the search state
    source: Path | None  # the saved state the search resumes from
    restored: bool


def _saved_state(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, checkpoint, resume_from) -> _SavedState:
    """Where the search state is saved; a saved one is checked against this search's settings before resuming."""
    if checkpoint is None:
        return _SavedState(None, None, False)
    from .state import check_resume, link_state, search_settings, write_sidecar

    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    source = checkpoint if checkpoint.exists() or resume_from is None or not Path(resume_from).exists() else Path(resume_from)
    restored = source.exists()
    settings = search_settings(loaded, scheme, calibration)
    if restored:
        check_resume(source, settings)  # names any differing setting; weights-only read
        if source != checkpoint:
            link_state(source, checkpoint)  # ModelOpt saves over checkpoint only: source stays as it was
    else:
        write_sidecar(checkpoint, settings)
    return _SavedState(checkpoint, source, restored)


@dataclass
class _GpuMemory:
    """Peak GPU memory of a search, as if the searched model were alone on the GPU (other resident tensors,
    e.g. a test session's read-only copy of the model, subtracted); nothing on CPU."""

    cuda: bool
    other_bytes: int = 0
    extensions_before: frozenset[str] = frozenset()

    @classmethod
    def start(cls, loaded: LoadedVLM) -> "_GpuMemory":
        if loaded.device.type != "cuda":
            return cls(False)
        extensions_before = loaded_in_process()
        torch.cuda.synchronize()
        gc.collect()  # garbage from earlier work (reference cycles) would otherwise count as "other"
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        model_bytes = sum(t.numel() * t.element_size() for t in (*loaded.vlm.parameters(), *loaded.vlm.buffers()) if t.is_cuda)
        return cls(True, max(0, torch.cuda.memory_allocated() - model_bytes), extensions_before)

    def peak(self, seen: int) -> int | None:
        return max(torch.cuda.max_memory_allocated(), seen) if self.cuda else None

    def own_peak(self, seen: int) -> int | None:
        peak = self.peak(seen)
        return None if peak is None else peak - self.other_bytes

    def per_device(self) -> tuple[int, ...]:
        return tuple(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) if self.cuda else ()

    def extensions_loaded_since(self) -> tuple[str, ...]:
        return tuple(sorted(loaded_in_process() - self.extensions_before)) if self.cuda else ()


def _auto_quantize(loaded: LoadedVLM, scheme: Scheme, target: _SearchTarget, calls: _SearchCalls, checkpoint: Path | None, *,
                   verbose: bool) -> dict[str, Any]:
    """``mtq.auto_quantize`` on the target; its errors as vlq's (an infeasible target, a stale saved state, GPU OOM)."""
    import modelopt.torch.quantization as mtq

    from .state import modelopt_state_io

    oom_message = None
    try:
        with _searching(loaded, target.model, calls), modelopt_state_io(), \
                _gradient_checkpointing(target.model, scheme.gradient_checkpointing):
            calls.clock.start = time.perf_counter()
            _, state = mtq.auto_quantize(
                target.model,
                constraints={"effective_bits": scheme.target_bits, **target.constraints},
                quantization_formats=scheme.modelopt_formats(),
                data_loader=calls.data,
                forward_step=calls.forward_step,
                loss_func=calls.loss_func if scheme.method == "gradient" else None,
                disabled_layers=list(target.disabled) or None,
                num_calib_steps=scheme.num_calib_steps,
                num_score_steps=scheme.num_score_steps,
                verbose=verbose,
                method=scheme.method,
                checkpoint=str(checkpoint) if checkpoint is not None else None,
                module_search_spaces=target.search_spaces or None,
            )
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            calls.clock.end = time.perf_counter()
    except ValueError as exc:
        message = str(exc)
        if "infeasible" in message or "effective_bits" in message:
            raise SchemeError(f"{scheme.id}: {message} Raise target_bits (--bits) or add cheaper formats.") from exc
        if "Checkpoint" in message:
            raise SearchStateError(f"Search checkpoint {checkpoint} was made with other settings: {message}") from exc
        raise
    except RuntimeError as exc:
        if not _is_cuda_oom(exc):
            raise
        # Keep only the text: the exception's traceback pins every frame's activations on the GPU.
        oom_message = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
    if oom_message is not None:
        gc.collect()
        torch.cuda.empty_cache()
        raise ResourceError(
            f"GPU out of memory during the AutoQuant search {scheme.id} "
            f"(batch_size={calls.batch_size}, seq_len={calls.seq_len}, "
            f"num_calib_steps={scheme.num_calib_steps}, num_score_steps={scheme.num_score_steps}). "
            "Lower batch_size or seq_len first (scoring keeps activations for the backward pass), "
            f"or use method=kl_div with fewer score steps. ({oom_message})"
        )
    return state


@contextlib.contextmanager
def _searching(loaded: LoadedVLM, model: nn.Module, calls: _SearchCalls):
    """The searched model in eval mode with nothing outside it needing gradients, the collector's scan kept to
    the search's own objects; everything put back afterwards."""
    was_training = model.training
    model.eval()
    # ModelOpt decides which of the searched module's parameters need gradients; the parent's parameters
    # outside it (an untied lm_head, the vision tower under `extract`) would otherwise get weight gradients
    # computed and kept after the search (one extra vocab-sized GEMM per step)
    inside = {id(p) for p in model.parameters()}
    frozen = [p for p in loaded.vlm.parameters() if id(p) not in inside and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    # ModelOpt runs gc.collect() before scoring, over every object this process holds: objects from before
    # the search are frozen out of that scan; garbage the search itself makes is still collected.
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        calls.bars.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
        # ModelOpt switches on gradient checkpointing for HF models while scoring; the searched
        # model is used for inference and export afterwards.
        for candidate in (model, loaded.vlm):
            if getattr(candidate, "is_gradient_checkpointing", False):
                candidate.gradient_checkpointing_disable()


def _load_extensions(progress: Progress, scheme: Scheme, device_type: str) -> ExtensionLoad:
    """The search's extension phase: on CUDA, load (or build) the extensions the formats use, as its own bar."""
    if device_type != "cuda":
        return load_for_formats(scheme.format_objects, device_type)
    with progress.bar("CUDA extensions (a first build on a machine takes about a minute)") as bar:
        extensions = load_for_formats(scheme.format_objects, device_type)
        bar.update()
    progress.stage(extensions.summary())
    return extensions


def _refuse_already_quantized(loaded: LoadedVLM) -> None:
    for name, module in loaded.vlm.named_modules():
        if hasattr(module, "weight_quantizer"):
            raise SchemeError(
                f"The model already carries ModelOpt quantizers (first: {name}); a search needs a fresh "
                "BF16 model. Load it again (or copy the fixture) before searching."
            )


def apply_decisions(result: SearchResult, decisions) -> int:
    """Switch the searched model's live quantizers to ``decisions`` (GroupDecision or ManifestGroup).

    The same switch ModelOpt makes while scoring candidates and when it applies its best recipe
    (each group's ``quant_recipe`` hparam swaps in quantizers calibrated during the search): no
    calibration or scoring runs, so another target, a random or an inverted allocation can be measured
    on the one searched model in seconds.  ``apply_decisions(result, result.groups)`` restores the
    search's own choice.  Refused for schemes with AWQ/SmoothQuant formats, which fold scales into the
    weights (``QuantFormat.folds_weights``).  Returns how many groups were set.
    """
    from modelopt.torch.opt.utils import get_hparam

    folding = [f.name for f in result.scheme.format_objects if f.folds_weights]
    if folding:
        raise SchemeError(
            f"Cannot switch the decisions of a {'+'.join(result.scheme.formats)} search in place: {', '.join(folding)} "
            "folded smoothing scales into the weights of the groups that chose it. Restore the saved search on a "
            "fresh copy of the model instead (vlq.pipeline.restore / sweep with exports)."
        )
    prefix = result.name_prefix + "." if result.name_prefix else ""
    applied = 0
    for decision in decisions:
        if prefix and not decision.name.startswith(prefix):
            raise SearchStateError(f"{decision.name} is not inside the searched module {result.name_prefix}.")
        hparam = get_hparam(result.searched_model, f"{decision.name[len(prefix):]}{HPARAM_SUFFIX}")
        recipes = {format_for_modelopt_name(str(r)): r for r in hparam.choices}
        if decision.chosen not in recipes:
            raise SchemeError(f"{decision.name}: {decision.chosen} is not among its candidates {sorted(recipes)}.")
        hparam.active = recipes[decision.chosen]
        applied += 1
    return applied
