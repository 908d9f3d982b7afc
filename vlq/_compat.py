"""Workarounds for the CPU environment, each named, explained and applied in one place.

``torchvision_schema_shim``
    On a CPU machine pip pairs ``torch==2.13.0+cpu`` with PyPI's ``torchvision``, which is a CUDA
    build whose compiled ops do not load.  ``torchvision/_meta_registrations.py`` then registers
    fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally and the import
    dies with ``operator torchvision::nms does not exist``.  transformers' image utilities and
    vLLM's Qwen2.5-VL path both import torchvision, so nothing multimodal works.  Declaring the two
    operator *schemas* (no kernels) before the first import lets the unmodified package import; its
    pure-Python transforms work, its compiled ops stay unavailable (vlq never calls them).

The shim only acts when torchvision's compiled extension is really missing, so on a machine with a
matching torchvision (every GPU runner) it does nothing.
"""

from __future__ import annotations

import importlib.util
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
