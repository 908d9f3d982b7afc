"""ModelOpt configs inspected and built: which entries act by module name or parent class, and variants of a
format's config with parts of ModelOpt's default-disabled list lifted.

ModelOpt configs are ordered lists of ``{"quantizer_name": pattern, "cfg" | "enable", "parent_class"?}``
entries where the last match wins.  Some entries match per layer (``*weight_quantizer``), others by a
*global module name* (``*lm_head*``, ``*visual*``) or by parent class (``nn.Embedding``).  Inside
``auto_quantize`` the name-based ones are ignored, which is why vlq passes exclusions as
``disabled_layers``; :func:`pattern_entries` shows which entries of a config are name based and
:func:`build_config` builds variants (all-layers FP8, LM-only FP8) from them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

# Per-layer quantizer-name patterns: they act on each searched layer, not on global names.
_PER_LAYER_PATTERNS = frozenset(
    {"*", "*weight_quantizer", "*input_quantizer", "*output_quantizer", "*[kv]_bmm_quantizer"}
)

# Module-name patterns that cover the vision tower of ModelOpt-known VLMs (Qwen2.5-VL: model.visual).
VISION_NAME_PATTERNS = ("*visual*", "*vision_tower*", "*vision_model*", "*embed_vision*", "*multi_modal_projector*")
LM_HEAD_PATTERNS = ("*lm_head*",)


@dataclass(frozen=True)
class PatternEntry:
    """One entry of a ModelOpt config that acts by module name or parent class, not per layer."""

    index: int
    quantizer_name: str
    parent_class: str | None
    enable: bool | None
    in_default_disabled: bool

    @property
    def kind(self) -> str:
        return "parent-class" if self.parent_class else "module-name"


def default_disabled_patterns() -> list[dict[str, Any]]:
    """ModelOpt's ``_default_disabled_quantizer_cfg``: the entries every built-in config ends with."""
    from modelopt.torch.quantization import config as mtq_config

    return copy.deepcopy(list(mtq_config._default_disabled_quantizer_cfg))


def _entry_key(entry: dict[str, Any]) -> tuple:
    return (entry.get("quantizer_name"), entry.get("parent_class"), entry.get("enable"))


def pattern_entries(config: dict[str, Any]) -> list[PatternEntry]:
    """The entries of ``config`` that match by module name or parent class (not per layer)."""
    defaults = {_entry_key(e) for e in default_disabled_patterns()}
    found = []
    for index, entry in enumerate(config["quant_cfg"]):
        name = entry.get("quantizer_name")
        parent = entry.get("parent_class")
        if parent is None and name in _PER_LAYER_PATTERNS:
            continue
        found.append(PatternEntry(index, name, parent, entry.get("enable"), _entry_key(entry) in defaults))
    return found


def build_config(
    format_name: str,
    *,
    lm_head: bool = False,
    vision: bool = False,
    extra_disabled: Iterable[str] = (),
) -> dict[str, Any]:
    """A ModelOpt config for ``format_name`` with chosen parts of the default-disabled list lifted.

    ``lm_head=True`` quantizes the lm_head, ``vision=True`` the vision tower (both are disabled by
    ModelOpt's defaults).  With both False the result is the LM-only config: the default plus
    explicit vision and lm_head disables at the end (last match wins, so nothing earlier can
    re-enable them).
    """
    from .registry import get_format

    config = get_format(format_name).config
    lifted = set()
    if lm_head:
        lifted.update(LM_HEAD_PATTERNS)
    if vision:
        lifted.update(VISION_NAME_PATTERNS)
    config["quant_cfg"] = [
        e for e in config["quant_cfg"]
        if not (e.get("parent_class") is None and e.get("enable") is False and e.get("quantizer_name") in lifted)
    ]
    tail = []
    if not vision:
        tail += [{"quantizer_name": p, "enable": False} for p in VISION_NAME_PATTERNS]
    if not lm_head:
        tail += [{"quantizer_name": p, "enable": False} for p in LM_HEAD_PATTERNS]
    tail += [{"quantizer_name": p, "enable": False} for p in extra_disabled]
    config["quant_cfg"] = list(config["quant_cfg"]) + tail
    return config


def all_layers_config(format_name: str = "fp8", *, include_vision: bool = False) -> dict[str, Any]:
    """All-layers config: lm_head quantized too, and the vision tower when ``include_vision``."""
    return build_config(format_name, lm_head=True, vision=include_vision)


def lm_only_config(format_name: str = "fp8") -> dict[str, Any]:
    return build_config(format_name, lm_head=False, vision=False)
