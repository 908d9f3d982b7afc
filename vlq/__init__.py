"""vlq — quantize the language model of Qwen2.5-VL with ModelOpt AutoQuant, keep vision BF16, serve in vLLM.

Importing the package is light (no torch): the CLI validates its inputs before any heavy import.
The stages live in one module each; :mod:`vlq.pipeline` runs them in order.
"""

__version__ = "0.1.0"
