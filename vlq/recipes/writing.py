"""The ModelOpt AutoQuantize recipe that reproduces a run's search, from its manifest.

Candidate formats are written as ``$import`` of the ModelOpt preset whose config equals the format's (found by
loading the installed presets, not from a table), or inline where no preset matches.  The vision tower and
lm_head are disabled and cost-excluded, so ModelOpt's whole-VLM recipe path searches what vlq searched.
Calibration is no part of a recipe; the header says which flags reproduce it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..formats.modelopt_configs import LM_HEAD_PATTERNS, VISION_NAME_PATTERNS
from ..formats.registry import FORMATS
from ..manifest.manifest import Manifest
from .reading import _dump

#: Where ModelOpt keeps its per-format presets, inside ``modelopt_recipes``.
PRESET_DIR = "configs/ptq/presets/model"
SCHEMA_LINE = "# modelopt-schema: modelopt.recipe.config.ModelOptAutoQuantizeRecipe"


@lru_cache(maxsize=1)
def _presets() -> tuple[tuple[str, Any], ...]:
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    from .names import recipes_root

    found = []
    for path in sorted((recipes_root() / PRESET_DIR).glob("*.yaml")):
        try:
            config = load_config(f"{PRESET_DIR}/{path.stem}", schema_type=QuantizeConfig)
        except Exception:  # a preset this ModelOpt cannot load is no candidate
            continue
        found.append((path.stem, config.model_dump()))
    return tuple(found)


def preset_for(format_name: str) -> str | None:
    """The ModelOpt preset (``configs/ptq/presets/model/<name>``) equal to ``format_name``'s config, if one is."""
    dumped = _dump(FORMATS[format_name].config)
    return next((f"{PRESET_DIR}/{stem}" for stem, config in _presets() if config == dumped), None)


def recipe_data(manifest: Manifest) -> dict[str, Any]:
    """The recipe as data: ``imports``, ``metadata``, ``auto_quantize``."""
    scheme = manifest.scheme
    imports, candidates = {}, []
    for name in scheme.formats:
        preset = preset_for(name)
        if preset is not None:
            imports[name] = preset
            candidates.append({"$import": name})
        else:
            candidates.append(FORMATS[name].config)
    lm_only = list(VISION_NAME_PATTERNS + LM_HEAD_PATTERNS)
    search: dict[str, Any] = {
        "constraints": {"effective_bits": scheme.target_bits},
        "candidate_formats": candidates,
        "auto_quantize_method": scheme.method,
        "score_size": scheme.num_score_steps * scheme.batch_size,
        "disabled_layers": lm_only + [p for p in scheme.disabled_layers if p not in lm_only],
        "cost_excluded_layers": lm_only + [p for p in scheme.cost_excluded_layers if p not in lm_only],
    }
    if scheme.search_spaces:
        search["module_search_spaces"] = [
            {"module_name_patterns": list(s.patterns), "candidate_formats": [FORMATS[f].config for f in s.formats],
             "allow_no_quant": s.allow_no_quant} for s in scheme.search_spaces]
    if scheme.kv_cache_fp8:
        imports["kv_fp8"] = "configs/ptq/presets/kv/fp8"
        search["kv_cache"] = {"$import": "kv_fp8"}
    data: dict[str, Any] = {}
    if imports:
        data["imports"] = imports
    data["metadata"] = {"recipe_type": "auto_quantize",
                        "description": f"vlq's LM-only search {scheme.id} of {manifest.model_source}: "
                                       f"{'+'.join(scheme.formats)} at {scheme.target_bits:g} effective bits over the "
                                       "language model, vision tower and lm_head BF16 and outside the bit budget."}
    data["auto_quantize"] = search
    return data


def recipe_yaml(manifest: Manifest) -> str:
    """The recipe's YAML text, with a header naming the calibration flags that reproduce the run."""
    import yaml

    scheme = manifest.scheme
    header = [
        "# Written by `vlq recipe` from a vlq run: ModelOpt AutoQuantize reproducing its LM-only search.",
        f"# Calibration is no part of a recipe: the run calibrated {scheme.num_calib_steps} steps of batch "
        f"{scheme.batch_size} x {scheme.seq_len} tokens ({manifest.calibration_source or 'vlq default'}).",
        f"#   vlq:    vlq search --recipe THIS_FILE --calib-steps {scheme.num_calib_steps} --batch-size {scheme.batch_size} "
        f"--seq-len {scheme.seq_len} --strategy {scheme.strategy}",
        f"#   hf_ptq: --recipe THIS_FILE --calib_size {scheme.num_calib_steps * scheme.batch_size} "
        f"--calib_seq {scheme.seq_len} --batch_size {scheme.batch_size}",
    ]
    if manifest.format_exclusions:
        header.append(f"# vlq removed candidate formats from {len(manifest.format_exclusions)} decision group(s) whose "
                      "layer sizes are outside the format's blocks; ModelOpt's tools check those shapes themselves.")
    if scheme.recipe is not None:
        header.append(f"# The run itself was read from recipe {scheme.recipe.source}.")
    body = yaml.safe_dump(recipe_data(manifest), sort_keys=False, width=120)
    return "\n".join([*header, "", SCHEMA_LINE, body])
