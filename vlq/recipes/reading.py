"""A ModelOpt AutoQuantize recipe read into vlq's scheme, and where vlq's LM-only search departs from it.

The recipe is loaded by ModelOpt's own loader (``modelopt.recipe.load_recipe``: ``$import`` presets and
shared layer units resolved, validated as ``ModelOptAutoQuantizeRecipe``); vlq reads the typed result only.
A candidate format is one of vlq's formats when its quantizer config equals that format's ModelOpt config.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterable

from ..formats.modelopt_configs import LM_HEAD_PATTERNS, VISION_NAME_PATTERNS
from ..formats.registry import FORMATS
from ..runtime.errors import SchemeError
from ..search.scheme import RecipeOrigin, Scheme, SearchSpace
from .names import resolve_recipe

#: Names a Qwen2.5-VL's modules take (whole VLM and extracted text model): which of a recipe's patterns
#: reach the language model, the vision tower or lm_head.
LM_SAMPLE_NAMES = tuple(f"{prefix}layers.0.{leaf}" for prefix in ("", "model.language_model.", "model.")
                        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
VISION_SAMPLE_NAMES = ("model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj",
                       "model.visual.blocks.0.mlp.gate_proj", "model.visual.merger.mlp.0", "visual.blocks.0.attn.qkv")
LM_HEAD_NAME = "lm_head"
#: What vlq applies to every search anyway (vlq.search.search keeps vision and lm_head out): recipe patterns
#: that reach only these are already honoured, and are not carried into the scheme.
LM_ONLY_PATTERNS = VISION_NAME_PATTERNS + LM_HEAD_PATTERNS


@contextlib.contextmanager
def quiet_modelopt():
    """ModelOpt's import warnings and the loader's "loading:" line kept off the terminal: recipes are read before
    a command's log exists (the notes vlq prints say what matters)."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _matches(patterns: Iterable[str], names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(n, p) for p in patterns for n in names)


@dataclass(frozen=True)
class RecipeSearch:
    """What a ModelOpt AutoQuantize recipe asks for, in vlq's names."""

    source: str  # as given: a shipped name or a file
    path: str  # the file ModelOpt loaded
    description: str
    formats: tuple[str, ...]
    target_bits: float
    method: str
    score_size: int  # samples scored; steps = score_size // batch_size, as hf_ptq divides it
    disabled_layers: tuple[str, ...]
    cost_excluded_layers: tuple[str, ...]
    search_spaces: tuple[SearchSpace, ...]
    kv_cache_fp8: bool
    cost_model: str

    def score_steps(self, batch_size: int) -> int:
        return max(self.score_size // max(int(batch_size), 1), 1)

    def carried(self, patterns: Iterable[str]) -> tuple[str, ...]:
        """The patterns that reach past vision and lm_head (those vlq keeps out of every search anyway)."""
        return tuple(p for p in patterns if p not in LM_ONLY_PATTERNS and (
            _matches([p], LM_SAMPLE_NAMES) or not _matches([p], VISION_SAMPLE_NAMES + (LM_HEAD_NAME,))))

    def scheme_fields(self, batch_size: int) -> dict[str, Any]:
        """The scheme fields this recipe sets (flags may still override them)."""
        return {"formats": list(self.formats), "target_bits": self.target_bits, "method": self.method,
                "num_score_steps": self.score_steps(batch_size), "kv_cache_fp8": self.kv_cache_fp8,
                "disabled_layers": self.carried(self.disabled_layers),
                "cost_excluded_layers": self.carried(self.cost_excluded_layers),
                "search_spaces": self.search_spaces}


def read_recipe(text: str) -> RecipeSearch:
    """Load ``text`` (a shipped name or a file) with ModelOpt's loader and map it to vlq's names; refused
    (SchemeError, one line) when ModelOpt cannot load it, it is no AutoQuantize recipe, or it asks for what vlq's
    search cannot do (a format vlq does not know, a fixed PTQ baseline, another KV-cache format)."""
    path = resolve_recipe(text)
    with quiet_modelopt():
        from modelopt.recipe import ModelOptAutoQuantizeRecipe, load_recipe
    from pydantic import ValidationError

    try:
        with quiet_modelopt():
            recipe = load_recipe(path)
    except (ValueError, TypeError, ValidationError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SchemeError(f"--recipe {text}: ModelOpt's load_recipe refuses {path}: {first}") from exc
    if not isinstance(recipe, ModelOptAutoQuantizeRecipe):
        raise SchemeError(f"--recipe {text} is a {recipe.recipe_type.value} recipe; vlq searches with an auto_quantize "
                          f"recipe (shipped: modelopt_recipes/general/auto_quantize).")
    if recipe.quantize is not None:
        raise SchemeError(f"--recipe {text} fixes a PTQ baseline (quantize:) beside its module search spaces; vlq searches "
                          "every language-model linear, so give it candidate_formats instead.")
    aq = recipe.auto_quantize
    formats = tuple(format_of(c, f"--recipe {text}: candidate format {i + 1}") for i, c in enumerate(aq.candidate_formats))
    spaces = tuple(SearchSpace(tuple(s.module_name_patterns),
                               tuple(format_of(c, f"--recipe {text}: module_search_spaces {j + 1}, format {i + 1}")
                                     for i, c in enumerate(s.candidate_formats)), s.allow_no_quant)
                   for j, s in enumerate(aq.module_search_spaces))
    return RecipeSearch(source=text, path=str(path), description=recipe.description, formats=formats,
                        target_bits=float(aq.constraints.effective_bits), method=aq.auto_quantize_method,
                        score_size=int(aq.score_size), disabled_layers=tuple(aq.disabled_layers),
                        cost_excluded_layers=tuple(aq.cost_excluded_layers), search_spaces=spaces,
                        kv_cache_fp8=_kv_cache_fp8(aq.kv_cache, text), cost_model=aq.constraints.cost_model)


def _dump(config) -> dict[str, Any]:
    from modelopt.torch.quantization.config import QuantizeConfig

    return (config if isinstance(config, QuantizeConfig) else QuantizeConfig.model_validate(config)).model_dump()


@lru_cache(maxsize=1)
def _known_configs() -> tuple[tuple[str, Any], ...]:
    return tuple((name, _dump(fmt.config)) for name, fmt in FORMATS.items())


def format_of(config, where: str) -> str:
    """vlq's format whose ModelOpt config is ``config`` (a QuantizeConfig); refused naming the known ones."""
    dumped = _dump(config)
    for name, known in _known_configs():
        if known == dumped:
            return name
    raise SchemeError(f"{where} ({_modelopt_name(dumped)}) is not a format vlq knows; vlq knows "
                      + ", ".join(f"{n} ({f.modelopt_config})" for n, f in FORMATS.items()) + ".")


def _modelopt_name(dumped: dict[str, Any]) -> str:
    """ModelOpt's name of the built-in config equal to ``dumped``, or a description of it."""
    import modelopt.torch.quantization as mtq

    for name in sorted(dir(mtq)):
        value = getattr(mtq, name)
        if name.endswith("_CFG") and isinstance(value, dict) and "quant_cfg" in value:
            with contextlib.suppress(Exception):
                if _dump(value) == dumped:
                    return f"ModelOpt's {name}"
    return f"a custom config, algorithm {dumped.get('algorithm')!r}"


def _kv_cache_fp8(config, text: str) -> bool:
    if config is None:
        return False
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    if _dump(config) == _dump(load_config("configs/ptq/presets/kv/fp8", schema_type=QuantizeConfig)):
        return True
    raise SchemeError(f"--recipe {text}: its kv_cache config is not ModelOpt's FP8 KV-cache preset "
                      "(configs/ptq/presets/kv/fp8), the only KV-cache format vlq adds.")


def differences(recipe: RecipeSearch, scheme: Scheme, *, images: bool = False) -> tuple[str, ...]:
    """Every way the search ``scheme`` runs differs from ``recipe`` as ModelOpt's hf_ptq would run it."""
    found = []
    for label, key, recipe_value, value in (
            ("candidate formats", "--formats", "+".join(recipe.formats), "+".join(scheme.formats)),
            ("effective_bits", "--bits", f"{recipe.target_bits:g}", f"{scheme.target_bits:g}"),
            ("auto_quantize_method", "--method", recipe.method, scheme.method),
            ("kv_cache", "--kv-cache-fp8", "fp8" if recipe.kv_cache_fp8 else "none", "fp8" if scheme.kv_cache_fp8 else "none")):
        if recipe_value != value:
            found.append(f"{key} {value} replaces the recipe's {label} {recipe_value}")
    steps = recipe.score_steps(scheme.batch_size)
    if scheme.num_score_steps != steps:
        found.append(f"--score-steps {scheme.num_score_steps} replaces the recipe's score_size {recipe.score_size} "
                     f"({steps} steps of batch {scheme.batch_size})")
    else:
        found.append(f"score_size {recipe.score_size}: {steps} score steps of batch {scheme.batch_size} x {scheme.seq_len} tokens")
    found.append(f"a recipe sets no calibration size (hf_ptq's --calib_size): vlq calibrates {scheme.num_calib_steps} steps "
                 f"of batch {scheme.batch_size} x {scheme.seq_len} tokens")
    if not _matches(recipe.disabled_layers, (LM_HEAD_NAME,)):
        found.append("the recipe leaves lm_head searchable (no disabled_layers pattern matches it): kept BF16")
    if not _matches(recipe.cost_excluded_layers, (LM_HEAD_NAME,)):
        found.append("the recipe counts lm_head in effective_bits: vlq's bits count the language model's decoder linears only")
    if not _matches(recipe.disabled_layers, VISION_SAMPLE_NAMES):
        found.append("the recipe leaves the vision tower searchable: kept BF16")
    if not _matches(recipe.cost_excluded_layers, VISION_SAMPLE_NAMES):
        found.append("the recipe counts the vision tower in effective_bits: excluded")
    reach = [p for p in recipe.disabled_layers if _matches([p], LM_SAMPLE_NAMES)]
    if reach:
        found.append(f"disabled_layers {', '.join(reach)} reach language-model linears: kept BF16 and counted at 16 bits, as in ModelOpt")
    if recipe.cost_model != "weight":
        found.append(f"cost_model {recipe.cost_model} weighs routed experts; Qwen2.5-VL has none, so vlq counts every weight once")
    if images:
        found.append("ModelOpt's recipe path refuses image+text calibration for AutoQuantize (hf_ptq raises "
                     "NotImplementedError); vlq calibrates and scores the language model on image+text prompts")
    return tuple(found)


def recipe_scheme(recipe: RecipeSearch, base: Scheme, flags: dict[str, Any], *, images: bool = False) -> Scheme:
    """``base`` (the device's default scheme) with the recipe's fields, then the given ``flags`` on top, and the
    differences recorded in the scheme's ``recipe`` field."""
    batch = flags.get("batch_size") or base.batch_size
    data = {**base.to_dict(), **recipe.scheme_fields(batch), **flags}
    scheme = Scheme.from_dict(data)
    return replace(scheme, recipe=RecipeOrigin(recipe.source, recipe.description, differences(recipe, scheme, images=images)))
