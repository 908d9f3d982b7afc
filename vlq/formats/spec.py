"""What vlq knows about one quantization format, as one frozen :class:`QuantFormat`.

A format module under :mod:`vlq.formats.catalog` fills one in; :mod:`vlq.formats.registry` collects them and
every other module asks the registry.  Nothing here imports torch or ModelOpt at module level: the CLI
validates formats before any heavy import (ModelOpt is read only by the methods that need it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .signatures import QuantizerSignature, cfg_signature

#: The shapes of the tensors next to ``weight`` in an export, from the (packed) weight's rows and columns and
#: the config's group size; ``None`` where there is no shape to expect (a partial block, a layout vlq has not
#: measured).
ScaleShapes = Callable[[int, int, "int | None"], "dict[str, tuple[int, ...]] | None"]


@dataclass(frozen=True)
class OnDiskSpec:
    """The tensors ModelOpt 0.47's unified HF export writes for one layer in this format.

    ``weight_dtypes``: the safetensors dtypes of ``weight``; ``required``: tensors that must sit next to it;
    ``scale_shapes``: the shape of each of them (see :data:`ScaleShapes`), pinned on real exports by the tests.
    """

    weight_dtypes: tuple[str, ...]
    required: tuple[str, ...]
    scale_shapes: ScaleShapes | None = None

    def shapes(self, weight_shape: tuple[int, ...], group_size: int | None = None) -> dict[str, tuple[int, ...]] | None:
        if self.scale_shapes is None or len(weight_shape) != 2:
            return None
        rows, cols = weight_shape
        return self.scale_shapes(rows, cols, group_size)


@dataclass(frozen=True)
class LogprobTolerance:
    """How close a quantized model's greedy steps must stay to the BF16 reference's when served.

    ``max_abs_logprob`` bounds |Δ logprob| of the reference's greedy token at every compared step.
    With ``same_tokens`` the greedy tokens must agree, except at a near-tie: a step where the
    reference itself ranks the quantized model's choice within ``2 * max_abs_logprob`` of its own
    top-1 (random-weight models have nearly flat distributions).  Comparison stops at the first
    differing token, since the contexts diverge after it.
    """

    same_tokens: bool
    max_abs_logprob: float


@dataclass(frozen=True)
class VllmSupport:
    """How vLLM's ModelOpt loader serves the format's ``quant_algo``.

    ``methods``: quant-method class names a served layer may carry (vLLM 0.32 has one generic
    ``ModelOptLinearMethod``; older releases had per-format classes); ``weight_dtypes``: the torch dtype of a
    served layer's weight; ``cpu_kernels`` / ``cuda_kernels``: whether that platform's vLLM can run it (without
    kernels a checkpoint is resolved per layer only); ``in_mixed_precision``: accepted per layer inside
    ``MIXED_PRECISION``; ``reference``: how close greedy outputs stay to BF16.
    """

    methods: tuple[str, ...]
    weight_dtypes: tuple[str, ...]
    cpu_kernels: bool
    cuda_kernels: bool
    in_mixed_precision: bool
    reference: LogprobTolerance

    def runs_on(self, device: str) -> bool:
        return self.cpu_kernels if device == "cpu" else self.cuda_kernels


@dataclass(frozen=True)
class ExportAgreement:
    """How far the checkpoint read back from disk (measurement point b) may sit from the fake-quantized model
    (point a), as a multiple of how far quantization moved the model: KLD(a || b) <= factor * KLD(BF16 || a).

    The factor follows from what the export encodes differently from ModelOpt's fake quant (the dequantizer
    bounds it per tensor): an element one grid step away carries about 12x the energy of uniform rounding
    error (step² against step²/12), so a format whose export moves a share ``s`` of its elements by one step
    gets about ``12 s``.  ``why`` says what differs for this format.
    """

    factor: float
    why: str


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format: its ModelOpt config, what it costs, where it fits, what its export holds,
    where vLLM serves it, how its export may differ from the search's model, and its colour in plots.

    ``export_quant_algo`` is what ModelOpt's unified HF export writes as ``quant_algo`` for a layer in this
    format.  ``bits`` is the bits per weight AutoQuant's cost model counts (NVFP4: 4.5 with its scales), kept
    here so schemes validate without importing ModelOpt; tests pin it to ModelOpt's live
    ``QuantRecipe(config).compression * 16``.  ``folds_weights``: AWQ and SmoothQuant fold their per-channel
    smoothing into the BF16 weights when applied, so switching a group away afterwards does not give back the
    original weights.  ``block_size``: weights are quantized in blocks of this many input features (``None``:
    per tensor or channel); ModelOpt's export packs whole blocks only and vLLM's block kernels refuse other
    input sizes.  ``out_multiple``: output features must be a multiple of this (INT4 packs two output channels per
    byte).  ``order`` sorts the registry.
    """

    name: str
    modelopt_config: str
    export_quant_algo: str
    needs_cuda: bool
    description: str
    bits: float
    on_disk: OnDiskSpec
    export_agreement: ExportAgreement
    color: str
    order: int
    vllm: VllmSupport | None = None  # None: vLLM's ModelOpt loader refuses the quant_algo
    folds_weights: bool = False
    block_size: int | None = None
    out_multiple: int = 1

    @property
    def vllm_servable(self) -> bool:
        return self.vllm is not None

    @property
    def config(self) -> dict[str, Any]:
        from modelopt.torch.quantization import config as mtq_config

        return copy.deepcopy(getattr(mtq_config, self.modelopt_config))

    @property
    def calibration_by_batch(self) -> bool:
        """AWQ searches its scales batch by batch, so other batching calibrates differently; max and
        SmoothQuant calibration reduce every forward by a running max (vlq.search.search.calibration_forwards)."""
        return "awq" in str(self.config.get("algorithm", "")).lower()

    def modelopt_bits(self) -> float:
        """The same figure as :attr:`bits`, read from the installed ModelOpt (what :attr:`bits` must equal)."""
        from modelopt.torch.quantization.algorithms import QuantRecipe

        return QuantRecipe(self.modelopt_config).compression * 16

    def quantizer_cfgs(self) -> tuple[Any, Any]:
        """The (weight, input) quantizer ``cfg`` of a searched linear layer in this format, as ModelOpt's config
        gives them (the last matching entry wins); ``None`` for a disabled quantizer."""
        weight = input_ = None
        for entry in self.config["quant_cfg"]:
            if entry.get("parent_class"):
                continue
            pattern = entry.get("quantizer_name")
            if pattern == "*weight_quantizer":
                weight = None if entry.get("enable") is False else entry.get("cfg")
            elif pattern == "*input_quantizer":
                input_ = None if entry.get("enable") is False else entry.get("cfg")
        return weight, input_

    def quantizer_signature(self) -> QuantizerSignature:
        """What a layer quantized in this format looks like (see :func:`vlq.formats.signatures.live_signature`)."""
        weight, input_ = self.quantizer_cfgs()
        return QuantizerSignature(weight=cfg_signature(weight), input=cfg_signature(input_))
