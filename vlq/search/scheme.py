"""What a search is asked to do: a *scheme* names its candidate formats, effective-bits target, method,
restriction strategy and step counts.  Schemes are frozen, validated on construction and round-trip through
dicts and YAML with a version field; the YAML keys are the field names (the test matrix uses them too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..formats.registry import FORMATS, Servability, get_format, servability
from ..formats.spec import QuantFormat
from ..runtime.errors import SchemeError

SCHEME_VERSION = 2  # 2: effective_bits renamed target_bits (the achieved value lives in results)

#: AutoQuant's sensitivity methods, and vlq's ways of keeping the search to the language model.
METHODS = ("gradient", "kl_div")
STRATEGIES = ("extract", "mask")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Tokens whose logits exist at once while gradient scoring under ``extract`` (3B: 256 x 151936 vocabulary
# ~ 0.4 GiB with the fp32 log-softmax and its gradient) instead of the whole batch's (batch 4 x 512: ~3 GiB).
LOSS_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class SearchSpace:
    """A ModelOpt ``module_search_spaces`` entry a recipe brought: the groups matching ``patterns`` choose from
    ``formats`` (vlq names) only, and from no-quant too when ``allow_no_quant``."""

    patterns: tuple[str, ...]
    formats: tuple[str, ...]
    allow_no_quant: bool = True

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        object.__setattr__(self, "formats", tuple(get_format(f).name for f in self.formats))
        if not self.patterns or not self.formats:
            raise SchemeError(f"A search space needs module name patterns and formats; got {self.patterns} / {self.formats}.")

    def to_modelopt(self) -> dict[str, Any]:
        return {"module_name_patterns": list(self.patterns),
                "quantization_formats": [FORMATS[f].modelopt_config for f in self.formats],
                "allow_no_quant": self.allow_no_quant}


@dataclass(frozen=True)
class RecipeOrigin:
    """The ModelOpt AutoQuantize recipe a scheme was read from, and how vlq's search differs from it."""

    source: str  # the file or shipped name as given
    description: str = ""
    differences: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "differences", tuple(self.differences))


@dataclass(frozen=True)
class Scheme:
    """What an LM-only AutoQuant search is asked to do.

    ``strategy='extract'`` searches the extracted text model (loss through the parent's lm_head);
    ``strategy='mask'`` searches the whole VLM with vision tower and lm_head disabled *and*
    cost-excluded so the bit budget (``target_bits``) counts the language model only.
    """

    formats: tuple[str, ...] = ("fp8", "int4_awq")
    target_bits: float = 6.0
    method: str = "gradient"
    strategy: str = "extract"
    num_calib_steps: int = 4
    num_score_steps: int = 4
    batch_size: int = 1
    seq_len: int = 64
    kv_cache_fp8: bool = False
    # ModelOpt turns on gradient checkpointing for HF models while scoring (recomputing forwards);
    # off keeps every layer's activations and output differences for the backward pass: faster,
    # more memory (vlq.search.plan decides when it fits).
    gradient_checkpointing: bool = True
    # From a ModelOpt recipe (vlq.recipes): more modules kept out of the search (fnmatch patterns on the
    # searched module's names) or out of the bit budget, per-module candidate sets, and the recipe itself.
    disabled_layers: tuple[str, ...] = ()
    cost_excluded_layers: tuple[str, ...] = ()
    search_spaces: tuple[SearchSpace, ...] = ()
    recipe: RecipeOrigin | None = None
    version: int = SCHEME_VERSION

    def __post_init__(self):
        formats = self.formats
        if isinstance(formats, str):
            formats = tuple(f for f in formats.replace(",", "+").split("+") if f)
        formats = tuple(get_format(f).name for f in formats)
        if not formats:
            raise SchemeError("A scheme needs at least one format, e.g. formats=('fp8',).")
        if len(set(formats)) != len(formats):
            raise SchemeError(f"Formats repeat in {formats}; list each format once.")
        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "disabled_layers", tuple(self.disabled_layers))
        object.__setattr__(self, "cost_excluded_layers", tuple(self.cost_excluded_layers))
        object.__setattr__(self, "search_spaces", tuple(s if isinstance(s, SearchSpace) else SearchSpace(**s)
                                                        for s in self.search_spaces))
        if isinstance(self.recipe, dict):
            object.__setattr__(self, "recipe", RecipeOrigin(**self.recipe))
        if self.version != SCHEME_VERSION:
            raise SchemeError(f"Scheme version {self.version} is not supported; this vlq reads version {SCHEME_VERSION}.")
        if self.method not in METHODS:
            raise SchemeError(f"Unknown method {self.method!r}; use one of {METHODS}.")
        if self.strategy not in STRATEGIES:
            raise SchemeError(f"Unknown strategy {self.strategy!r}; use one of {STRATEGIES}.")
        bits = float(self.target_bits)
        if not math.isfinite(bits) or not 0 < bits <= 16:
            raise SchemeError(f"target_bits must be in (0, 16], got {self.target_bits}.")
        object.__setattr__(self, "target_bits", bits)
        minimum = self.minimum_bits
        if bits < minimum - 1e-9:
            raise SchemeError(
                f"target_bits={bits} is infeasible for formats {'+'.join(formats)}: the minimum "
                f"achievable over the language model is {minimum:.4f} (every layer in "
                f"{self.most_compressed_format}). Raise target_bits (--bits) to at least {minimum:.4f} or add a "
                "smaller format."
            )
        for label in ("num_calib_steps", "num_score_steps", "batch_size"):
            if int(getattr(self, label)) < 1:
                raise SchemeError(f"{label} must be at least 1, got {getattr(self, label)}.")
        if int(self.seq_len) < 2:
            raise SchemeError(f"seq_len must be at least 2, got {self.seq_len}.")

    # -- derived ------------------------------------------------------------------------------
    @property
    def loss_in_chunks(self) -> bool:
        """Gradient scoring under ``extract`` takes its loss LOSS_CHUNK_TOKENS tokens at a time
        (``vlq.search.search.chunked_causal_lm_loss``); ``mask`` runs the VLM's own lm_head and kl_div compares
        whole logits, so both hold the batch's logits."""
        return self.method == "gradient" and self.strategy == "extract"

    @property
    def format_objects(self) -> tuple[QuantFormat, ...]:
        return tuple(FORMATS[f] for f in self.formats)

    @property
    def most_compressed_format(self) -> str:
        return min(self.format_objects, key=lambda f: f.bits).name

    @property
    def minimum_bits(self) -> float:
        """Lowest LM-only effective bits these formats can reach (every group in the smallest)."""
        return min(f.bits for f in self.format_objects)

    @property
    def id(self) -> str:
        """Readable id: ``fp8+int4_awq-6.0b-gradient-extract``."""
        return f"{'+'.join(self.formats)}-{self.target_bits:g}b-{self.method}-{self.strategy}"

    def modelopt_formats(self) -> list[str]:
        return [f.modelopt_config for f in self.format_objects]

    def require_device(self, device: str) -> None:
        """Refuse formats that need CUDA when the search would run elsewhere."""
        needs = [f.name for f in self.format_objects if f.needs_cuda]
        if needs and not str(device).startswith("cuda"):
            raise SchemeError(
                f"Format(s) {', '.join(needs)} need a CUDA GPU (ModelOpt's NVFP4/MXFP8 kernels are "
                f"CUDA-only) but the search runs on {device!r}. Run on a GPU (--device cuda) or choose "
                f"from {', '.join(f for f, q in FORMATS.items() if not q.needs_cuda)}."
            )
        if needs and not cuda_available():
            raise SchemeError(f"Format(s) {', '.join(needs)} need CUDA, and torch.cuda.is_available() is False here.")

    def vllm_servability(self) -> "Servability":
        return servability(self.formats)

    def require_servable(self) -> None:
        verdict = self.vllm_servability()
        if not verdict.servable:
            raise SchemeError(verdict.reason)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["formats"] = list(self.formats)
        for key in _RECIPE_FIELDS:  # written only when a recipe set them: older readers keep reading the rest
            if data[key]:
                data[key] = _lists(data[key])
            else:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scheme":
        if not isinstance(data, dict):
            raise SchemeError(f"A scheme must be a mapping, got {type(data).__name__}.")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known - ({"effective_bits"} if data.get("version") == 1 else set()))
        if unknown:
            raise SchemeError(f"Unknown scheme keys {unknown}; known keys: {sorted(known)}.")
        data = dict(data)
        if data.get("version") == 1:  # version 1 called the target "effective_bits"
            data["version"] = SCHEME_VERSION
            if "effective_bits" in data:
                data["target_bits"] = data.pop("effective_bits")
        if "formats" in data and isinstance(data["formats"], list):
            data["formats"] = tuple(data["formats"])
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "Scheme":
        import yaml

        text = str(text_or_path)
        path = Path(text)
        if "\n" not in text and path.suffix in (".yaml", ".yml"):
            if not path.exists():
                raise SchemeError(f"Scheme file {path} does not exist.")
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SchemeError(f"Scheme YAML does not parse: {exc}") from exc
        return cls.from_dict(data)

    def with_(self, **changes) -> "Scheme":
        return replace(self, **changes)


def _lists(value):
    """``value`` with every tuple a list (YAML and JSON write lists)."""
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


#: Fields a ModelOpt recipe fills (vlq.recipes); no CLI flag sets them.
_RECIPE_FIELDS = ("disabled_layers", "cost_excluded_layers", "search_spaces", "recipe")
#: The scheme's YAML keys (and the CLI flags' dests): its field names, the version and recipe fields aside.
SCHEME_FIELDS = tuple(f.name for f in fields(Scheme) if f.name not in ("version", "gradient_checkpointing", *_RECIPE_FIELDS))

#: Measured recommendation for full-size models (reports/README.md: 16+16 steps x 512 tokens kept
#: about 97% of the 128+128 reference decisions on an H200); the tiny model keeps its seconds-long defaults.
RECOMMENDED_FULL_SIZE = {"num_calib_steps": 16, "num_score_steps": 16, "batch_size": 1, "seq_len": 512}


def default_scheme(device: str = "cpu", *, full_size: bool = False) -> Scheme:
    """What ``vlq run`` searches with no scheme options: formats vLLM serves on ``device``.

    CPU: FP8 against BF16 per group (vLLM's CPU build runs FP8; ModelOpt's NVFP4 needs CUDA).
    CUDA: FP8 + NVFP4 (both served, alone and inside MIXED_PRECISION).
    """
    if str(device).startswith("cuda"):
        scheme = Scheme(formats=("fp8", "nvfp4"), target_bits=6.0)
    else:
        scheme = Scheme(formats=("fp8",), target_bits=12.0)
    return scheme.with_(**RECOMMENDED_FULL_SIZE) if full_size else scheme


SCHEME_FIELDS_HELP = {
    "formats": "candidate formats joined by '+', from: " + ", ".join(FORMATS),
    "target_bits": "target average bits per LM weight (16 = no compression)",
    "method": "gradient (Taylor score, ILP solve) or kl_div (KL of logits, threshold search)",
    "strategy": "extract (search the text model) or mask (search the VLM, vision/lm_head disabled+cost-excluded)",
}
