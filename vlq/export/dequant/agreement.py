"""A decoded weight, or a layer's fake-quantized input, against a reference (ModelOpt's fake quant), in steps
of the format's grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...runtime.errors import CheckpointError
from .algos import ACTIVATION_TOLERANCES, WEIGHT_TOLERANCES, Tolerance
from .grids import pow2_floor
from .layers import DequantizedLayer


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
    return pow2_floor(x.abs().clamp(min=2.0**-126)) * 2.0**-7


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
