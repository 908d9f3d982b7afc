"""The formats' grids: rounding to E4M3 / E2M1 / INT8, the spacing of each grid (for tolerances), and the
activation quantization a checkpoint prescribes (:class:`ActivationQuant`).

* FP8, W4A8_AWQ: static per-tensor FP8 E4M3, ``e4m3(clamp(x / input_scale, ±448)) * input_scale``.
* FP8_PER_CHANNEL_PER_TOKEN: dynamic per token (row of ``x``): scale ``amax_row / 448``.
* W8A8_SQ_PER_CHANNEL: static per-tensor INT8, ``clamp(round(x / input_scale), -128, 127) * input_scale``.
* NVFP4: dynamic blocks of 16; block scale ``e4m3(min(amax_b / (6*input_scale), 448)) * input_scale`` (1.0 when
  below 1e-5), values rounded to E2M1 ``{0, .5, 1, 1.5, 2, 3, 4, 6}`` with ties to the even code.
* MXFP8: dynamic blocks of 32; scale ``2**ceil(log2(amax_b / 448))`` (the export's E8M0 rule).
* W4A16_AWQ, W4A16_NVFP4, FP8_PB_WO: activations stay BF16.
* ``pre_quant_scale`` (AWQ, SmoothQuant) multiplies ``x`` first, in its dtype.  The export folds it into the
  preceding RMSNorm weight when the layers reading that norm are AWQ; SmoothQuant layers keep theirs.
* ``x / scale`` is computed as ModelOpt does, ``x * (maxbound / amax)`` with ``amax = scale * maxbound`` in
  float32: the same value and the same rounding at ties (plain ``x / scale`` moves ties).

Everything is float32 until the caller asks for another dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...runtime.errors import CheckpointError
from .algos import ACT_FP8, ACT_FP8_TOKEN, ACT_INT8, ACT_NONE, ACT_NVFP4, ACTIVATION_KINDS

E4M3_MAX = 448.0
E2M1_MAX = 6.0
# E2M1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already within ±448) to the nearest E4M3 value, ties to even."""
    return v.to(torch.float8_e4m3fn).to(torch.float32)


def pow2_floor(x: torch.Tensor) -> torch.Tensor:
    """2**floor(log2(|x|)) for normal float32 values, by masking the exponent bits (cheap on CPU)."""
    return (x.float().abs().view(torch.int32) & 0x7F800000).view(torch.float32)


def e4m3_step(code: torch.Tensor) -> torch.Tensor:
    """Spacing of the E4M3 grid at each value: 2**-9 below the normal range, 2**(e-3) above."""
    return pow2_floor(code.abs().clamp(min=2.0**-6)) * 0.125


def e2m1_round_magnitude(m: torch.Tensor) -> torch.Tensor:
    """|x|/scale to the nearest E2M1 magnitude, with ModelOpt's boundaries (ties to the even code)."""
    out = torch.full_like(m, 6.0)
    for bound, value, inclusive in ((5.0, 4.0, True), (3.5, 3.0, False), (2.5, 2.0, True), (1.75, 1.5, False),
                                    (1.25, 1.0, True), (0.75, 0.5, False), (0.25, 0.0, True)):
        below = m <= bound if inclusive else m < bound
        out = torch.where(below, torch.tensor(value, dtype=m.dtype, device=m.device), out)
    return out


def e2m1_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid at a magnitude: 0.5 up to 2, 1 up to 4, 2 above."""
    return torch.where(magnitude < 2.0, 0.5, torch.where(magnitude < 4.0, 1.0, 2.0))


def blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise CheckpointError(
            f"A tensor of last dimension {x.shape[-1]} cannot be split into blocks of {block}; the "
            "format needs the input width to be a multiple of its block."
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


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
            y, step = fp8_per_tensor(xf, torch.tensor(self.scale, dtype=torch.float32, device=x.device))
            return y.to(x.dtype), step
        if self.kind == ACT_INT8:
            y, step = int8_per_tensor(xf, torch.tensor(self.scale, dtype=torch.float32, device=x.device))
            return y.to(x.dtype), step
        if self.kind == ACT_FP8_TOKEN:
            y, step = fp8_per_token(xf)
            return y.to(x.dtype), step
        if self.kind == ACT_NVFP4:
            y, step = nvfp4_fake_quant(xf, self.scale, self.block_size or 16)
            return y.to(x.dtype), step
        y, step = mxfp8_fake_quant(xf, self.block_size or 32)
        return y.to(x.dtype), step


# ``x / scale`` is computed as ModelOpt does, ``x * (maxbound / amax)`` with ``amax = scale * maxbound``
# in float32: the same value, and the same rounding at ties (plain ``x / scale`` moves ties: BF16 inputs'
# few mantissa bits cluster on the grid's midpoints).


def fp8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mult = E4M3_MAX / (scale * E4M3_MAX)
    code = e4m3_round((x * mult).clamp(-E4M3_MAX, E4M3_MAX))
    return code * (1.0 / mult), e4m3_step(code) / mult


def fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 with one scale per row of the last dimension (a token), ``amax_row / 448``; an all-zero row keeps
    scale 1/448 as ModelOpt's eager FP8 does."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    mult = E4M3_MAX / torch.where(amax <= 2.0**-24, torch.ones_like(amax), amax)
    code = e4m3_round((x * mult).clamp(-E4M3_MAX, E4M3_MAX))
    return code * (1.0 / mult), e4m3_step(code) / mult


def int8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mult = 127.0 / (scale * 127.0)
    code = torch.round(x * mult).clamp(-128, 127)
    return code / mult, torch.ones_like(code) / mult


def nvfp4_fake_quant(x: torch.Tensor, global_scale: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level NVFP4 as ModelOpt's Triton fake quant: E4M3 block scales over a global scale."""
    shape = x.shape
    xb = blocks(x, block)
    # float32 throughout, as the kernel: (6 * gs) rounds once in float32 before the division
    gs = torch.tensor(global_scale if global_scale > 0 else 1e-12, dtype=torch.float32, device=x.device)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    scale = e4m3_round(torch.clamp(amax / (6.0 * gs), max=E4M3_MAX)) * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    magnitude = e2m1_round_magnitude(xb.abs() / scale)
    y = torch.where(xb >= 0, magnitude * scale, -magnitude * scale)
    return y.reshape(shape), (e2m1_step(magnitude) * scale).reshape(shape)


def mxfp8_fake_quant(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8: E8M0 block scale ``2**ceil(log2(amax/448))`` (the export's rule), E4M3 values."""
    shape = x.shape
    xb = blocks(x, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / E4M3_MAX)), torch.full_like(amax, -127.0))
    exponent = exponent.clamp(-127, 127)
    code = e4m3_round((xb * torch.exp2(-exponent)).clamp(-E4M3_MAX, E4M3_MAX))
    descale = torch.exp2(exponent)
    return (code * descale).reshape(shape), (e4m3_step(code) * descale).reshape(shape)
