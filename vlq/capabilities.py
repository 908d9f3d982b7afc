"""What this machine can do, as one-line reasons the test lanes skip with ("needs X, found Y")."""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache(maxsize=None)
def cuda_skip_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return f"needs a CUDA GPU, found torch {torch.__version__} with torch.cuda.is_available()=False"


@lru_cache(maxsize=None)
def vllm_platform() -> str | None:
    """'cpu' or 'cuda' for the installed vLLM build, None when vLLM is absent or broken."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from . import _compat

    _compat.apply_torchvision_schema_shim()
    try:
        from vllm.platforms import current_platform
    except Exception:  # a broken vLLM install must skip, not crash collection
        return None
    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return str(getattr(current_platform, "device_type", "unknown"))


def vllm_skip_reason(device: str) -> str | None:
    """Why vLLM tests for ``device`` ('cpu' or 'cuda') cannot run here, or None."""
    platform = vllm_platform()
    if platform is None:
        found = "no importable vllm package"
        return f"needs vLLM for {device}, found {found}"
    if platform != device:
        return f"needs vLLM built for {device}, found a vLLM build for {platform}"
    return None
