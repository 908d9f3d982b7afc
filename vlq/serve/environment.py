"""The environment an in-process vLLM engine needs: which platform's build is installed, and every workaround
(all of them in :mod:`vlq.runtime.compat`)."""

from __future__ import annotations

import os

from ..runtime import compat


def default_device() -> str:
    from ..runtime.capabilities import vllm_platform

    return vllm_platform() or "cpu"


def prepare_environment(device: str) -> None:
    """Env vars and workarounds an in-process engine needs; all CPU workarounds live in compat."""
    compat.apply_hf_offline()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: apply_model runs here, no pickling
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    compat.apply_torchvision_schema_shim()
    compat.apply_vllm_registry_inprocess()
    compat.apply_vllm_cpu_disabled_kernels(device)
    compat.apply_vllm_cpu_fp8_emulated_scaled_mm(device)
