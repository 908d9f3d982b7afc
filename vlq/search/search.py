"""Stage 4 — LM-only AutoQuant search, and the guards that prove the vision tower stayed BF16.

Two restriction strategies:

``extract``
    ``mtq.auto_quantize`` runs on the extracted text model only.  Its output is hidden states, so
    the forward step applies the parent's ``lm_head`` to get logits; neither the vision tower nor
    ``lm_head`` is inside the searched model, so neither can be quantized.
``mask``
    ``mtq.auto_quantize`` runs on the whole VLM with the vision tower and ``lm_head`` in
    ``disabled_layers`` *and* in the cost model's ``excluded_module_name_patterns``.  Disabling alone
    is not enough: disabled layers still count at 16 bits in ``effective_bits``.

Only :class:`_ModelOptState` reads ModelOpt's nested search-state dict; everything downstream gets
typed :class:`GroupDecision` objects.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.applicability import FormatExclusion, FormatPlan, lm_layer_shapes, plan_formats
from ..data.calibration import IGNORE_INDEX, CalibrationSet
from ..checks.check import Check
from ..runtime.cuda_extensions import ExtensionLoad, load_for_formats, loaded_in_process
from ..runtime.errors import GuardViolation, ResourceError, SchemeError, SearchStateError
from ..runtime.files import kill_point
from ..data.models import LoadedVLM, fingerprint_parameters
from ..runtime.progress import SILENT, Progress
from .scheme import LOSS_CHUNK_TOKENS, Scheme
from ..formats.registry import NO_QUANT, format_for_modelopt_name


# ------------------------------------------------------------------------------------------------
# Typed results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    format: str
    score: float
    cost: float


@dataclass(frozen=True)
class GroupDecision:
    """One AutoQuant decision: a group of modules that share one format (q/k/v, gate/up, ...)."""

    name: str  # full-VLM name of the group key, e.g. model.language_model.layers.0.self_attn
    members: tuple[str, ...]  # full-VLM module names
    chosen: str
    candidates: tuple[Candidate, ...]
    searched: bool  # False when the group was disabled (only "none" allowed)
    cost_weight: float

    def candidate(self, fmt: str) -> Candidate:
        for c in self.candidates:
            if c.format == fmt:
                return c
        raise KeyError(f"{fmt} is not a candidate of {self.name}")


@dataclass(frozen=True)
class PhaseTimes:
    """A search's wall time by phase.

    ``extension_build_s`` is the one-off cost of building (cold cache) or loading ModelOpt's CUDA extensions
    before calibration (:mod:`vlq.runtime.cuda_extensions`; 0 on CPU and once they are loaded in the process); it is
    not part of ``calibrate_s``.  ``total_s`` includes it, so the phases add up to the wall time a caller's
    stopwatch sees; :attr:`searching_s` leaves it out (what a second search in the same process costs).
    """

    calibrate_s: float
    score_s: float
    solve_s: float
    extension_build_s: float = 0.0

    @property
    def searching_s(self) -> float:
        return self.calibrate_s + self.score_s + self.solve_s

    @property
    def total_s(self) -> float:
        return self.extension_build_s + self.searching_s


@dataclass
class SearchResult:
    """What a search decided, plus the live objects later stages need.

    ``groups`` covers every decision ModelOpt made; :meth:`lm_groups` the language model's.
    ``modelopt_state`` is ModelOpt's own state dict, kept to re-solve other targets and to verify
    manifests; read it only through :func:`decisions_from_state`.
    """

    scheme: Scheme
    loaded: LoadedVLM
    groups: tuple[GroupDecision, ...]
    achieved_bits: float  # over the language model only
    modelopt_achieved_bits: float  # ModelOpt's own figure (denominator per its cost model)
    total_score: float
    is_satisfied: bool
    times: PhaseTimes
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    modelopt_state: dict[str, Any] = field(repr=False)
    searched_model: nn.Module = field(repr=False)
    disabled_layers: tuple[str, ...] = ()
    cost_excluded: tuple[str, ...] = ()
    restored_from_checkpoint: bool = False
    name_prefix: str = ""  # maps the searched module's names to full-VLM names (see searched_module)
    calibration_source: str = ""
    score_calls: int = 0  # scoring steps run in this call (0 when scores were restored from a saved state)
    #: forwards ModelOpt calibrated with, over every format (0 when restored; see calibration_forwards())
    calibration_calls: int = 0
    # peak GPU memory as if the searched model were the only thing on the GPU (other resident
    # tensors, e.g. a test session's read-only copy of the model, subtracted)
    peak_gpu_own_bytes: int | None = None
    # every visible GPU's peak during the search (a model split over GPUs uses several); () on CPU
    peak_gpu_bytes_per_device: tuple[int, ...] = ()
    #: candidate formats removed from groups before the search because the layer shapes do not fit them
    format_exclusions: tuple[FormatExclusion, ...] = ()
    #: ModelOpt's CUDA extensions loaded before calibration (the ``extension_build_s`` phase)
    extensions: ExtensionLoad = field(default_factory=lambda: ExtensionLoad(device="cpu"))
    #: extensions ModelOpt loaded during the search anyway (their time is inside a phase; should be ())
    extensions_loaded_while_searching: tuple[str, ...] = ()

    def lm_groups(self) -> tuple[GroupDecision, ...]:
        return groups_within(self.groups, self.loaded.lm_path)

    def other_groups(self) -> tuple[GroupDecision, ...]:
        lm = set(self.lm_groups())
        return tuple(g for g in self.groups if g not in lm)


# ------------------------------------------------------------------------------------------------
# The one adapter over ModelOpt's search-state dict
# ------------------------------------------------------------------------------------------------

_HPARAM_SUFFIX = ".quant_recipe"


def _full_name(name: str, prefix: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def decisions_from_state(state: dict[str, Any], *, name_prefix: str, recipe: dict[str, Any] | None = None) -> tuple[GroupDecision, ...]:
    """Typed decisions from ModelOpt's ``auto_quantize`` state.

    ``name_prefix`` maps names of the searched model to full-VLM names (the LM's path for
    ``extract``, empty for ``mask``).  ``recipe`` overrides ``state['best']['recipe']`` (a re-solve).
    """
    try:
        stats = state["candidate_stats"]
        best = recipe if recipe is not None else state["best"]["recipe"]
    except (KeyError, TypeError) as exc:
        raise SearchStateError(f"Not an AutoQuant search state (missing {exc}).") from exc
    groups = []
    for hparam_name, stat in stats.items():
        formats = [format_for_modelopt_name(str(f)) for f in stat["formats"]]
        candidates = tuple(
            Candidate(fmt, float(score), float(cost))
            for fmt, score, cost in zip(formats, stat["scores"], stat["costs"])
        )
        chosen_recipe = best.get(hparam_name)
        if chosen_recipe is None:
            raise SearchStateError(f"Search state has no decision for {hparam_name}.")
        base = hparam_name[: -len(_HPARAM_SUFFIX)] if hparam_name.endswith(_HPARAM_SUFFIX) else hparam_name
        groups.append(
            GroupDecision(
                name=_full_name(base, name_prefix),
                members=tuple(_full_name(m, name_prefix) for m in stat["module_names"]),
                chosen=format_for_modelopt_name(str(chosen_recipe)),
                candidates=candidates,
                searched=len([f for f in formats if f != NO_QUANT]) > 0,
                cost_weight=float(stat.get("cost_weight", 1.0)),
            )
        )
    return tuple(groups)


def resolve_decisions(state: dict[str, Any], target_bits: float, *, name_prefix: str) -> tuple[GroupDecision, ...]:
    """Re-solve a finished search for another effective-bits target without re-scoring.

    Uses the same solver ModelOpt's ``get_auto_quantize_config(state, constraints)`` runs (its
    ``_resolve_best_recipe``), but keeps the per-group recipes instead of flattening them into a
    quantize config.  ``tests/test_sweep.py`` pins that the result equals a fresh search.
    """
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    bits = float(target_bits)
    if not 0 < bits <= 16:
        raise SchemeError(f"target_bits must be in (0, 16], got {target_bits}.")
    try:
        recipe = _resolve_best_recipe(state, {"effective_bits": bits})
    except (KeyError, TypeError) as exc:
        raise SearchStateError(f"Cannot re-solve: not an AutoQuant search state (missing {exc}).") from exc
    return decisions_from_state(state, name_prefix=name_prefix, recipe=recipe)


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
        # measured on the tiny model: fp8+int4_awq switched to "none" everywhere stays 0.017 nats from BF16
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
        hparam = get_hparam(result.searched_model, f"{decision.name[len(prefix):]}{_HPARAM_SUFFIX}")
        recipes = {format_for_modelopt_name(str(r)): r for r in hparam.choices}
        if decision.chosen not in recipes:
            raise SchemeError(f"{decision.name}: {decision.chosen} is not among its candidates {sorted(recipes)}.")
        hparam.active = recipes[decision.chosen]
        applied += 1
    return applied


def _weight_quantizer_leaves(module: nn.Module) -> list | None:
    """The TensorQuantizers that fake-quantize ``module``'s weight, or None where serving their output as
    the weight would not equal the live forward (a pre-quant scale or rotation also acts while disabled,
    real quantization, nothing enabled)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizer = getattr(module, "weight_quantizer", None)
    leaves = [quantizer] if isinstance(quantizer, TensorQuantizer) else list(quantizer or ()) if isinstance(quantizer, nn.Sequential) else []
    if not leaves or not all(isinstance(q, TensorQuantizer) for q in leaves) or not any(q.is_enabled for q in leaves):
        return None
    for q in leaves:
        if not q.fake_quant or getattr(q, "pre_quant_scale", None) is not None or getattr(q, "rotate_is_enabled", False):
            return None
    return leaves


class HostOriginals:
    """Host copies of weights that :func:`weights_quantized_once` made, kept for its next call on the same
    model: a sweep measures every target on one model whose original weights never change, so each
    target then copies the originals back (host to device) but not out again.  Use one per sweep of
    in-place re-decisions only (formats that fold smoothing into weights change them between targets)."""

    def __init__(self):
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, host copy)

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        entry = self._copies.get(id(weight))
        return entry[1] if entry is not None and entry[0] is weight else None

    def keep(self, weight: torch.Tensor, copy: torch.Tensor) -> None:
        self._copies[id(weight)] = (weight, copy)

    def __len__(self) -> int:
        return len(self._copies)


@contextlib.contextmanager
def weights_quantized_once(model: nn.Module, *, spare_bytes: int = 4 * 2**30, originals: HostOriginals | None = None):
    """Within: each linear's fake-quantized weight is computed once and served, not recomputed per forward.

    ModelOpt fake-quantizes every weight in every forward; during a fidelity measurement neither weights
    nor decisions change, so the quantizer's output is the same tensor each time.  Written over the
    weight in place (its quantizer disabled meanwhile), it gives the same logits as live fake quant
    (tested bit for bit on CPU and on the 3B shape on GPU) and spares the per-forward weight quantization.
    The originals wait in host memory (page-locked for GPU weights), so the device holds no second copy;
    where the host lacks that room plus ``spare_bytes`` nothing is folded and forwards quantize live.
    On exit every original weight and quantizer is back.  Yields how many linears were folded.  With
    ``originals`` the host copies are taken from (and left in) it instead of made afresh.
    """
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    from ..runtime.hardware import host_memory

    candidates = []
    for module in model.modules():
        if not isinstance(module, QuantLinearConvBase):
            continue
        weight = module._parameters.get("weight")
        leaves = _weight_quantizer_leaves(module)
        if weight is not None and leaves is not None:
            candidates.append((module, weight, leaves))
    need = sum(weight.numel() * weight.element_size() for _, weight, _ in candidates
               if originals is None or originals.get(weight) is None)
    if need and host_memory()[1] < need + spare_bytes:
        candidates = []  # no room for the originals: measure with live fake quant
    folded = []
    try:
        with torch.no_grad():
            for module, weight, leaves in candidates:
                on_gpu = weight.device.type == "cuda"
                original = originals.get(weight) if originals is not None else None
                if original is None:
                    original = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=on_gpu)
                    original.copy_(weight.data, non_blocking=on_gpu)  # stream-ordered before the overwrite below
                    if originals is not None:
                        originals.keep(weight, original)
                quantized = module.weight_quantizer(weight)
                if quantized.shape != weight.shape or quantized.dtype != weight.dtype:
                    continue
                was_enabled = [q.is_enabled for q in leaves]
                weight.data.copy_(quantized)
                del quantized
                for q in leaves:
                    q.disable()
                folded.append((weight, original, leaves, was_enabled))
        yield len(folded)
    finally:
        with torch.no_grad():
            for weight, original, leaves, was_enabled in folded:
                weight.data.copy_(original, non_blocking=original.is_pinned())
                for q, enabled in zip(leaves, was_enabled):
                    if enabled:
                        q.enable()
        if any(weight.device.type == "cuda" for weight, *_ in folded):
            torch.cuda.synchronize()  # the page-locked originals are released only after their copies ran


def groups_within(groups, module_path: str) -> tuple:
    """The groups whose every member lies under ``module_path`` (the language model's, usually)."""
    prefix = module_path + "."
    return tuple(g for g in groups if all(m.startswith(prefix) for m in g.members))


def _cost(group, fmt: str, default: float | None = None) -> float:
    for c in group.candidates:
        if c.format == fmt:
            return c.cost
    if default is None:
        raise KeyError(f"{fmt} is not a candidate of {group.name}")
    return default


def lm_achieved_bits(groups) -> float:
    """Effective bits over ``groups`` (decisions or manifest groups): chosen cost over uncompressed cost, x16."""
    chosen = sum(_cost(g, g.chosen) for g in groups)
    full = sum(_cost(g, NO_QUANT, default=0.0) for g in groups)
    if full <= 0:
        raise SearchStateError("No language-model weight is counted in the search state (zero cost denominator).")
    return chosen / full * 16.0


# ------------------------------------------------------------------------------------------------
# Forward and loss functions
# ------------------------------------------------------------------------------------------------


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"].to(logits.device)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def _summed_token_nll(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor, lm_head: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """``causal_lm_loss(lm_head(hidden), batch)`` without holding the batch's logits.

    The logits of ``chunk_tokens`` tokens at a time are made, reduced to a summed cross-entropy and dropped;
    backward makes them again (a torch checkpoint per chunk: one extra vocabulary GEMM, milliseconds).
    Same value and gradients as the full-logits loss up to float summation order
    (``tests/test_search.py::test_chunked_loss_equals_full_logits_loss``).
    """
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    states = hidden[:, :-1].flatten(0, 1)
    labels = batch["labels"].to(hidden.device)[:, 1:].flatten()
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_summed_token_nll, lm_head, states[start:stop], labels[start:stop], use_reentrant=False)
    return total / (labels != IGNORE_INDEX).sum()  # 0/0 = nan with no label, as the mean cross-entropy gives


def _model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


def _vlm_parent(loaded: LoadedVLM) -> nn.Module:
    """The module that owns the vision tower and the text model (``Qwen2_5_VLModel``)."""
    parent_path = loaded.lm_path.rsplit(".", 1)[0] if "." in loaded.lm_path else ""
    return loaded.vlm.get_submodule(parent_path) if parent_path else loaded.vlm


def image_text_inputs(loaded: LoadedVLM, text_model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Text-model inputs for an image+text batch, built outside the searched text model.

    The BF16 vision tower encodes ``pixel_values`` under ``no_grad`` (nothing of it is searched, and no
    gradient reaches it); its features replace the image-pad embeddings, and the 3-D mrope positions
    come from the parent's ``get_rope_index`` — the same methods the parent's own forward uses, so the
    logits equal the full VLM's (``tests/test_image_text.py::test_extract_forward_equals_vlm_forward``).
    Text embeddings come from the text model's own ``embed_tokens``, so gradient scoring sees the
    same graph as on text-only data.
    """
    parent = _vlm_parent(loaded)
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    grid = inputs["image_grid_thw"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (input_ids == loaded.config.image_token_id).long()
    with torch.inference_mode(False), torch.no_grad():  # kl_div scores under inference mode
        features = parent.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output
        image_embeds = torch.cat(tuple(features), dim=0)
        position_ids, _ = parent.get_rope_index(input_ids, types, image_grid_thw=grid, attention_mask=attention_mask)
    embeds = text_model.get_input_embeddings()(input_ids)
    image_mask, _ = parent.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image_embeds)
    embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.device, embeds.dtype))
    return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}


def make_forward_step(
    loaded: LoadedVLM, strategy: str, *, logits: bool = True
) -> Callable[[nn.Module, dict], torch.Tensor]:
    """Forward returning logits. For ``extract`` the parent's lm_head turns hidden states into logits
    (``logits=False``: the last hidden states, for :func:`chunked_causal_lm_loss`).

    Image+text batches (``pixel_values`` present): ``mask`` runs the whole VLM as is (the vision tower
    is disabled and cost-excluded); ``extract`` builds ``inputs_embeds`` and mrope ``position_ids``
    with :func:`image_text_inputs` and calls the text model with them.
    """
    device = loaded.device
    if not logits and strategy != "extract":
        raise ValueError("Only the extract strategy can return hidden states (mask runs the VLM's own lm_head).")
    if strategy == "extract":
        lm_head = loaded.lm_head

        def forward_extract(model, batch):
            inputs = _model_inputs(batch, device)
            if inputs.get("pixel_values") is not None:
                inputs = image_text_inputs(loaded, model, inputs)
            else:
                inputs.pop("pixel_values", None)
                inputs.pop("image_grid_thw", None)
                inputs.pop("mm_token_type_ids", None)
            if "inputs_embeds" in inputs:
                inputs.pop("input_ids", None)
            hidden = model(**inputs, use_cache=False).last_hidden_state
            return lm_head(hidden) if logits else hidden

        return forward_extract

    def forward_mask(model, batch):
        return model(**_model_inputs(batch, device), use_cache=False).logits

    return forward_mask


# ------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------


def _current_rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Samples the process RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _current_rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())
        return False


class _PhaseClock:
    """Splits a search's wall time into calibration, scoring and solve.

    Scoring is recognised by the loss function being called (gradient) or by inference mode
    (kl_div); calibration is everything before the first scoring step and solve everything after
    the last one.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.first_score: float | None = None
        self.last_score: float | None = None
        self.end: float | None = None
        self.score_calls = 0

    def mark_score(self, when: float | None = None):
        self.score_calls += 1
        now = time.perf_counter() if when is None else when
        if self.first_score is None:
            self.first_score = now
        self.last_score = now

    def times(self) -> PhaseTimes:
        end = self.end or time.perf_counter()
        first = self.first_score if self.first_score is not None else end
        last = self.last_score if self.last_score is not None else end
        return PhaseTimes(max(0.0, first - self.start), max(0.0, last - first), max(0.0, end - last))


class _PhaseBars:
    """One progress bar for calibration, then one for scoring, driven by ModelOpt's calls of our
    forward and loss functions (ModelOpt itself reports nothing we can hook)."""

    def __init__(self, progress: Progress, scheme: Scheme, calibration_forwards: int | None = None):
        self.progress, self.scheme = progress, scheme
        self.calibration_forwards = scheme.num_calib_steps if calibration_forwards is None else calibration_forwards
        self.phase: str | None = None
        self._cm = self._bar = None

    def _open(self, phase: str, label: str, total: int | None) -> None:
        self.close()
        self.phase = phase
        self._cm = self.progress.bar(label, total)
        self._bar = self._cm.__enter__()

    def forward(self) -> None:
        if self.phase is None:
            self._open("calibrate", "calibration", self.calibration_forwards)
        if self.phase == "calibrate":
            self._bar.update()

    def scored(self) -> None:
        if self.phase != "score":
            # gradient: one loss call per scoring step; kl_div: many forwards per step (no total)
            total = self.scheme.num_score_steps if self.scheme.method == "gradient" else None
            self._open("score", f"scoring ({self.scheme.method})", total)
        self._bar.update()

    def close(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------

#: Calibration forwards merge consecutive batches up to this many tokens (3B at 512 tokens: 16 rows in one
#: forward).  Calibration keeps no activations for a backward pass, and on an H200 a 3B forward costs about
#: the same (~0.25 s, mostly ModelOpt's per-quantizer work) at 1 row as at 4, so fewer, bigger forwards cut
#: that phase by the batch factor.
CALIBRATION_TOKENS_PER_FORWARD = 8192


def _calibrating() -> bool:
    """ModelOpt calibrates under ``torch.no_grad`` and scores with gradients (``gradient``) or under
    inference mode (``kl_div``)."""
    return not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class CalibrationThenScoring:
    """The ``data_loader`` ModelOpt's AutoQuant iterates afresh for every format's calibration and for
    scoring: while calibrating it yields ``calibration`` (the same rows merged into bigger forwards),
    otherwise the scoring batches.  Only for formats calibrated by a running max (max, SmoothQuant): the
    same rows in other forwards give the same amax.  AWQ's search is per batch, and ModelOpt feeds it a
    quarter of the steps, so a scheme with AWQ keeps one batch per step."""

    def __init__(self, calibration: list[dict], scoring: list[dict]):
        self.calibration, self.scoring = calibration, scoring

    def __iter__(self):
        return iter(self.calibration if _calibrating() else self.scoring)


def calibration_forwards(scheme: Scheme, batches: list[dict]) -> list[dict]:
    """The first ``num_calib_steps`` batches as calibration forwards: merged up to
    :data:`CALIBRATION_TOKENS_PER_FORWARD` tokens unless a format's calibration depends on the batching."""
    from ..fidelity.metrics import group_rows

    first = batches[: scheme.num_calib_steps]
    if any(f.calibration_by_batch for f in scheme.format_objects):
        return first
    return group_rows(first, max(1, CALIBRATION_TOKENS_PER_FORWARD // scheme.seq_len))



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
    (:func:`chunked_causal_lm_loss`); ``loss_chunk_tokens=None`` holds the whole batch's logits, as
    ModelOpt's examples do.  The model in ``loaded`` is quantized in place.

    ``checkpoint`` is where ModelOpt saves (and resumes) the search state; while it does not exist, a
    state at ``resume_from`` (a committed run's) is checked, and resumed under ``checkpoint``'s name.
    """
    import modelopt.torch.quantization as mtq

    progress = progress or SILENT
    scheme.require_device(str(loaded.device))
    calibration.require_steps(scheme.num_calib_steps, scheme.num_score_steps)
    if calibration.vocab_size > loaded.vocab_size:
        raise SchemeError(
            f"Calibration data was built for a vocabulary of {calibration.vocab_size} but the model has "
            f"{loaded.vocab_size}; rebuild it with this model's tokenizer."
        )
    _refuse_already_quantized(loaded)
    plan = plan_lm_formats(loaded, scheme)  # before any calibration: a format that cannot apply is never searched

    model, prefix = searched_module(loaded, scheme.strategy)
    disabled: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    if scheme.strategy == "mask":
        patterns = restriction_patterns(loaded)
        disabled = patterns if disable_vision else ()
        excluded = patterns if exclude_cost else ()
    search_spaces, unfit = plan.search_spaces(lambda name: name[len(prefix) + 1:] if prefix else name)
    disabled += tuple(unfit)
    if plan.restricted:
        progress.stage(plan.summary())

    clock = _PhaseClock()
    chunked_loss = loss_chunk_tokens is not None and scheme.loss_in_chunks
    forward = make_forward_step(loaded, scheme.strategy, logits=not chunked_loss)
    # calibration discards the output: under extract the lm_head (never searched) need not run
    calibration_forward = make_forward_step(loaded, "extract", logits=False) if scheme.strategy == "extract" else forward
    scoring_batches = list(calibration.to(loaded.device).batches)
    calibration_batches = calibration_forwards(scheme, scoring_batches)
    bars = _PhaseBars(progress, scheme, len(calibration_batches))

    gpu_peak_seen = [0]
    calibration_calls = [0]

    def forward_step(m, batch):
        if torch.is_inference_mode_enabled():  # kl_div scoring runs under inference mode
            kill_point("score-step")
            clock.mark_score()
            bars.scored()
        elif _calibrating():
            calibration_calls[0] += 1
            bars.forward()
            out = calibration_forward(m, batch)
            if out.is_cuda:
                gpu_peak_seen[0] = max(gpu_peak_seen[0], torch.cuda.max_memory_allocated())
            return out
        out = forward(m, batch)
        if out.is_cuda:
            # ModelOpt's gradient searcher resets CUDA's peak counter when scoring starts, so the
            # calibration peak is read here, before that reset can happen.
            gpu_peak_seen[0] = max(gpu_peak_seen[0], torch.cuda.max_memory_allocated())
        return out

    def loss_func(output, batch):
        kill_point("score-step")  # tests interrupt a real scoring step here
        clock.mark_score()
        bars.scored()
        if chunked_loss:
            return chunked_causal_lm_loss(output, loaded.lm_head, batch, loss_chunk_tokens)
        return causal_lm_loss(output, batch)

    constraints: dict[str, Any] = {"effective_bits": scheme.target_bits}
    if excluded:
        constraints["cost"] = {"excluded_module_name_patterns": list(excluded)}

    restored = False
    source = None  # the saved state the search resumes from
    if checkpoint is not None:
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

    data = CalibrationThenScoring(calibration_batches, scoring_batches)
    progress.stage(f"search {scheme.id}: {len(scoring_batches)} batches of {calibration.batch_size}x{calibration.seq_len} tokens"
                   + (f", calibrated in {len(calibration_batches)} forwards" if len(calibration_batches) != scheme.num_calib_steps else ""))
    cuda = loaded.device.type == "cuda"
    extensions = _load_extensions(progress, scheme, loaded.device.type)
    extensions_before = loaded_in_process() if cuda else frozenset()
    if cuda:
        torch.cuda.synchronize()
        gc.collect()  # garbage from earlier work (reference cycles) would otherwise count as "other"
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        model_bytes = sum(t.numel() * t.element_size() for t in (*loaded.vlm.parameters(), *loaded.vlm.buffers()) if t.is_cuda)
        other_gpu_bytes = max(0, torch.cuda.memory_allocated() - model_bytes)
    was_training = model.training
    model.eval()
    # ModelOpt decides which of the searched module's parameters need gradients; the parent's parameters
    # outside it (an untied lm_head, the vision tower under `extract`) would otherwise get weight gradients
    # computed and kept after the search (7B: a 1 GiB lm_head gradient, one extra vocab-sized GEMM per step)
    inside = {id(p) for p in model.parameters()}
    frozen = [p for p in loaded.vlm.parameters() if id(p) not in inside and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    from .state import modelopt_state_io

    oom_message = None
    # ModelOpt runs gc.collect() before scoring: over every object this process holds (~0.35 s with
    # transformers and ModelOpt loaded).  Objects from before the search are frozen out of that scan;
    # garbage the search itself makes is still collected.
    gc.freeze()
    try:
        with PeakRss() as rss, modelopt_state_io(), _gradient_checkpointing(model, scheme.gradient_checkpointing):
            clock.start = time.perf_counter()
            _, state = mtq.auto_quantize(
                model,
                constraints=constraints,
                quantization_formats=scheme.modelopt_formats(),
                data_loader=data,
                forward_step=forward_step,
                loss_func=loss_func if scheme.method == "gradient" else None,
                disabled_layers=list(disabled) or None,
                num_calib_steps=scheme.num_calib_steps,
                num_score_steps=scheme.num_score_steps,
                verbose=verbose,
                method=scheme.method,
                checkpoint=str(checkpoint) if checkpoint is not None else None,
                module_search_spaces=search_spaces or None,
            )
            if cuda:
                torch.cuda.synchronize()
            clock.end = time.perf_counter()
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
    finally:
        gc.unfreeze()
        bars.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
        # ModelOpt switches on gradient checkpointing for HF models while scoring; the searched
        # model is used for inference and export afterwards.
        for candidate in (model, loaded.vlm):
            if getattr(candidate, "is_gradient_checkpointing", False):
                candidate.gradient_checkpointing_disable()
    if oom_message is not None:
        gc.collect()
        torch.cuda.empty_cache()
        raise ResourceError(
            f"GPU out of memory during the AutoQuant search {scheme.id} "
            f"(batch_size={calibration.batch_size}, seq_len={calibration.seq_len}, "
            f"num_calib_steps={scheme.num_calib_steps}, num_score_steps={scheme.num_score_steps}). "
            "Lower batch_size or seq_len first (scoring keeps activations for the backward pass), "
            f"or use method=kl_div with fewer score steps. ({oom_message})"
        )
    peak_gpu = max(torch.cuda.max_memory_allocated(), gpu_peak_seen[0]) if cuda else None
    per_device = tuple(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) if cuda else ()

    late = tuple(sorted(loaded_in_process() - extensions_before)) if cuda else ()
    if late:
        progress.stage(f"ModelOpt loaded CUDA extension(s) {', '.join(late)} during the search: that time is inside "
                       "calibrate/score, not in the extension phase")
    groups = decisions_from_state(state, name_prefix=prefix)
    result = SearchResult(
        scheme=scheme,
        loaded=loaded,
        groups=groups,
        achieved_bits=0.0,
        modelopt_achieved_bits=float(state["best"]["constraints"].get("effective_bits", float("nan"))),
        total_score=float(state["best"]["score"]),
        is_satisfied=bool(state["best"]["is_satisfied"]),
        times=replace(clock.times(), extension_build_s=extensions.seconds),
        peak_rss_bytes=rss.peak,
        peak_gpu_bytes=peak_gpu,
        peak_gpu_bytes_per_device=per_device,
        modelopt_state=state,
        searched_model=model,
        disabled_layers=disabled,
        cost_excluded=excluded,
        restored_from_checkpoint=restored,
        name_prefix=prefix,
        calibration_source=calibration.source,
        score_calls=clock.score_calls,
        calibration_calls=calibration_calls[0],
        peak_gpu_own_bytes=None if peak_gpu is None else peak_gpu - other_gpu_bytes,
        format_exclusions=plan.exclusions,
        extensions=extensions,
        extensions_loaded_while_searching=late,
    )
    result.achieved_bits = lm_achieved_bits(result.lm_groups())
    progress.stage(
        f"search {scheme.id}: {result.achieved_bits:.3f} effective bits over the LM, {timing_summary(result)}"
        + (f"; calibration and scores restored from {source}, no scoring step ran" if restored and not result.score_calls else "")
    )
    return result


def _load_extensions(progress: Progress, scheme: Scheme, device_type: str) -> ExtensionLoad:
    """The search's extension phase: on CUDA, load (or build) the extensions the formats use, as its own bar."""
    if device_type != "cuda":
        return load_for_formats(scheme.format_objects, device_type)
    with progress.bar("CUDA extensions (a first build on a machine takes about a minute)") as bar:
        extensions = load_for_formats(scheme.format_objects, device_type)
        bar.update()
    progress.stage(extensions.summary())
    return extensions


def timing_summary(result: SearchResult) -> str:
    """``12.3s (extension build 9.0s, calibrate 1.1s, score 2.0s, solve 0.2s)``; the extension phase is
    named only when it loaded something in this search."""
    t = result.times
    phases = [f"{result.extensions.phase} {t.extension_build_s:.1f}s"] if result.extensions.phase != "none" else []
    phases += [f"calibrate {t.calibrate_s:.1f}s", f"score {t.score_s:.1f}s", f"solve {t.solve_s:.1f}s"]
    return f"{t.total_s:.1f}s ({', '.join(phases)})"


def _refuse_already_quantized(loaded: LoadedVLM) -> None:
    for name, module in loaded.vlm.named_modules():
        if hasattr(module, "weight_quantizer"):
            raise SchemeError(
                f"The model already carries ModelOpt quantizers (first: {name}); a search needs a fresh "
                "BF16 model. Load it again (or copy the fixture) before searching."
            )


# ------------------------------------------------------------------------------------------------
# Guards
# ------------------------------------------------------------------------------------------------


def enabled_quantizers(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of every enabled ModelOpt TensorQuantizer under ``module``."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, TensorQuantizer) and sub.is_enabled:
            found.append(_full_name(name, prefix))
    return found


class VisionGuard:
    """Proves the vision tower stayed BF16 through a search.

    Three independent checks: (1) no enabled quantizer anywhere under the tower, (2) no search
    decision that quantizes a vision module, (3) the tower's weights are byte-identical to the
    fingerprint taken at load time.
    """

    name = "vision tower unquantized (VisionGuard)"

    def __init__(self, loaded: LoadedVLM):
        self.loaded = loaded
        self.expected_fingerprint = loaded.vision.fingerprint

    def check(self, result: SearchResult | None = None) -> Check:
        loaded = self.loaded
        tower = loaded.vlm.get_submodule(loaded.vision.root)
        problems = [f"enabled quantizer {q}" for q in enabled_quantizers(tower, loaded.vision.root)]
        if result is not None:
            for group in result.groups:
                vision_members = [m for m in group.members if m == loaded.vision.root or m.startswith(loaded.vision.root + ".")]
                if vision_members and group.chosen != NO_QUANT:
                    problems.append(f"search chose {group.chosen} for vision group {group.name}")
        fingerprint = fingerprint_parameters(tower)
        if fingerprint != self.expected_fingerprint:
            problems.append(
                f"vision weights changed: fingerprint {fingerprint[:12]} != {self.expected_fingerprint[:12]} at load"
            )
        dtypes = sorted({str(p.dtype) for p in tower.parameters()})
        if tuple(dtypes) != loaded.vision.dtypes:
            problems.append(f"vision parameter dtypes {dtypes} != {list(loaded.vision.dtypes)} at load")
        checked = len(loaded.vision.linear_names)
        return Check(self.name, tuple(problems), checked, f"{checked} vision linears, weights unchanged", GuardViolation)


class LmHeadGuard:
    """Proves ``lm_head`` (tied to the embeddings in Qwen2.5-VL-3B) carries no enabled quantizer."""

    name = "lm_head unquantized (LmHeadGuard)"

    def __init__(self, loaded: LoadedVLM):
        self.loaded = loaded

    def check(self, result: SearchResult | None = None) -> Check:
        head = self.loaded.lm_head
        problems = [f"enabled quantizer {q}" for q in enabled_quantizers(head, "lm_head")]
        if result is not None:
            for group in result.groups:
                if any(fnmatch.fnmatch(m, "*lm_head") for m in group.members) and group.chosen != NO_QUANT:
                    problems.append(f"search chose {group.chosen} for {group.name}")
        detail = "tied to the embeddings" if self.loaded.tied_lm_head else "untied"
        return Check(self.name, tuple(problems), 1, detail, GuardViolation)


def check_guards(result: SearchResult) -> tuple[Check, Check]:
    return VisionGuard(result.loaded).check(result), LmHeadGuard(result.loaded).check(result)
