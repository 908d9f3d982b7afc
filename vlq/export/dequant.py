"""Stage 6c — an independent dequantizer: an exported checkpoint read back into BF16 weights plus the
activation quantization its config prescribes.

Only the checkpoint's files are read — ``config.json`` (``quantization_config``),
``hf_quant_config.json`` and the safetensors — never ModelOpt, so what is rebuilt is what the files
say, not what the code that wrote them meant.  :func:`dequantize_checkpoint` returns a typed
:class:`DequantizedCheckpoint` whose layers decode lazily, one at a time (memory stays at one layer
beyond the model); :meth:`DequantizedCheckpoint.load_into` / :meth:`DequantizedCheckpoint.build_model`
put the BF16 weights into a ``transformers`` Qwen2.5-VL and add fake-quant activation hooks, so a
fidelity stage can run "the checkpoint read from disk" (issue 11, measurement point b).

On-disk layouts (ModelOpt 0.47 unified HF export, found by exporting the tiny model; ``W`` is the
weight ``[out, in]``, scales are float32 unless said otherwise, names in hub layout
``model.layers.N...`` / ``visual...``):

=====================  =====================================================================  ==================================================
quant_algo             tensors next to ``weight``                                               weight = ...
=====================  =====================================================================  ==================================================
FP8                    weight F8_E4M3 ``[out, in]``; weight_scale ``[]``; input_scale ``[]``   ``fp8 * weight_scale``
W4A16_AWQ              weight U8 ``[out/2, in]``: two signed int4 of *rows* 2j (low nibble)    ``int4 * weight_scale[:, col // group]``
(vlq ``int4_awq``)     and 2j+1 (high nibble); weight_scale ``[out, in/group]`` (= amax/7);
                       pre_quant_scale BF16 ``[in]`` (o_proj, down_proj only, see below)
W4A8_AWQ               as W4A16_AWQ plus weight_scale_2 ``[]`` (= amax/448) and input_scale     ``e4m3(bf16(int4*weight_scale)/ws2) * ws2``
W8A8_SQ_PER_CHANNEL    weight I8 ``[out, in]``; weight_scale ``[out]`` (= amax/127);              ``int8 * weight_scale[:, None]``
(vlq ``int8_sq``)      input_scale ``[]``; pre_quant_scale BF16 ``[in]`` on every layer
NVFP4                  weight U8 ``[out, in/2]``: two E2M1 codes of *columns* 2i (low nibble)   ``e2m1 * weight_scale[:, col // 16] * ws2``
                       and 2i+1 (high); weight_scale F8_E4M3 ``[out, in/16]``;
                       weight_scale_2 ``[]`` (= amax/(6*448)); input_scale ``[]`` (same form)
W4A16_NVFP4            as NVFP4 without input_scale                                             as NVFP4
MXFP8                  weight F8_E4M3 ``[out, in]``; weight_scale U8 ``[out, in/32]`` (E8M0,    ``fp8 * 2**(weight_scale - 127)``
                       biased exponent)
MIXED_PRECISION        ``quantized_layers`` names each layer's quant_algo (one of the above);   per layer
                       unlisted layers are unquantized
=====================  =====================================================================  ==================================================

Activation quantization the config prescribes (``x`` is the layer input):

* FP8, W4A8_AWQ: static per-tensor FP8 E4M3, ``e4m3(clamp(x / input_scale, ±448)) * input_scale``.
* W8A8_SQ_PER_CHANNEL: static per-tensor INT8, ``clamp(round(x / input_scale), -128, 127) * input_scale``.
* NVFP4: dynamic blocks of 16 along the last dim; block scale ``e4m3(min(amax_b / (6*input_scale), 448)) *
  input_scale`` (1.0 when below 1e-5), values rounded to E2M1 ``{0, .5, 1, 1.5, 2, 3, 4, 6}`` with
  ties to the even code (the rule of ModelOpt's Triton fake quant and of its export).  GPUs without
  native FP4 (H100/H200) serve NVFP4 weight-only in vLLM.
* MXFP8: dynamic blocks of 32; scale ``2**ceil(log2(amax_b / 448))`` (the export's E8M0 rule).
* W4A16_AWQ, W4A16_NVFP4: activations stay BF16.
* ``pre_quant_scale`` (AWQ, SmoothQuant) multiplies ``x`` (in its dtype, before any quantization).  The
  export folds it into the preceding RMSNorm weight when the layers reading that norm are AWQ
  (q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``): those layers carry no
  ``pre_quant_scale`` and the norm weight on disk already holds ``norm * pre_quant_scale`` (BF16), so
  loading the norm as stored applies it.  SmoothQuant layers keep theirs.
* ``x / scale`` is computed as ModelOpt does, ``x * (maxbound / amax)`` with ``amax = scale * maxbound``
  in float32 (plain ``x / scale`` moves ties in 0.3-1 % of BF16 inputs).
* FP8 KV cache (``kv_cache_quant_algo``): ``k_scale``/``v_scale`` are read and reported
  (:attr:`DequantizedCheckpoint.kv_cache_scales`), not simulated.

Tolerances: the decoded weight ``b`` against the live model's fake-quantized weight ``a`` =
``module.weight_quantizer(module.weight)`` (BF16), and :meth:`ActivationQuant.apply` against
``module.input_quantizer(x)``.  An element *agrees* when ``|a - b|`` is within one BF16 ulp (the fake
quant rounds its output to BF16).  ``off_grid_share`` bounds the share of elements that do not agree,
``max_steps`` every difference in steps of the format's grid at that element.  In every case below a
disagreement is one rounding decided the other way, so one step is the derived bound; the shares
are measured (tiny model, CPU lane and one H200) with about 2x margin:

* FP8 weights (:data:`WEIGHT_TOLERANCES`): the export divides the BF16 weight by a 0-dim float32 scale
  *in BF16* (torch keeps the tensor's dtype), then casts to E4M3 — two roundings where the fake quant
  does one in float32.  A BF16 quotient that lands on an E4M3 midpoint goes to the even code:
  measured 2.7 % of elements overall, up to 6.4 % in one layer (CPU; up to 5.1 % on the H200), each
  one E4M3 step off.  Bound 12.5 %, 1 step.  The decoded codes equal ``e4m3(bf16(w / s))`` exactly;
  on the random tiny model this gap alone moves the logits by ~12 % (relative L2) against ~15 % for
  FP8 vs BF16, so point b cannot match point a more closely than this for FP8.
* W4A16_AWQ, W4A8_AWQ, W8A8_SQ_PER_CHANNEL weights: the export rounds ``w / (amax/q)``, the fake quant
  ``w * (q/amax)``; float32 quotients an ulp apart move only exact .5 ties: measured <= 0.055 % per
  layer.  Bound 0.1 %, 1 step.  W4A8's FP8 step is decoded as the fake quant does it (int4 result
  rounded to BF16, then FP8 per-tensor with ``weight_scale_2``); its step counts one int4 step plus
  1.5 FP8 steps.
* NVFP4, W4A16_NVFP4 weights and NVFP4 inputs: ModelOpt's Triton kernel divides with an
  approximate float32 division, so quotients that are exactly a tie (``x/scale`` = 0.75, 1.75, 3.5, or
  a block ratio on an E4M3 midpoint) round down where the export's IEEE division rounds to even:
  measured up to 0.83 % of a layer's weights and 0.4 % of inputs (H200).  Bound 2 %, 1 step.  On CPU
  (no fake quant) the decoded weights equal this module's rule applied to the live weights, bit for bit.
* MXFP8 weights and inputs: measured identical on the H200.  Bound 0.1 %, 1 step.
* FP8 and INT8 inputs (:data:`ACTIVATION_TOLERANCES`): ``input_scale * maxbound`` can miss ModelOpt's
  float32 amax by an ulp, which moves ties: measured 0 to 0.44 % on random probes (W4A8), and up to
  3.3 % of the inputs of one layer on the 3B shape's held-out hidden states (bf16 activations divided by a
  bf16-derived scale land on E4M3 midpoints far more often than random probes).  Bound 5 %, 1 step.
  Unquantized inputs (pre_quant_scale only) must agree exactly.
* A power-of-two error in an FP8 scale is invisible except where values saturate or underflow (the
  grid is floating point); a doubled FP8 ``weight_scale`` still fails, as every weight doubles.

Everything is float32 until the caller asks for another dtype.  Nothing at module level imports
modelopt, vLLM or transformers.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.errors import CheckpointError

__all__ = [
    "ACTIVATION_KINDS",
    "SUPPORTED_ALGOS",
    "ACTIVATION_TOLERANCES",
    "WEIGHT_TOLERANCES",
    "ActivationQuant",
    "DequantizedCheckpoint",
    "DequantizedLayer",
    "LoadResult",
    "Tolerance",
    "Agreement",
    "compare_activation",
    "compare_weight",
    "differing_steps",
    "dequantize_checkpoint",
]

HF_QUANT_CONFIG = "hf_quant_config.json"
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# E2M1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Activation kinds (ActivationQuant.kind).
ACT_NONE = "none"
ACT_FP8 = "fp8_e4m3_per_tensor_static"
ACT_INT8 = "int8_per_tensor_static"
ACT_NVFP4 = "nvfp4_dynamic_block"
ACT_MXFP8 = "mxfp8_dynamic_block"
ACTIVATION_KINDS = (ACT_NONE, ACT_FP8, ACT_INT8, ACT_NVFP4, ACT_MXFP8)

# Tensors a quantized layer may carry besides ``weight``; everything else next to a quantized weight
# (except ``bias``) is refused, because the dequantizer would silently ignore it.
_COMPANIONS = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
_KV_SCALES = ("k_scale", "v_scale")


@dataclass(frozen=True)
class _Spec:
    weight_dtype: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    activation: str
    weight_block: int | None  # fixed block of the weight scales (None: per-tensor/channel or from group_size)


_SPECS: dict[str, _Spec] = {
    "FP8": _Spec("F8_E4M3", ("weight_scale", "input_scale"), (), ACT_FP8, None),
    "W4A16_AWQ": _Spec("U8", ("weight_scale",), ("pre_quant_scale",), ACT_NONE, None),
    "W4A8_AWQ": _Spec("U8", ("weight_scale", "weight_scale_2", "input_scale"), ("pre_quant_scale",), ACT_FP8, None),
    "W8A8_SQ_PER_CHANNEL": _Spec("I8", ("weight_scale", "input_scale"), ("pre_quant_scale",), ACT_INT8, None),
    "NVFP4": _Spec("U8", ("weight_scale", "weight_scale_2", "input_scale"), (), ACT_NVFP4, 16),
    "W4A16_NVFP4": _Spec("U8", ("weight_scale", "weight_scale_2"), (), ACT_NONE, 16),
    "MXFP8": _Spec("F8_E4M3", ("weight_scale",), (), ACT_MXFP8, 32),
}
SUPPORTED_ALGOS = tuple(_SPECS)
_QUANTIZED_DTYPES = frozenset({"F8_E4M3", "U8", "I8"})


# ------------------------------------------------------------------------------------------------
# Tolerances
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far a dequantized weight may sit from the fake-quantized one (see the module docstring)."""

    off_grid_share: float  # largest share of elements that may differ by more than one BF16 ulp
    max_steps: float  # largest difference of any element, in steps of the format's grid there
    why: str


_DOUBLE_ROUNDING = "export divides in BF16 by a 0-dim scale, then casts to E4M3: ties at E4M3 midpoints go to even"
_QUOTIENT_ULP = "w/(amax/q) vs w*(q/amax): float32 quotients an ulp apart move .5 ties only"
_TRITON_DIV = "ModelOpt's Triton fake quant divides approximately: exact ties round down there, to even here"
WEIGHT_TOLERANCES: dict[str, Tolerance] = {
    "FP8": Tolerance(0.125, 1.0, _DOUBLE_ROUNDING),
    "W4A16_AWQ": Tolerance(0.001, 1.0, _QUOTIENT_ULP),
    "W4A8_AWQ": Tolerance(0.001, 1.0, _QUOTIENT_ULP + "; then the same BF16 -> E4M3 rounding on both sides"),
    "W8A8_SQ_PER_CHANNEL": Tolerance(0.001, 1.0, _QUOTIENT_ULP),
    "NVFP4": Tolerance(0.02, 1.0, _TRITON_DIV),
    "W4A16_NVFP4": Tolerance(0.02, 1.0, _TRITON_DIV),
    "MXFP8": Tolerance(0.001, 1.0, "same E8M0 scale rule"),
}
_AMAX_ULP = "input_scale*maxbound can miss ModelOpt's float32 amax by an ulp, which moves ties"
ACTIVATION_TOLERANCES: dict[str, Tolerance] = {
    ACT_NONE: Tolerance(0.0, 0.0, "pre_quant_scale only, multiplied in the input dtype as ModelOpt does"),
    ACT_FP8: Tolerance(0.05, 1.0, _AMAX_ULP),
    ACT_INT8: Tolerance(0.01, 1.0, _AMAX_ULP),
    ACT_NVFP4: Tolerance(0.02, 1.0, _TRITON_DIV),
    ACT_MXFP8: Tolerance(0.001, 1.0, "same E8M0 scale rule"),
}


# ------------------------------------------------------------------------------------------------
# Grids: rounding and the spacing of each format's grid (for tolerances)
# ------------------------------------------------------------------------------------------------


def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already within ±448) to the nearest E4M3 value, ties to even."""
    return v.to(torch.float8_e4m3fn).to(torch.float32)


def _pow2_floor(x: torch.Tensor) -> torch.Tensor:
    """2**floor(log2(|x|)) for normal float32 values, by masking the exponent bits (cheap on CPU)."""
    return (x.float().abs().view(torch.int32) & 0x7F800000).view(torch.float32)


def _e4m3_step(code: torch.Tensor) -> torch.Tensor:
    """Spacing of the E4M3 grid at each value: 2**-9 below the normal range, 2**(e-3) above."""
    return _pow2_floor(code.abs().clamp(min=2.0**-6)) * 0.125


def _e2m1_round_magnitude(m: torch.Tensor) -> torch.Tensor:
    """|x|/scale to the nearest E2M1 magnitude, with ModelOpt's boundaries (ties to the even code)."""
    out = torch.full_like(m, 6.0)
    for bound, value, inclusive in ((5.0, 4.0, True), (3.5, 3.0, False), (2.5, 2.0, True), (1.75, 1.5, False),
                                    (1.25, 1.0, True), (0.75, 0.5, False), (0.25, 0.0, True)):
        below = m <= bound if inclusive else m < bound
        out = torch.where(below, torch.tensor(value, dtype=m.dtype, device=m.device), out)
    return out


def _e2m1_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid at a magnitude: 0.5 up to 2, 1 up to 4, 2 above."""
    return torch.where(magnitude < 2.0, 0.5, torch.where(magnitude < 4.0, 1.0, 2.0))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise CheckpointError(
            f"A tensor of last dimension {x.shape[-1]} cannot be split into blocks of {block}; the "
            "format needs the input width to be a multiple of its block."
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


# ------------------------------------------------------------------------------------------------
# Activation quantization
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationQuant:
    """The quantization a layer's input goes through, as the checkpoint prescribes it.

    ``scale`` is the static per-tensor ``input_scale`` (FP8: amax/448, INT8: amax/127, NVFP4: the
    global scale amax/(6*448)); ``block_size`` is set for the dynamic block formats.
    ``pre_quant_scale`` (AWQ/SmoothQuant) multiplies the input first; ``None`` when the checkpoint has
    none for this layer (not used, or folded into the preceding norm weight).
    """

    kind: str
    scale: float | None = None
    block_size: int | None = None
    pre_quant_scale: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in ACTIVATION_KINDS:
            raise CheckpointError(f"Unknown activation kind {self.kind!r}; known: {', '.join(ACTIVATION_KINDS)}.")
        if self.kind in (ACT_FP8, ACT_INT8, ACT_NVFP4) and not (self.scale is not None and self.scale > 0):
            raise CheckpointError(f"Activation kind {self.kind} needs a positive input_scale, got {self.scale}.")

    @property
    def is_quantized(self) -> bool:
        return self.kind != ACT_NONE

    def describe(self) -> str:
        parts = [self.kind]
        if self.scale is not None:
            parts.append(f"scale={self.scale:.6g}")
        if self.block_size is not None:
            parts.append(f"block={self.block_size}")
        if self.pre_quant_scale is not None:
            parts.append(f"pre_quant_scale[{self.pre_quant_scale.numel()}]")
        return " ".join(parts)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (pre_quant_scale, then quantize and dequantize); same dtype as ``x``."""
        return self.apply_with_step(x)[0]

    def apply_with_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``apply`` plus the grid spacing at each output element (``None`` when unquantized)."""
        if self.pre_quant_scale is not None:
            # in x's dtype, as ModelOpt's TensorQuantizer does, so the rounding matches
            x = x * self.pre_quant_scale.to(device=x.device, dtype=x.dtype)
        if self.kind == ACT_NONE:
            return x, None
        xf = x.float()
        if self.kind == ACT_FP8:
            y, step = _fp8_per_tensor(xf, torch.tensor(self.scale, dtype=torch.float32, device=x.device))
            return y.to(x.dtype), step
        if self.kind == ACT_INT8:
            y, step = _int8_per_tensor(xf, torch.tensor(self.scale, dtype=torch.float32, device=x.device))
            return y.to(x.dtype), step
        if self.kind == ACT_NVFP4:
            y, step = _nvfp4_fake_quant(xf, self.scale, self.block_size or 16)
            return y.to(x.dtype), step
        y, step = _mxfp8_fake_quant(xf, self.block_size or 32)
        return y.to(x.dtype), step


# ``x / scale`` is computed as ModelOpt does, ``x * (maxbound / amax)`` with ``amax = scale * maxbound``
# in float32: the same value, and the same rounding at ties.  Plain ``x / scale`` moves ties in
# 0.3-1 % of BF16 inputs (their few mantissa bits cluster on the grid's midpoints), one step each.


def _fp8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mult = E4M3_MAX / (scale * E4M3_MAX)
    code = _e4m3_round((x * mult).clamp(-E4M3_MAX, E4M3_MAX))
    return code * (1.0 / mult), _e4m3_step(code) / mult


def _int8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mult = 127.0 / (scale * 127.0)
    code = torch.round(x * mult).clamp(-128, 127)
    return code / mult, torch.ones_like(code) / mult


def _nvfp4_fake_quant(x: torch.Tensor, global_scale: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level NVFP4 as ModelOpt's Triton fake quant: E4M3 block scales over a global scale."""
    shape = x.shape
    xb = _blocks(x, block)
    # float32 throughout, as the kernel: (6 * gs) rounds once in float32 before the division
    gs = torch.tensor(global_scale if global_scale > 0 else 1e-12, dtype=torch.float32, device=x.device)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    scale = _e4m3_round(torch.clamp(amax / (6.0 * gs), max=E4M3_MAX)) * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    magnitude = _e2m1_round_magnitude(xb.abs() / scale)
    y = torch.where(xb >= 0, magnitude * scale, -magnitude * scale)
    return y.reshape(shape), (_e2m1_step(magnitude) * scale).reshape(shape)


def _mxfp8_fake_quant(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8: E8M0 block scale ``2**ceil(log2(amax/448))`` (the export's rule), E4M3 values."""
    shape = x.shape
    xb = _blocks(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / E4M3_MAX)), torch.full_like(amax, -127.0))
    exponent = exponent.clamp(-127, 127)
    code = _e4m3_round((xb * torch.exp2(-exponent)).clamp(-E4M3_MAX, E4M3_MAX))
    descale = torch.exp2(exponent)
    return (code * descale).reshape(shape), (_e4m3_step(code) * descale).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorMeta:
    key: str
    dtype: str  # safetensors dtype string: BF16, F32, F8_E4M3, U8, I8
    shape: tuple[int, ...]
    file: Path


class _TensorStore:
    """Key -> tensor over a checkpoint's safetensors files; file handles opened on first use."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no *.safetensors files; point at an exported checkpoint folder.")
        self.meta: dict[str, _TensorMeta] = {}
        for file in files:
            with safe_open(file, "pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    self.meta[key] = _TensorMeta(key, sl.get_dtype(), tuple(sl.get_shape()), file)
        self._handles: dict[Path, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        meta = self.meta.get(key)
        if meta is None:
            raise CheckpointError(f"Tensor {key} is missing from the checkpoint.")
        handle = self._handles.get(meta.file)
        if handle is None:
            handle = self._handles[meta.file] = self._safe_open(meta.file, "pt")
        return handle.get_tensor(key)


@dataclass(frozen=True)
class _QuantConfig:
    quant_algo: str | None
    exclude_modules: tuple[str, ...]
    layers: dict[str, dict[str, Any]]  # MIXED_PRECISION: layer -> its entry (quant_algo, group_size...)
    group_size: int | None
    kv_cache_quant_algo: str | None
    source: str

    def algo_for(self, name: str) -> str | None:
        if self.quant_algo is None:
            return None
        if self.quant_algo == "MIXED_PRECISION":
            entry = self.layers.get(name)
            return None if entry is None else entry.get("quant_algo")
        if any(name == p or fnmatch.fnmatch(name, p) for p in self.exclude_modules):
            return None
        return self.quant_algo

    def group_size_for(self, name: str) -> int | None:
        entry = self.layers.get(name) or {}
        value = entry.get("group_size", self.group_size)
        return int(value) if value else None


def _read_quant_config(path: Path) -> _QuantConfig:
    """The quantization config, from ``hf_quant_config.json`` (ModelOpt's own) or config.json's copy."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; point at an exported checkpoint folder.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON ({exc}); re-export the checkpoint.") from exc
    in_config = config.get("quantization_config")
    hf_file = path / HF_QUANT_CONFIG
    raw: dict[str, Any] | None = None
    source = "none"
    if hf_file.is_file():
        try:
            raw = json.loads(hf_file.read_text()).get("quantization")
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{hf_file} is not readable JSON ({exc}); re-export the checkpoint.") from exc
        source = HF_QUANT_CONFIG
    if raw is None and in_config is not None:
        method = in_config.get("quant_method")
        if method != "modelopt":
            # other producers (compressed-tensors, AWQ, GPTQ...) pack differently under the same names
            raise CheckpointError(
                f"{config_file}: quantization_config has quant_method={method!r}; vlq.export.dequant reads ModelOpt "
                "exports (quant_method 'modelopt'). Re-export with vlq."
            )
        raw, source = in_config, "config.json"
    if raw is None:
        return _QuantConfig(None, (), {}, None, None, source)
    algo = raw.get("quant_algo")
    if in_config is not None and source == HF_QUANT_CONFIG and in_config.get("quant_algo") != algo:
        # vLLM reads config.json, ModelOpt wrote hf_quant_config.json: disagreeing copies serve differently
        raise CheckpointError(
            f"{path}: config.json quantization_config has quant_algo={in_config.get('quant_algo')!r} but "
            f"{HF_QUANT_CONFIG} has {algo!r}; re-export so both say the same."
        )
    layers = {str(k): dict(v) for k, v in (raw.get("quantized_layers") or {}).items()}
    excludes = tuple(raw.get("exclude_modules") or raw.get("ignore") or ())
    for name, entry in ([("(checkpoint)", {"quant_algo": algo})] if algo != "MIXED_PRECISION" else []) + list(layers.items()):
        _require_known(path, name, entry.get("quant_algo"))
    return _QuantConfig(algo, excludes, layers, raw.get("group_size"), raw.get("kv_cache_quant_algo"), source)


def _require_known(path: Path, layer: str, algo: str | None) -> None:
    if algo is None or algo in _SPECS:
        return
    raise CheckpointError(
        f"{path}: quant_algo {algo!r} ({layer}) is not one vlq.export.dequant reads; known: "
        f"{', '.join(SUPPORTED_ALGOS)} (and MIXED_PRECISION of them). Export with one of vlq's formats."
    )


# ------------------------------------------------------------------------------------------------
# Weight decoding
# ------------------------------------------------------------------------------------------------


def _unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """U8 ``[out/2, in]`` -> int ``[out, in]``: rows 2j (low nibble) and 2j+1 (high), signed."""
    p = packed.view(torch.uint8).to(torch.int16)
    low, high = p & 0x0F, (p >> 4) & 0x0F
    rows = torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.float32)


def _unpack_e2m1_cols(packed: torch.Tensor) -> torch.Tensor:
    """U8 ``[out, in/2]`` -> float ``[out, in]``: columns 2i (low nibble) and 2i+1 (high)."""
    p = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((p & 0x0F, (p >> 4) & 0x0F), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return torch.tensor(_E2M1_VALUES, dtype=torch.float32)[codes]


def _per_block(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Expand ``[out, in/block]`` scales to ``[out, in]``."""
    return scale.repeat_interleave(in_features // scale.shape[-1], dim=-1)


def _decode(algo: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, grid spacing per element), both float32 ``[out, in]``."""
    w = tensors["weight"]
    ws = tensors["weight_scale"]
    if algo == "FP8":
        code = w.to(torch.float32)
        scale = ws.float()
        return code * scale, _e4m3_step(code) * scale
    if algo == "MXFP8":
        code = w.to(torch.float32)
        descale = _per_block(torch.exp2(ws.view(torch.uint8).float() - 127.0), w.shape[-1])
        return code * descale, _e4m3_step(code) * descale
    if algo == "W8A8_SQ_PER_CHANNEL":
        code = w.to(torch.float32)
        scale = ws.float().reshape(-1, 1).expand_as(code)
        return code * scale, scale.clone()
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        code = _unpack_int4_rows(w)
        scale = _per_block(ws.float(), code.shape[-1])
        weight = code * scale
        if algo == "W4A16_AWQ":
            return weight, scale
        ws2 = tensors["weight_scale_2"].float()
        # the int4 result is rounded to the model dtype (BF16) before its FP8 rounding, as in a BF16
        # model's fake quant; in float32 1-2 % of the FP8 codes land one step away
        result, fp8_step = _fp8_per_tensor(weight.to(torch.bfloat16).float(), ws2)
        # a moved int4 tie moves the result by one int4 step plus the two FP8 roundings (<= 1.5 steps here)
        return result, scale + 1.5 * fp8_step
    if algo in ("NVFP4", "W4A16_NVFP4"):
        values = _unpack_e2m1_cols(w)
        scale = _per_block(ws.to(torch.float32) * tensors["weight_scale_2"].float(), values.shape[-1])
        return values * scale, _e2m1_step(values.abs()) * scale
    raise CheckpointError(f"quant_algo {algo!r} has no decoder; known: {', '.join(SUPPORTED_ALGOS)}.")


# ------------------------------------------------------------------------------------------------
# Result types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DequantizedLayer:
    """One quantized linear of the checkpoint, decoded on demand (checkpoint naming)."""

    name: str
    quant_algo: str
    out_features: int
    in_features: int
    weight_block_size: int | None  # block of the weight scales along ``in`` (None: per-tensor or per-channel)
    activation: ActivationQuant
    _tensors: tuple[str, ...] = field(repr=False)  # checkpoint keys this layer consumes
    _store: _TensorStore = field(repr=False, compare=False)

    def _read(self) -> dict[str, torch.Tensor]:
        return {key.rpartition(".")[2]: self._store.get(key) for key in self._tensors}

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``[out, in]``, read from disk now."""
        return _decode(self.quant_algo, self._read())[0].to(dtype)

    def weight_and_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized weight and the spacing of its format's grid at each element (float32)."""
        return _decode(self.quant_algo, self._read())

    def describe(self) -> str:
        block = f" block {self.weight_block_size}" if self.weight_block_size else ""
        return f"{self.name}: {self.quant_algo} [{self.out_features}x{self.in_features}]{block}; input {self.activation.describe()}"


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`DequantizedCheckpoint.load_into` did to a model."""

    model: nn.Module
    modules: dict[str, str]  # checkpoint layer name -> model module name, for every quantized layer
    hooked_modules: tuple[str, ...]  # model-side names whose inputs are fake-quantized
    tied: tuple[str, ...]  # model tensors not on disk because they share storage with a loaded one
    hooks: tuple[Any, ...] = field(repr=False, compare=False)

    @property
    def quantized_modules(self) -> tuple[str, ...]:
        return tuple(self.modules.values())

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


@dataclass(frozen=True)
class DequantizedCheckpoint:
    """An exported checkpoint re-read from disk: its quantized layers and everything else, lazily."""

    path: Path
    quant_algo: str | None  # FP8, ..., MIXED_PRECISION, or None for an unquantized checkpoint
    config_source: str  # which file the quantization config came from
    layers: tuple[DequantizedLayer, ...]
    unquantized_not_excluded: tuple[str, ...]  # BF16 2-D weights a single-format config does not exclude
    kv_cache_quant_algo: str | None
    kv_cache_scales: dict[str, float] = field(compare=False)
    _plain: tuple[str, ...] = field(repr=False, default=())  # keys loaded as stored (norms, biases, vision...)
    _store: _TensorStore | None = field(repr=False, compare=False, default=None)

    def layer(self, name: str) -> DequantizedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{name} is not a quantized layer of {self.path}; quantized: {len(self.layers)} layers")

    def algo_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.quant_algo] = counts.get(layer.quant_algo, 0) + 1
        return dict(sorted(counts.items()))

    def _files(self) -> _TensorStore:
        if self._store is None:
            raise CheckpointError(f"{self.path}: this DequantizedCheckpoint has no files attached; use dequantize_checkpoint().")
        return self._store

    def keys(self) -> tuple[str, ...]:
        """The tensor names :meth:`iter_state_dict` yields (checkpoint naming), without reading any."""
        return (*self._plain, *(layer.name + ".weight" for layer in self.layers))

    def iter_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
        """Every model tensor in checkpoint naming, quantized weights dequantized, scales dropped; one at a time."""
        for key in self._plain:
            yield key, _as(self._files().get(key), dtype)
        for layer in self.layers:
            yield layer.name + ".weight", layer.weight(dtype)

    def load_into(self, model: nn.Module, *, activations: bool = True) -> LoadResult:
        """Copy the checkpoint into ``model`` (a fresh Qwen2.5-VL of the same config), layer by layer.

        Names map from the hub layout (``model.layers.N``, ``visual.``) to transformers-5 modules
        (``model.language_model.layers.N``, ``model.visual.``).  Every model parameter and persistent
        buffer must be filled (tied ones excepted) and every checkpoint tensor used, else
        ``CheckpointError``.  With ``activations``, each quantized linear gets a forward pre-hook that
        applies its :class:`ActivationQuant`.
        """
        store = self._files()
        targets = model.state_dict(keep_vars=True)
        filled: dict[str, torch.Tensor] = {}
        unused: list[str] = []
        quantized: list[str] = []

        def put(ckpt_key: str, value: Callable[[torch.dtype], torch.Tensor]) -> str | None:
            model_key = _model_key(ckpt_key, targets)
            if model_key is None:
                unused.append(ckpt_key)
                return None
            target = targets[model_key]
            tensor = value(target.dtype)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{self.path}: {ckpt_key} has shape {tuple(tensor.shape)} but the model's {model_key} is "
                    f"{tuple(target.shape)}; load it into a model built from this checkpoint's config.json."
                )
            with torch.no_grad():
                target.data.copy_(tensor.to(target.device))
            filled[model_key] = target
            return model_key

        for key in self._plain:
            put(key, lambda dtype, key=key: _as(store.get(key), dtype))
        for layer in self.layers:
            model_key = put(layer.name + ".weight", layer.weight)
            if model_key is not None:
                quantized.append(model_key[: -len(".weight")])
        if unused:
            raise CheckpointError(
                f"{self.path}: {len(unused)} checkpoint tensors have no place in the model (first: {unused[0]}); "
                "load it into a Qwen2.5-VL built from this checkpoint's config.json."
            )
        loaded_storage = {t.data_ptr() for t in filled.values()}
        tied = tuple(k for k, t in targets.items() if k not in filled and t.data_ptr() in loaded_storage)
        missing = [k for k in targets if k not in filled and k not in tied]
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} model tensors are not in the checkpoint (first: {missing[0]}); "
                "the checkpoint is incomplete or belongs to another architecture."
            )
        hooks, hooked = [], []
        if activations:
            for module_name, layer in zip(quantized, self.layers, strict=True):
                act = layer.activation
                if act.kind == ACT_NONE and act.pre_quant_scale is None:
                    continue
                module = model.get_submodule(module_name)
                hooks.append(module.register_forward_pre_hook(_activation_hook(act)))
                hooked.append(module_name)
        modules = {layer.name: module_name for layer, module_name in zip(self.layers, quantized, strict=True)}
        return LoadResult(model, modules, tuple(hooked), tied, tuple(hooks))

    def build_model(self, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    activations: bool = True) -> LoadResult:
        """A fresh ``Qwen2_5_VLForConditionalGeneration`` from config.json, loaded with :meth:`load_into`."""
        from ..runtime import compat as _compat

        _compat.apply_torchvision_schema_shim()  # transformers' image utilities import torchvision
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config_dict = json.loads((self.path / "config.json").read_text())
        if config_dict.get("model_type") != "qwen2_5_vl":
            raise CheckpointError(
                f"{self.path} holds model_type={config_dict.get('model_type')!r}; build_model makes a Qwen2.5-VL. "
                "Use load_into with a model of that architecture instead."
            )
        config_dict.pop("quantization_config", None)  # the weights arrive dequantized
        config = Qwen2_5_VLConfig.from_dict(config_dict)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.eval()
        return self.load_into(model, activations=activations)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _model_key(ckpt_key: str, targets: dict[str, Any]) -> str | None:
    """A checkpoint key (hub layout or transformers-5 layout) -> the model's state-dict key."""
    candidates = [ckpt_key]
    if ckpt_key.startswith("model.") and not ckpt_key.startswith(("model.language_model.", "model.visual.")):
        candidates.append("model.language_model." + ckpt_key[len("model."):])
    if ckpt_key.startswith("visual."):
        candidates.append("model." + ckpt_key)
    return next((c for c in candidates if c in targets), None)


def _activation_hook(act: ActivationQuant):
    def hook(_module, args):
        if not args:
            return None
        return (act.apply(args[0]), *args[1:])

    return hook


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint
# ------------------------------------------------------------------------------------------------


def dequantize_checkpoint(path: str | os.PathLike) -> DequantizedCheckpoint:
    """Read an exported checkpoint folder: quantization config, tensor index and per-layer formats.

    No weight is decoded here (only the scalar scales an :class:`ActivationQuant` needs and the
    ``pre_quant_scale`` vectors); :meth:`DequantizedLayer.weight` reads and decodes one layer at a
    time.  Raises :class:`~vlq.runtime.errors.CheckpointError` in one line for an unknown ``quant_algo``, a
    missing or unexpected tensor, a quantized weight the config does not account for, or a shape that
    does not fit its format.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; point at an exported checkpoint folder.")
    config = _read_quant_config(path)
    store = _TensorStore(path)

    groups: dict[str, dict[str, _TensorMeta]] = {}
    for key, meta in store.meta.items():
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, {})[leaf] = meta

    layers: list[DequantizedLayer] = []
    plain: list[str] = []
    kv_scales: dict[str, float] = {}
    not_excluded: list[str] = []
    for module in sorted(groups):
        tensors = groups[module]
        companions = [leaf for leaf in tensors if leaf in _COMPANIONS]
        weight = tensors.get("weight")
        for leaf in _KV_SCALES:
            if leaf in tensors:
                kv_scales[f"{module}.{leaf}"] = float(store.get(f"{module}.{leaf}").float().reshape(-1)[0])
        quantized_weight = weight is not None and weight.dtype in _QUANTIZED_DTYPES
        if not quantized_weight and not companions:
            plain.extend(m.key for leaf, m in sorted(tensors.items()) if leaf not in _KV_SCALES)
            if (weight is not None and len(weight.shape) == 2 and config.quant_algo not in (None, "MIXED_PRECISION")
                    and config.algo_for(module) is not None):
                not_excluded.append(module)
            continue
        if weight is None:
            raise CheckpointError(
                f"{path}: {module} has {', '.join(sorted(companions))} but no {module}.weight; the checkpoint "
                "is incomplete, re-export it."
            )
        algo = config.algo_for(module)
        if algo is None:
            why = "lists no quant_algo for it" if config.quant_algo else "has no quantization config"
            raise CheckpointError(
                f"{path}: {module}.weight is stored as {weight.dtype} with scales {sorted(companions)} but the "
                f"config ({config.source}) {why}; re-export so config and tensors agree."
            )
        layers.append(_layer(path, module, algo, tensors, config, store))
        plain.extend(m.key for leaf, m in sorted(tensors.items()) if leaf == "bias")

    if config.quant_algo == "MIXED_PRECISION":
        found = {layer.name for layer in layers}
        absent = sorted(set(config.layers) - found)
        if absent:
            raise CheckpointError(
                f"{path}: quantized_layers lists {len(absent)} layers with no quantized weight on disk "
                f"(first: {absent[0]}); the checkpoint is incomplete, re-export it."
            )
    return DequantizedCheckpoint(
        path=path,
        quant_algo=config.quant_algo,
        config_source=config.source,
        layers=tuple(layers),
        unquantized_not_excluded=tuple(not_excluded),
        kv_cache_quant_algo=config.kv_cache_quant_algo,
        kv_cache_scales=kv_scales,
        _plain=tuple(plain),
        _store=store,
    )


def _scalar(store: _TensorStore, meta: _TensorMeta, path: Path) -> float:
    value = store.get(meta.key).float().reshape(-1)
    if value.numel() != 1:
        raise CheckpointError(f"{path}: {meta.key} has shape {meta.shape}, expected a per-tensor scale (one value).")
    if not math.isfinite(float(value[0])) or float(value[0]) <= 0:
        raise CheckpointError(f"{path}: {meta.key} is {float(value[0])}, expected a positive finite scale.")
    return float(value[0])


def _layer(path: Path, module: str, algo: str, tensors: dict[str, _TensorMeta], config: _QuantConfig,
           store: _TensorStore) -> DequantizedLayer:
    spec = _SPECS[algo]
    weight = tensors["weight"]
    missing = [leaf for leaf in spec.required if leaf not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: {module} is {algo} but {', '.join(f'{module}.{m}' for m in missing)} is missing; "
            "the checkpoint is incomplete, re-export it."
        )
    allowed = {"weight", "bias", *spec.required, *spec.optional, *_KV_SCALES}
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise CheckpointError(
            f"{path}: {module} is {algo} but also carries {', '.join(f'{module}.{e}' for e in extra)}, which "
            f"{algo} does not use; the config and the tensors disagree, re-export the checkpoint."
        )
    if weight.dtype != spec.weight_dtype:
        raise CheckpointError(
            f"{path}: {module}.weight is {weight.dtype} but {algo} stores {spec.weight_dtype}; config and tensors disagree."
        )
    if len(weight.shape) != 2:
        raise CheckpointError(f"{path}: {module}.weight has shape {weight.shape}; only 2-D linear weights are read.")
    rows, cols = weight.shape
    out_f, in_f = (rows * 2, cols) if algo in ("W4A16_AWQ", "W4A8_AWQ") else (
        (rows, cols * 2) if algo in ("NVFP4", "W4A16_NVFP4") else (rows, cols))
    ws = tensors["weight_scale"].shape
    block: int | None = spec.weight_block
    if algo in ("FP8",) and ws not in ((), (1,)):
        raise CheckpointError(f"{path}: {module}.weight_scale has shape {ws}; FP8 here is per-tensor (shape []).")
    elif algo == "W8A8_SQ_PER_CHANNEL" and ws not in ((out_f,), (out_f, 1)):
        raise CheckpointError(f"{path}: {module}.weight_scale has shape {ws}, expected [{out_f}] (per output channel).")
    elif algo in ("W4A16_AWQ", "W4A8_AWQ", "NVFP4", "W4A16_NVFP4", "MXFP8"):
        if len(ws) != 2 or ws[0] != out_f or ws[1] == 0 or in_f % ws[1]:
            raise CheckpointError(
                f"{path}: {module}.weight_scale has shape {ws}; {algo} needs [{out_f}, {in_f}/block]."
            )
        found = in_f // ws[1]
        expected = block or config.group_size_for(module)
        if expected is not None and found != expected:
            raise CheckpointError(
                f"{path}: {module}.weight_scale implies blocks of {found} but {algo} "
                f"{'uses' if block else 'is configured with group_size'} {expected}; config and tensors disagree."
            )
        block = found
    for leaf in ("input_scale", "weight_scale_2"):
        if leaf in tensors:
            _scalar(store, tensors[leaf], path)  # validates now: a bad scale fails at read, not mid-forward
    pqs = None
    if "pre_quant_scale" in tensors:
        pqs = store.get(tensors["pre_quant_scale"].key).reshape(-1)
        if pqs.numel() != in_f:
            raise CheckpointError(
                f"{path}: {module}.pre_quant_scale has {pqs.numel()} values but the layer has {in_f} inputs."
            )
    kind = spec.activation
    scale = _scalar(store, tensors["input_scale"], path) if kind in (ACT_FP8, ACT_INT8, ACT_NVFP4) else None
    act_block = 16 if kind == ACT_NVFP4 else (32 if kind == ACT_MXFP8 else None)
    activation = ActivationQuant(kind, scale, act_block, pqs)
    keys = tuple(tensors[leaf].key for leaf in ("weight", *spec.required) if leaf in tensors
                 and leaf not in ("input_scale", "pre_quant_scale"))
    return DequantizedLayer(module, algo, out_f, in_f, block, activation, keys, store)


# ------------------------------------------------------------------------------------------------
# Agreement with a reference weight
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """A decoded weight, or a layer's fake-quantized input, against a reference (e.g. ModelOpt's fake quant)."""

    name: str
    quant_algo: str
    what: str  # "weight" or "input"
    elements: int
    differing: int  # elements further apart than one BF16 ulp
    max_steps: float  # largest difference in steps of the format's grid at that element
    tolerance: Tolerance

    @property
    def differing_share(self) -> float:
        return self.differing / self.elements if self.elements else 0.0

    @property
    def ok(self) -> bool:
        return self.differing_share <= self.tolerance.off_grid_share and self.max_steps <= self.tolerance.max_steps

    def describe(self) -> str:
        verdict = "agrees" if self.ok else "MISMATCH"
        return (
            f"{self.name} {self.what} ({self.quant_algo}): {verdict}: {self.differing}/{self.elements} elements differ "
            f"({self.differing_share:.3%}, allowed {self.tolerance.off_grid_share:.1%}), max {self.max_steps:.3g} "
            f"steps (allowed {self.tolerance.max_steps:g})"
        )


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return _pow2_floor(x.abs().clamp(min=2.0**-126)) * 2.0**-7


def differing_steps(value: torch.Tensor, reference: torch.Tensor, step: torch.Tensor | None) -> tuple[int, float]:
    """(elements further apart than one BF16 ulp, largest difference in grid steps; inf without a grid)."""
    a, b = value.detach().float().cpu(), reference.detach().float().cpu()
    diff = (a - b).abs()
    ulp = _bf16_ulp(torch.maximum(a.abs(), b.abs()))
    differing = diff > ulp
    if not differing.any():
        return 0, 0.0
    if step is None:  # an unquantized input has no grid: any difference is out of tolerance
        return int(differing.sum()), math.inf
    # a difference of one step plus BF16 rounding counts as one step
    return int(differing.sum()), float(((diff - ulp).clamp(min=0) / step.float().cpu()).max())


def _check_shape(layer: DequantizedLayer, what: str, got: torch.Tensor, reference: torch.Tensor) -> None:
    if tuple(reference.shape) != tuple(got.shape):
        raise CheckpointError(
            f"{layer.name}: the reference {what} has shape {tuple(reference.shape)}, the checkpoint's {tuple(got.shape)}."
        )


def compare_weight(layer: DequantizedLayer, reference: torch.Tensor, tolerance: Tolerance | None = None) -> Agreement:
    """Compare ``layer``'s dequantized weight with ``reference`` under its format's weight tolerance."""
    weight, step = layer.weight_and_step()
    _check_shape(layer, "weight", weight, reference)
    differing, steps = differing_steps(weight, reference, step)
    return Agreement(layer.name, layer.quant_algo, "weight", weight.numel(), differing, steps,
                     tolerance or WEIGHT_TOLERANCES[layer.quant_algo])


def compare_activation(layer: DequantizedLayer, x: torch.Tensor, reference: torch.Tensor,
                       tolerance: Tolerance | None = None) -> Agreement:
    """Compare ``layer.activation.apply(x)`` with ``reference`` (e.g. ``input_quantizer(x)``)."""
    y, step = layer.activation.apply_with_step(x.detach().cpu())
    _check_shape(layer, "input", y, reference)
    differing, steps = differing_steps(y, reference, step)
    return Agreement(layer.name, layer.quant_algo, "input", y.numel(), differing, steps,
                     tolerance or ACTIVATION_TOLERANCES[layer.activation.kind])
