"""The guards that prove a search kept the vision tower and ``lm_head`` unquantized (registered checks of the
search stage, :mod:`vlq.checks.registry`)."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from torch import nn

from ..checks.check import Check
from ..checks.registry import get_check
from ..data.models import LoadedVLM, fingerprint_parameters
from ..formats.registry import NO_QUANT
from .decisions import full_name

if TYPE_CHECKING:
    from .results import SearchResult


def enabled_quantizers(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of every enabled ModelOpt TensorQuantizer under ``module``."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, TensorQuantizer) and sub.is_enabled:
            found.append(full_name(name, prefix))
    return found


class VisionGuard:
    """Proves the vision tower stayed BF16 through a search.

    Three independent checks: (1) no enabled quantizer anywhere under the tower, (2) no search
    decision that quantizes a vision module, (3) the tower's weights are byte-identical to the
    fingerprint taken at load time.
    """

    spec = get_check("vision_guard")
    name = spec.name

    def __init__(self, loaded: LoadedVLM):
        self.loaded = loaded
        self.expected_fingerprint = loaded.vision.fingerprint

    def check(self, result: SearchResult | None = None) -> Check:
        loaded = self.loaded
        tower = loaded.vlm.get_submodule(loaded.vision.root)
        problems = [f"enabled quantizer {q}" for q in enabled_quantizers(tower, loaded.vision.root)]
        if result is not None:
            for group in result.groups:
                vision_members = [m for m in group.members if m == loaded.vision.root or m.startswith(loaded.vision.root + ".")]
                if vision_members and group.chosen != NO_QUANT:
                    problems.append(f"search chose {group.chosen} for vision group {group.name}")
        fingerprint = fingerprint_parameters(tower)
        if fingerprint != self.expected_fingerprint:
            problems.append(
                f"vision weights changed: fingerprint {fingerprint[:12]} != {self.expected_fingerprint[:12]} at load"
            )
        dtypes = sorted({str(p.dtype) for p in tower.parameters()})
        if tuple(dtypes) != loaded.vision.dtypes:
            problems.append(f"vision parameter dtypes {dtypes} != {list(loaded.vision.dtypes)} at load")
        checked = len(loaded.vision.linear_names)
        return self.spec.result(problems, checked, f"{checked} vision linears, weights unchanged")


class LmHeadGuard:
    """Proves ``lm_head`` (tied to the embeddings in Qwen2.5-VL-3B) carries no enabled quantizer."""

    spec = get_check("lm_head_guard")
    name = spec.name

    def __init__(self, loaded: LoadedVLM):
        self.loaded = loaded

    def check(self, result: SearchResult | None = None) -> Check:
        head = self.loaded.lm_head
        problems = [f"enabled quantizer {q}" for q in enabled_quantizers(head, "lm_head")]
        if result is not None:
            for group in result.groups:
                if any(fnmatch.fnmatch(m, "*lm_head") for m in group.members) and group.chosen != NO_QUANT:
                    problems.append(f"search chose {group.chosen} for {group.name}")
        detail = "tied to the embeddings" if self.loaded.tied_lm_head else "untied"
        return self.spec.result(problems, 1, detail)


def vision_guard(*, result: SearchResult, **_) -> Check:
    """The search stage's vision guard (:mod:`vlq.checks.registry`)."""
    return VisionGuard(result.loaded).check(result)


def lm_head_guard(*, result: SearchResult, **_) -> Check:
    """The search stage's lm_head guard (:mod:`vlq.checks.registry`)."""
    return LmHeadGuard(result.loaded).check(result)
