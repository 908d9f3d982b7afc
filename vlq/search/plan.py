"""Memory and disk planning from a model's config and a scheme, before anything is loaded.

``vlq plan`` prints it; ``run`` / ``search`` / ``sweep`` use it to refuse a run that cannot fit the
visible hardware (naming the fix) and to choose the fastest search that fits: the largest batch
under the memory budget and, when the activations fit, no gradient checkpointing.

The model: weights (bf16) + ModelOpt's search state (a share of the LM linear weights: amax and
per-block scale tensors, score buffers) + per scored row its activations for the backward pass and
ModelOpt's saved output differences (every linear, every candidate format; one decoder layer at a
time under gradient checkpointing, all layers without) + the logits and their loss.  The two
coefficients below were fitted to peaks measured on one H200 (``benchmarks/test_family.py``,
``reports/benchmarks/h200-family.json``); docs/guide.md lists the points and the residuals.

Light on purpose: no torch import (the CLI plans within a second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..runtime.errors import ResourceError
from ..runtime.hardware import GpuInfo, host_memory
from .scheme import LOSS_CHUNK_TOKENS, Scheme

GIB = 2**30
BF16 = 2
# Fitted on one H200 to the nine own-allocation peaks measured so far (3B grid of batch x checkpointing,
# 3B default, 7B, 32B; reports/README.md, fourth session), each within 5.8 %:
# ModelOpt's search state (amax / per-block scales, score buffers) per byte of bf16 LM linear weight,
SEARCH_STATE_PER_LM_BYTE = 0.04
# ModelOpt's kept output differences and autograd's layer activations against their byte counts ...
DIFFERENCE_FACTOR = 1.28
ACTIVATION_FACTOR = 0.8
# ... and bytes per vocabulary entry per token for the logits, their fp32 loss and gradients.
LOGIT_BYTES = 10
# A device's usable share of its free memory (CUDA context, allocator fragmentation).
USABLE_SHARE = 0.92
# Auto batching grows activations up to this much beyond weights + search state unless the user
# sets --memory-budget: fast without taking a shared GPU (3B: batch 4 without checkpointing, ~26 GiB).
DEFAULT_ACTIVATION_ROOM = 20 * GIB
MAX_AUTO_BATCH = 64
# Without --memory-budget, auto batching keeps its planned peak within this share of the device, so the
# biggest shapes keep ModelOpt's checkpointed batch 1 until measured without it (32B: 77 GiB planned > half
# of an H200).  7B without checkpointing, batch 2, is measured: 27.1 GiB against 30.7 planned (reports/README.md).
AUTO_SHARE = 0.5
# What a GPU is assumed to hold when none is visible (planning on a laptop for a GPU runner): one H200.
REFERENCE_GPU = GpuInfo(-1, "H200 (assumed: no GPU visible)", 143771 * 2**20, 143771 * 2**20)


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and activation widths of a Qwen2.5-VL, from its config (text + vision)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_lm_head: bool
    vision_params: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "model") -> "ModelShape":
        text = config.get("text_config") or config  # transformers 5 nests the text fields when saving
        vision = config.get("vision_config", {})
        try:
            return cls(name, int(text["num_hidden_layers"]), int(text["hidden_size"]), int(text["intermediate_size"]),
                       int(text["num_attention_heads"]), int(text.get("num_key_value_heads", text["num_attention_heads"])),
                       int(text.get("vocab_size", config.get("vocab_size"))),
                       bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                       _vision_params(vision))
        except (KeyError, TypeError, ValueError) as exc:
            raise ResourceError(f"Cannot plan {name}: its config lacks {exc}; is it a Qwen2.5-VL config.json?") from exc

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_out_features(self) -> int:
        """Sum of one decoder layer's linear output widths (q, k, v, o, gate, up, down)."""
        return 2 * self.hidden + 2 * self.kv_width + 2 * self.intermediate + self.hidden

    @property
    def lm_linear_params(self) -> int:
        per_layer = self.hidden * (2 * self.hidden + 2 * self.kv_width) + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_lm_head else 2)  # + lm_head when untied

    @property
    def total_params(self) -> int:
        norms_and_biases = self.layers * (2 * self.hidden + self.hidden + 2 * self.kv_width) + self.hidden
        return self.lm_linear_params + self.embedding_params + self.vision_params + norms_and_biases


def _vision_params(vision: Mapping[str, Any]) -> int:
    if not vision:
        return 0
    width, inner, depth = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["depth"])
    patch = 3 * int(vision.get("temporal_patch_size", 2)) * int(vision.get("patch_size", 14)) ** 2 * width
    block = (3 * width * width + 3 * width) + (width * width + width) + 3 * (width * inner) + 2 * inner + width + 2 * width
    merged = width * int(vision.get("spatial_merge_size", 2)) ** 2
    merger = width + merged * merged + merged + merged * int(vision["out_hidden_size"]) + int(vision["out_hidden_size"])
    return patch + depth * block + merger


@dataclass(frozen=True)
class SearchMemory:
    """The planned peak of one search on one device, by part (bytes)."""

    weights: int
    search_state: int
    per_row: int
    rows_per_step: int
    gradient_checkpointing: bool
    loss_chunk: int = 0  # one loss chunk's logits when the loss is taken in chunks (else inside per_row)

    @property
    def activations(self) -> int:
        return self.per_row * self.rows_per_step

    @property
    def peak(self) -> int:
        return self.weights + self.search_state + self.activations + self.loss_chunk


def per_row_bytes(shape: ModelShape, scheme: Scheme, *, gradient_checkpointing: bool, full_logits: bool) -> int:
    """Activation bytes one scored row of ``scheme.seq_len`` tokens keeps for the backward pass.

    Per token: ModelOpt's output differences (every linear, every candidate format, bf16) stay attached
    to their modules until the next step, with or without checkpointing; autograd keeps one layer's
    activations ((6 x hidden + 4 x intermediate) bf16, measured) for every layer, or only the layer
    inputs plus one layer under checkpointing; with ``full_logits`` the logits and their loss cost
    ~10 bytes per vocabulary entry (a chunked loss holds one chunk's instead: :func:`search_memory`).
    """
    tokens = scheme.seq_len
    candidates = len(scheme.formats)
    differences = shape.layers * candidates * shape.layer_out_features * BF16
    layer = BF16 * (6 * shape.hidden + 4 * shape.intermediate)
    logits = LOGIT_BYTES * shape.vocab if full_logits else 0
    if gradient_checkpointing:
        activations = shape.layers * BF16 * shape.hidden + layer
    else:
        activations = shape.layers * layer
    return int(tokens * (DIFFERENCE_FACTOR * differences + ACTIVATION_FACTOR * activations + logits))


def search_memory(shape: ModelShape, scheme: Scheme, *, full_logits: bool | None = None) -> SearchMemory:
    """The planned peak of ``scheme``'s search.  ``full_logits`` (default: unless the scheme takes its loss
    in chunks) plans the whole batch's logits, as the measurements before chunking had them."""
    full = not scheme.loss_in_chunks if full_logits is None else full_logits
    weights = BF16 * shape.total_params
    state = int(SEARCH_STATE_PER_LM_BYTE * BF16 * shape.lm_linear_params)
    per_row = per_row_bytes(shape, scheme, gradient_checkpointing=scheme.gradient_checkpointing, full_logits=full)
    chunk = 0 if full else LOGIT_BYTES * shape.vocab * min(LOSS_CHUNK_TOKENS, scheme.batch_size * scheme.seq_len)
    return SearchMemory(weights, state, per_row, scheme.batch_size, scheme.gradient_checkpointing, chunk)


def export_bytes(shape: ModelShape, target_bits: float) -> int:
    """The exported checkpoint's size: LM linears at the target bits, everything else bf16."""
    rest = shape.total_params - shape.lm_linear_params
    return int(shape.lm_linear_params * target_bits / 8 + BF16 * rest)


@dataclass(frozen=True)
class Plan:
    """What one search needs against what is visible, and the scheme it will run (batch, checkpointing)."""

    shape: ModelShape
    requested: Scheme
    scheme: Scheme  # the scheme to run: auto batch resolved, checkpointing decided
    memory: SearchMemory
    export_bytes: int
    device: str
    devices: tuple[str, ...]
    budget_bytes: int  # per device: what the run may use (--memory-budget, else the usable free memory)
    devices_needed: int
    fits: bool
    advice: str

    def lines(self) -> list[str]:
        m, s = self.memory, self.scheme
        rows = [
            f"model          {self.shape.name}: {self.shape.total_params / 1e9:.2f} B parameters "
            f"({self.shape.lm_linear_params / 1e9:.2f} B in LM linears), {self.shape.layers} layers",
            f"weights        {m.weights / GIB:.1f} GiB (bf16)",
            f"search peak    {m.peak / GIB:.1f} GiB = weights + {m.search_state / GIB:.1f} GiB search state + "
            f"{m.rows_per_step} x {m.per_row / GIB:.2f} GiB per {s.seq_len}-token row"
            + (f" + {m.loss_chunk / GIB:.2f} GiB of logits per loss chunk" if m.loss_chunk else ""),
            f"search         batch {s.batch_size}, {s.num_calib_steps} calibration + {s.num_score_steps} scoring steps, "
            f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
            f"export         {self.export_bytes / GIB:.1f} GiB on disk at {s.target_bits:g} bits",
            f"budget         {self.budget_bytes / GIB:.1f} GiB per device on {len(self.devices)} visible: {', '.join(self.devices) or 'none'}",
            f"needs          {self.devices_needed} {self.device.upper() if self.device == 'cpu' else 'GPU'}"
            f"{'s' if self.devices_needed != 1 else ''} of {self.budget_bytes / GIB:.0f} GiB: "
            f"{'fits' if self.fits else 'does NOT fit'} the {len(self.devices)} visible",
        ]
        if self.advice:
            rows.append(f"advice         {self.advice}")
        return rows

    def require(self) -> "Plan":
        if not self.fits:
            raise ResourceError(f"{self.shape.name} does not fit: the search needs about {self.memory.peak / GIB:.0f} GiB "
                                f"({self.devices_needed} device(s) of {self.budget_bytes / GIB:.0f} GiB), "
                                f"{len(self.devices)} visible (`vlq plan` shows the estimate). {self.advice}")
        return self


def _device_budgets(device: str, gpus: Sequence[GpuInfo], budget_gib: float | None) -> tuple[tuple[str, ...], int]:
    if device.startswith("cuda"):
        names = tuple(f"cuda:{i} {g.name} ({g.total_gib:.0f} GiB)" for i, g in enumerate(gpus))
        if budget_gib is not None:
            return names, int(budget_gib * GIB)
        if not gpus:
            return names, 0
        return names, int(min(USABLE_SHARE * (g.free_bytes if g.free_bytes is not None else g.total_bytes) for g in gpus))
    total, available = host_memory()
    budget = int(budget_gib * GIB) if budget_gib is not None else int(available * USABLE_SHARE)
    return (f"cpu ({total / GIB:.0f} GiB)",), budget


def _auto_batch(shape: ModelShape, scheme: Scheme, budget: int) -> Scheme:
    """The fastest search that fits ``budget``: rows kept, largest power-of-two batch, checkpointing off if it fits.

    The requested steps are read as rows at batch 1 (``16+16`` = 16 calibration + 16 scoring rows);
    batching them changes how many forward passes score them, not which rows are scored.
    """
    rows = max(scheme.num_calib_steps, scheme.num_score_steps)
    for checkpointing in (False, True):
        trial = scheme.with_(gradient_checkpointing=checkpointing, batch_size=1)
        fixed = search_memory(shape, trial)
        room = budget - fixed.weights - fixed.search_state - fixed.loss_chunk
        if room < fixed.per_row:
            continue
        batch = 1
        while batch * 2 <= min(rows, MAX_AUTO_BATCH) and (batch * 2) * fixed.per_row <= room:
            batch *= 2
        return trial.with_(batch_size=batch, num_calib_steps=math.ceil(scheme.num_calib_steps / batch),
                           num_score_steps=math.ceil(scheme.num_score_steps / batch))
    return scheme  # nothing fits: planned as asked, and refused below


def plan_search(
    config: Mapping[str, Any],
    scheme: Scheme,
    *,
    name: str = "model",
    device: str = "cuda",
    gpus: Sequence[GpuInfo] = (),
    budget_gib: float | None = None,
    auto_batch: bool = False,
) -> Plan:
    """Plan ``scheme`` on the model ``config`` describes, against ``gpus`` (or this machine's memory on CPU)."""
    shape = ModelShape.from_config(config, name)
    cuda = device.startswith("cuda")
    devices, budget = _device_budgets(device, gpus or ((REFERENCE_GPU,) if cuda else ()), budget_gib)
    if cuda and not gpus:
        devices = ()
    resolved = scheme
    if auto_batch:
        fixed = search_memory(shape, scheme)
        room = budget if budget_gib is not None else min(budget * AUTO_SHARE,
                                                         fixed.weights + fixed.search_state + fixed.loss_chunk
                                                         + DEFAULT_ACTIVATION_ROOM)
        resolved = _auto_batch(shape, scheme, room)
    memory = search_memory(shape, resolved)
    needed = max(1, math.ceil(memory.peak / budget)) if budget > 0 else 1
    # a split model keeps one copy of the activations on the device that holds the logits; the
    # state and weights split with the layers
    fits = budget > 0 and needed <= len(devices)
    advice = ""
    if not fits:
        have = len(devices)
        if cuda and not have:
            options = [f"run on a machine with {needed} GPU{'s' if needed > 1 else ''} of {budget / GIB:.0f} GiB (none is visible here)"]
        elif cuda and needed > have:
            options = [f"use {needed} GPUs of this size (device_map splits the model)"]
        else:
            options = ["a machine with more memory"] if not cuda else []
        if memory.activations > GIB:
            options.append("a smaller --batch-size or --seq-len")
        if scheme.method == "gradient":
            options.append("--method kl_div (no backward pass)")
        if not scheme.gradient_checkpointing:
            options.append("gradient checkpointing (--batch-size 1)")
        options.append("--memory-budget if the default budget is too cautious")
        advice = "Fix: " + "; or ".join(o for o in options if o) + "."
    return Plan(shape, scheme, resolved, memory, export_bytes(shape, scheme.target_bits), device, devices, budget,
                needed, fits, advice)
