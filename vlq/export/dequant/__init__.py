"""An independent dequantizer: an exported checkpoint read back into BF16 weights plus the activation
quantization its config prescribes (measurement point b).

Only the checkpoint's files are read (``config.json``'s ``quantization_config``, ``hf_quant_config.json``, the
safetensors), never ModelOpt, so what is rebuilt is what the files say, not what the code that wrote them
meant.  :mod:`.algos` holds what each quant_algo stores and the tolerances, :mod:`.grids` the rounding rules
and activation quantization, :mod:`.files` the reading, :mod:`.layers` one layer's checks and decoding,
:mod:`.checkpoint` the whole export (:func:`dequantize_checkpoint`), :mod:`.agreement` the comparison with a
reference.  The names below load their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    **dict.fromkeys(("ACTIVATION_KINDS", "SUPPORTED_ALGOS", "ACTIVATION_TOLERANCES", "WEIGHT_TOLERANCES", "Tolerance",
                     "HF_QUANT_CONFIG"), "algos"),
    **dict.fromkeys(("ActivationQuant",), "grids"),
    **dict.fromkeys(("DequantizedLayer",), "layers"),
    **dict.fromkeys(("DequantizedCheckpoint", "LoadResult", "dequantize_checkpoint"), "checkpoint"),
    **dict.fromkeys(("Agreement", "compare_activation", "compare_weight", "differing_steps"), "agreement"),
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .agreement import Agreement, compare_activation, compare_weight, differing_steps  # noqa: F401
    from .algos import (  # noqa: F401
        ACTIVATION_KINDS, ACTIVATION_TOLERANCES, HF_QUANT_CONFIG, SUPPORTED_ALGOS, WEIGHT_TOLERANCES, Tolerance,
    )
    from .checkpoint import DequantizedCheckpoint, LoadResult, dequantize_checkpoint  # noqa: F401
    from .grids import ActivationQuant  # noqa: F401
    from .layers import DequantizedLayer  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
