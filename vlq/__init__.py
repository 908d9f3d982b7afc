"""vlq — quantize the language model of Qwen2.5-VL with ModelOpt AutoQuant, keep vision BF16, serve in vLLM."""

from . import _compat

_compat.apply_torchvision_schema_shim()

__version__ = "0.1.0"
