"""Fake-quantized weights computed once for a measurement instead of once per forward."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


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
