"""ModelOpt's CUDA extensions, loaded (or built) before a search calibrates: the search's "extension build" phase.

ModelOpt 0.47 JIT-builds its CUDA extensions on first use in a process (``modelopt.torch.quantization.
extensions``: ``get_cuda_ext``, ``get_cuda_ext_fp8``, ``get_cuda_ext_mx``).  Left to itself the first FP8
fake-quant call builds ``modelopt_cuda_ext_fp8`` in the middle of calibration, and a fresh machine's first
search then reports a minute of "calibrate" that is really a compiler.  :func:`load_for_formats` loads exactly
the extensions the scheme's formats will call, timed on its own, before the search starts its clock.

Which extension a format uses is read from its ModelOpt quantizer configs, mirroring ModelOpt's dispatch
(``tensor_quant.py``): FP8 E4M3 (per tensor or channel) calls ``modelopt_cuda_ext_fp8``; integer formats
(INT4 AWQ, INT8 SmoothQuant) call ``modelopt_cuda_ext``; dynamic-block formats (MXFP8, and NVFP4 where
ModelOpt's Triton FP4 kernel is not available) call ``modelopt_cuda_ext_mx``.  On CPU ModelOpt's fake
quantization runs its eager path and uses no extension.

A failed load never fails the search: the loader's cached result is dropped, so ModelOpt tries again
lazily exactly as it would have without this module (and its time is then inside calibration again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

from ..formats.spec import QuantFormat

#: ModelOpt's extensions by name -> the loader in ``modelopt.torch.quantization.extensions`` that builds it.
LOADERS = {
    "modelopt_cuda_ext": "get_cuda_ext",
    "modelopt_cuda_ext_fp8": "get_cuda_ext_fp8",
    "modelopt_cuda_ext_mx": "get_cuda_ext_mx",
}
INT_EXT, FP8_EXT, MX_EXT = LOADERS

#: A load that takes this long compiled something (a warm cache loads a built library in well under a second).
BUILD_SECONDS = 1.0


def _bits(value) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def quantizer_extensions(cfg, *, triton_fp4: bool) -> frozenset[str]:
    """The extensions one quantizer config (a ModelOpt ``cfg``: dict, a sequential list, or None) calls on CUDA.

    ``triton_fp4``: ModelOpt's Triton FP4 block kernel is available (then NVFP4's dynamic blocks use it).
    """
    if cfg is None:
        return frozenset()
    if isinstance(cfg, list):  # a sequential quantizer (W4A8 AWQ weights: INT4 blocks, then FP8)
        return frozenset().union(*(quantizer_extensions(c, triton_fp4=triton_fp4) for c in cfg))
    if cfg.get("enable") is False:
        return frozenset()
    num_bits = _bits(cfg.get("num_bits", 8))
    blocks = cfg.get("block_sizes") or {}
    if blocks.get("type") == "dynamic":
        if num_bits == (2, 1) and _bits(blocks.get("scale_bits")) == (4, 3) and triton_fp4:
            return frozenset()
        return frozenset({MX_EXT})
    if isinstance(num_bits, tuple):
        return frozenset({FP8_EXT}) if num_bits == (4, 3) else frozenset()
    return frozenset({INT_EXT})


def format_extensions(formats: Iterable[QuantFormat], *, triton_fp4: bool) -> tuple[str, ...]:
    """The extensions ``formats`` call on CUDA, in :data:`LOADERS` order."""
    used: set[str] = set()
    for fmt in formats:
        for cfg in fmt.quantizer_cfgs():
            used |= quantizer_extensions(cfg, triton_fp4=triton_fp4)
    return tuple(name for name in LOADERS if name in used)


def triton_fp4_available() -> bool:
    """ModelOpt's condition for NVFP4's Triton block kernel (``_dynamic_block_quantize_impl``)."""
    try:
        import modelopt.torch.kernels.quantization.gemm as triton_kernel
        from modelopt.torch.quantization import tensor_quant
    except Exception:  # a ModelOpt without the module: it would use the MX extension
        return False
    return bool(triton_kernel.IS_AVAILABLE and hasattr(triton_kernel, "fp4_fake_quant_block")
                and not getattr(tensor_quant, "DISABLE_TRITON_KERNEL", False))


@dataclass(frozen=True)
class ExtensionLoad:
    """What the extension phase of one search did.

    ``loaded``: (name, seconds) of each extension loaded or built now; ``already_loaded``: loaded earlier in
    this process (nothing to do); ``failed``: (name, message) of those that would not load (ModelOpt retries
    them lazily).  ``seconds`` is the whole phase.
    """

    device: str
    needed: tuple[str, ...] = ()
    loaded: tuple[tuple[str, float], ...] = ()
    already_loaded: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0

    @property
    def applicable(self) -> bool:
        return self.device == "cuda"

    @property
    def built(self) -> bool:
        """Something was compiled (the cache was cold or stale), judged by :data:`BUILD_SECONDS`."""
        return any(s >= BUILD_SECONDS for _, s in self.loaded)

    @property
    def phase(self) -> str:
        """``extension build``, ``extension load`` (a warm cache), or ``none`` (nothing loaded now)."""
        if not self.loaded and not self.failed:
            return "none"
        return "extension build" if self.built else "extension load"

    def summary(self) -> str:
        if not self.applicable:
            return f"no CUDA extensions on {self.device}"
        if not self.needed:
            return "no ModelOpt CUDA extension needed by these formats"
        parts = []
        if self.loaded:
            verb = "built" if self.built else "loaded from the cache"
            parts.append(f"{verb} " + ", ".join(f"{n} ({s:.1f}s)" for n, s in self.loaded))
        if self.already_loaded:
            parts.append("already loaded " + ", ".join(self.already_loaded))
        if self.failed:
            parts.append("failed " + "; ".join(f"{n}: {m}" for n, m in self.failed)
                         + " (ModelOpt retries lazily, inside calibration)")
        return f"{self.phase if self.phase != 'none' else 'extensions'}: " + "; ".join(parts)


def _loader(name: str):
    from modelopt.torch.quantization import extensions

    return getattr(extensions, LOADERS[name])


def loaded_in_process() -> frozenset[str]:
    """Extensions ModelOpt has loaded in this process (a loader caches its result on itself)."""
    try:
        return frozenset(n for n in LOADERS if getattr(_loader(n), "extension", None) is not None)
    except Exception:
        return frozenset()


def load_for_formats(formats: Iterable[QuantFormat], device: str) -> ExtensionLoad:
    """Load (building if needed) the extensions ``formats`` will call on ``device``; never raises."""
    if device != "cuda":
        return ExtensionLoad(device=device)
    start = time.perf_counter()
    try:
        needed = format_extensions(formats, triton_fp4=triton_fp4_available())
    except Exception as exc:  # an unreadable config: ModelOpt loads what it needs lazily
        return ExtensionLoad(device=device, failed=(("formats", f"{type(exc).__name__}: {exc}"),),
                             seconds=time.perf_counter() - start)
    before = loaded_in_process()
    loaded, failed = [], []
    for name in needed:
        if name in before:
            continue
        t0 = time.perf_counter()
        loader = extension = None
        message = "ModelOpt could not build or load it (its warning is in the log)"
        try:
            loader = _loader(name)
            extension = loader(raise_if_failed=False)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if extension is None:
            if loader is not None and hasattr(loader, "extension"):
                del loader.extension  # not cached as missing: ModelOpt's own call tries again, as without us
            failed.append((name, message))
        else:
            loaded.append((name, time.perf_counter() - t0))
    return ExtensionLoad(device=device, needed=needed, loaded=tuple(loaded), already_loaded=tuple(n for n in needed if n in before),
                         failed=tuple(failed), seconds=time.perf_counter() - start)
