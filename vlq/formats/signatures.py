"""Quantizer signatures: what a layer quantized in a format looks like, from the format's ModelOpt config or from
a live (ModelOpt-converted) layer, so the two can be compared (:meth:`vlq.manifest.manifest.Manifest.verify`).

A quantizer's signature is ``(num_bits, block along the input, block along the output, axis, dynamic)``:
enough to tell every registered format apart (FP8 per tensor from FP8 per channel, 1-D from 2-D blocks,
static from dynamic activations, per-tensor from per-token); ``None`` is a disabled quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QuantizerSignature:
    """The signatures of a layer's weight and input quantizers; ``None`` means disabled."""

    weight: tuple | None
    input: tuple | None


def _bits(num_bits) -> Any:
    return tuple(num_bits) if isinstance(num_bits, (list, tuple)) else num_bits


def _block(block_sizes, dim: int) -> int | None:
    """The block size along ``dim`` (-1: input features, -2: output features); ``None`` when not blocked."""
    for key, value in dict(block_sizes or {}).items():
        if key in (dim, str(dim)):
            return None if value is None else int(value)
    return None


def _axis(axis) -> Any:
    return tuple(axis) if isinstance(axis, (list, tuple)) else axis


#: The axis of a signature whose quantizer keeps one scale per row of the last dimension (per token for inputs).
PER_ROW = "per-row"


def _whole_rows(block_sizes) -> bool:
    """A block of ``None`` along the last dimension (and no other): one scale per row."""
    sizes = {str(k): v for k, v in dict(block_sizes or {}).items() if str(k).lstrip("-").isdigit()}
    return sizes == {"-1": None}


def _dynamic(block_sizes, type_: str | None = None) -> bool:
    return (type_ or dict(block_sizes or {}).get("type")) == "dynamic"


def cfg_signature(cfg) -> tuple | None:
    """The signature a ModelOpt quantizer ``cfg`` (a dict, a sequential list, or None) gives a layer."""
    if cfg is None:
        return None
    if isinstance(cfg, list):  # sequential quantizer, e.g. W4A8 AWQ weights: int4 blocks then fp8
        return tuple(cfg_signature(c) for c in cfg)
    if cfg.get("enable") is False:
        return None
    blocks = cfg.get("block_sizes")
    dynamic = _dynamic(blocks, cfg.get("type"))
    if _whole_rows(blocks):  # one scale per row of the last dimension: per token when dynamic
        return (_bits(cfg.get("num_bits")), None, None, PER_ROW, dynamic)
    return (_bits(cfg.get("num_bits")), _block(blocks, -1), _block(blocks, -2), None if blocks else _axis(cfg.get("axis")),
            dynamic)


def quantizer_signature(quantizer) -> tuple | None:
    """Signature of a live ModelOpt TensorQuantizer or SequentialQuantizer."""
    if quantizer is None:
        return None
    children = list(quantizer) if hasattr(quantizer, "__iter__") and not hasattr(quantizer, "num_bits") else None
    if children is not None:
        sigs = tuple(quantizer_signature(q) for q in children)
        return None if all(s is None for s in sigs) else sigs
    if not getattr(quantizer, "is_enabled", False):
        return None
    blocks = getattr(quantizer, "block_sizes", None)
    dynamic = _dynamic(blocks) or bool(getattr(quantizer, "_dynamic", False))
    axis = _axis(getattr(quantizer, "axis", None))
    # ModelOpt turns a block over the whole last dimension into an axis over all the others at its first forward
    if _whole_rows(blocks) or (not blocks and dynamic and isinstance(axis, tuple)):
        return (_bits(quantizer.num_bits), None, None, PER_ROW, dynamic)
    return (_bits(quantizer.num_bits), _block(blocks, -1), _block(blocks, -2), None if blocks else axis, dynamic)


def live_signature(module) -> QuantizerSignature:
    """The quantizer signature of a live (ModelOpt-converted) linear layer."""
    return QuantizerSignature(
        weight=quantizer_signature(getattr(module, "weight_quantizer", None)),
        input=quantizer_signature(getattr(module, "input_quantizer", None)),
    )
