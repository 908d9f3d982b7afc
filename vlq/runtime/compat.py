"""Workarounds for the CPU environment, each named, explained and applied in one place.

``torchvision_schema_shim``
    On a CPU machine pip pairs ``torch==2.13.0+cpu`` with PyPI's ``torchvision``, which is a CUDA
    build whose compiled ops do not load.  ``torchvision/_meta_registrations.py`` then registers
    fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally and the import
    dies with ``operator torchvision::nms does not exist``.  transformers' image utilities and
    vLLM's Qwen2.5-VL path both import torchvision, so nothing multimodal works.  Declaring the two
    operator *schemas* (no kernels) before the first import lets the unmodified package import; its
    pure-Python transforms work, its compiled ops stay unavailable (vlq never calls them).

``vllm_registry_inprocess``
    vLLM inspects a model class (``_ModelInfo.from_model_cls``) in a fresh
    ``python -m vllm.model_executor.models.registry`` subprocess, to keep CUDA uninitialised in the
    parent.  That child process never runs the torchvision shim above, so on a CPU machine it dies
    with ``operator torchvision::nms does not exist`` and vLLM reports ``Model architectures
    ['Qwen2_5_VLForConditionalGeneration'] failed to be inspected``.  vLLM caches the result only
    after one inspection succeeds, so the cache cannot help.  The workaround replaces
    ``vllm.model_executor.models.registry._run_in_subprocess`` with a function that calls ``fn()``
    in this process (where the shim is active).  It is applied only when the torchvision shim was
    needed; with a working torchvision (every GPU runner) vLLM keeps its subprocess.

``vllm_cpu_disabled_kernels``
    On CPU, vLLM's ``CPUFp8PerTensorScaledMMLinearKernel`` is picked for FP8 linears on hosts with
    AMX tiles; it rejects the BF16 bias that Qwen2.5-VL's q/k/v projections carry.  Adding it to
    ``VLLM_DISABLED_KERNELS`` makes vLLM fall back to ``PerTensorTorchFP8ScaledMMLinearKernel``
    (what hosts without AMX pick anyway, so there it changes nothing; identical outputs were
    measured).  Set only for the CPU build of vLLM, appended to any user value.

``vllm_cpu_fp8_emulated_scaled_mm``
    With that kernel disabled, FP8 linears run ``torch._scaled_mm``.  On hosts with AMX tiles torch hands
    FP8 matmuls to oneDNN, which has no optimised FP8 matmul without AMX-FP8 and runs its reference
    implementation (``ref:any`` under ``ONEDNN_VERBOSE=1``), about three orders of magnitude slower than
    BF16: the 3B FP8 serving test then takes hours.  With oneDNN off torch emulates (FP8 upcast, float
    matmul, scales): the same outputs, what hosts without AMX run anyway.  So vLLM's torch FP8 kernel runs
    with oneDNN off for its one matmul; only the CPU build of vLLM is patched.

``hf_offline``
    A checkpoint path that does not exist is treated by transformers/vLLM as a hub id and a network
    call follows (``LocalEntryNotFoundError ... huggingface.co``).  vlq never downloads, so
    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set (unless the user set them) before a
    serving engine starts.

The shim only acts when torchvision's compiled extension is really missing, so on a machine with a
matching torchvision (every GPU runner) it does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_SHIM_STATE: dict[str, object] = {"applied": False, "library": None}

_TORCHVISION_FAKE_REGISTERED_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _torchvision_ops_loadable() -> bool:
    """True when torchvision's compiled ops would register ``torchvision::nms`` themselves."""
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return True
    except RuntimeError:
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to shim
    import glob
    import os

    for location in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def apply_torchvision_schema_shim() -> bool:
    """Declare torchvision's operator schemas when its compiled ops cannot load.

    Returns True when the shim was applied (now or earlier).  Safe to call many times, and a no-op
    once torchvision has been imported.
    """
    if _SHIM_STATE["applied"]:
        return True
    if "torchvision" in sys.modules or _torchvision_ops_loadable():
        return False
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_FAKE_REGISTERED_OPS.values():
        lib.define(schema)
    _SHIM_STATE["library"] = lib  # keep alive: dropping the Library object unregisters the schemas
    _SHIM_STATE["applied"] = True
    return True


def torchvision_shim_applied() -> bool:
    return bool(_SHIM_STATE["applied"])


# ------------------------------------------------------------------------------------------------
# vLLM workarounds
# ------------------------------------------------------------------------------------------------

_VLLM_STATE: dict[str, object] = {"registry_patched": False, "original_run_in_subprocess": None}

#: The CPU kernel that rejects a BF16 bias on AMX hosts (see ``vllm_cpu_disabled_kernels``).
VLLM_CPU_DISABLED_KERNELS = ("CPUFp8PerTensorScaledMMLinearKernel",)


def _run_inprocess(fn):
    return fn()


def apply_vllm_registry_inprocess() -> bool:
    """Run vLLM's model-class inspection in this process when the torchvision shim is active.

    Returns True when the registry now inspects in-process (patched now or earlier).
    """
    if _VLLM_STATE["registry_patched"]:
        return True
    apply_torchvision_schema_shim()
    if not torchvision_shim_applied():
        return False  # torchvision works in the child too: keep vLLM's subprocess
    import vllm.model_executor.models.registry as registry

    _VLLM_STATE["original_run_in_subprocess"] = registry._run_in_subprocess
    registry._run_in_subprocess = _run_inprocess
    _VLLM_STATE["registry_patched"] = True
    return True


def vllm_registry_patched() -> bool:
    return bool(_VLLM_STATE["registry_patched"])


def apply_vllm_cpu_disabled_kernels(platform: str | None) -> tuple[str, ...]:
    """Add the AMX FP8 CPU kernel to ``VLLM_DISABLED_KERNELS`` for the CPU build of vLLM.

    Returns the kernels now listed (empty when ``platform`` is not ``'cpu'``).
    """
    if platform != "cpu":
        return ()
    current = [k for k in os.environ.get("VLLM_DISABLED_KERNELS", "").split(",") if k]
    for kernel in VLLM_CPU_DISABLED_KERNELS:
        if kernel not in current:
            current.append(kernel)
    os.environ["VLLM_DISABLED_KERNELS"] = ",".join(current)
    return tuple(current)


def apply_vllm_cpu_fp8_emulated_scaled_mm(platform: str | None) -> bool:
    """Run vLLM's torch FP8 kernel with oneDNN off on CPU (see ``vllm_cpu_fp8_emulated_scaled_mm``).

    Returns True when the kernel is patched (now or earlier); False when ``platform`` is not ``'cpu'``.
    """
    if platform != "cpu":
        return False
    if _VLLM_STATE.get("scaled_mm_patched"):
        return True
    import torch
    from vllm.model_executor.kernels.linear.scaled_mm.pytorch import PerTensorTorchFP8ScaledMMLinearKernel as kernel

    original = kernel.apply_scaled_mm

    def apply_scaled_mm(self, **kwargs):
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return original(self, **kwargs)
        finally:
            torch.backends.mkldnn.enabled = enabled

    apply_scaled_mm.__wrapped__ = original
    kernel.apply_scaled_mm = apply_scaled_mm
    _VLLM_STATE["scaled_mm_patched"] = True
    return True


def vllm_cpu_fp8_emulated() -> bool:
    return bool(_VLLM_STATE.get("scaled_mm_patched"))


def apply_hf_offline() -> None:
    """Never reach the hub from a serving check (see ``hf_offline``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
