"""Stage 3 — named quantization formats, search schemes, and ModelOpt configs.

A *format* is one ModelOpt quantization config under a short name (``fp8``, ``int4_awq``...).  A
*scheme* is what a search is asked to do: candidate formats, effective-bits target, method,
restriction strategy and step counts.  Schemes are frozen, validated on construction and round-trip
through dicts and YAML with a version field.

ModelOpt configs are ordered lists of ``{"quantizer_name": pattern, "cfg" | "enable", "parent_class"?}``
entries where the last match wins.  Some entries match per layer (``*weight_quantizer``), others by a
*global module name* (``*lm_head*``, ``*visual*``) or by parent class (``nn.Embedding``).  Inside
``auto_quantize`` the name-based ones are ignored, which is why vlq passes exclusions as
``disabled_layers``; :func:`pattern_entries` shows which entries of a config are name based and
:func:`build_config` builds variants (all-layers FP8, LM-only FP8) from them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from ..runtime.errors import SchemeError

SCHEME_VERSION = 2  # 2: effective_bits renamed target_bits (the achieved value lives in results)

METHODS = ("gradient", "kl_div")
STRATEGIES = ("extract", "mask")

# Per-layer quantizer-name patterns: they act on each searched layer, not on global names.
_PER_LAYER_PATTERNS = frozenset(
    {"*", "*weight_quantizer", "*input_quantizer", "*output_quantizer", "*[kv]_bmm_quantizer"}
)

# Module-name patterns that cover the vision tower of ModelOpt-known VLMs (Qwen2.5-VL: model.visual).
VISION_NAME_PATTERNS = ("*visual*", "*vision_tower*", "*vision_model*", "*embed_vision*", "*multi_modal_projector*")
LM_HEAD_PATTERNS = ("*lm_head*",)

# What vLLM's ModelOpt loader accepts (quant_algo), and what it accepts inside MIXED_PRECISION.
VLLM_SERVABLE_ALGOS = frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8"})
VLLM_SERVABLE_IN_MIXED = frozenset({"FP8", "NVFP4", "W4A16_NVFP4"})


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format: its ModelOpt config, export name and where it can run.

    ``export_quant_algo`` is what ModelOpt's unified HF export writes as ``quant_algo`` for a
    layer in this format; vLLM decides servability from it.
    """

    name: str
    modelopt_config: str
    export_quant_algo: str
    needs_cuda: bool
    description: str
    #: Bits per weight as AutoQuant's cost model counts them (NVFP4: 4.5 with its scales).  Kept here
    #: so schemes validate without importing ModelOpt; tests/test_schemes.py pins each to ModelOpt's
    #: live ``QuantRecipe(config).compression * 16``.
    bits: float = 16.0
    #: AWQ and SmoothQuant fold their per-channel smoothing into the BF16 weights when the format is
    #: applied, so switching a group away from it afterwards does not give back the original weights.
    folds_weights: bool = False
    #: Weights are quantized in blocks of this many input features (``None``: per tensor / channel).
    #: ModelOpt's export packs whole blocks only ("partial blocks are not supported") and vLLM's NVFP4 and
    #: MXFP8 kernels refuse other input sizes; tests/test_faults.py pins each to ModelOpt's live config.
    block_size: int | None = None
    #: Output features must be a multiple of this (INT4 packs two output channels per byte).
    out_multiple: int = 1

    @property
    def calibration_by_batch(self) -> bool:
        """AWQ searches its scales batch by batch, so other batching calibrates differently; max and
        SmoothQuant calibration reduce every forward by a running max (vlq.search.search.calibration_forwards)."""
        return "awq" in str(self.config.get("algorithm", "")).lower()

    @property
    def config(self) -> dict[str, Any]:
        from modelopt.torch.quantization import config as mtq_config

        return copy.deepcopy(getattr(mtq_config, self.modelopt_config))

    def modelopt_bits(self) -> float:
        """The same figure read from the installed ModelOpt (what :attr:`bits` must equal)."""
        from modelopt.torch.quantization.algorithms import QuantRecipe

        return QuantRecipe(self.modelopt_config).compression * 16

    @property
    def vllm_servable(self) -> bool:
        return self.export_quant_algo in VLLM_SERVABLE_ALGOS

    def quantizer_cfgs(self) -> tuple[Any, Any]:
        """The (weight, input) quantizer ``cfg`` of a searched linear layer in this format, as ModelOpt's config
        gives them (the last matching entry wins); ``None`` for a disabled quantizer."""
        weight = input_ = None
        for entry in self.config["quant_cfg"]:
            if entry.get("parent_class"):
                continue
            pattern = entry.get("quantizer_name")
            if pattern == "*weight_quantizer":
                weight = None if entry.get("enable") is False else entry.get("cfg")
            elif pattern == "*input_quantizer":
                input_ = None if entry.get("enable") is False else entry.get("cfg")
        return weight, input_

    def quantizer_signature(self) -> "QuantizerSignature":
        """What a layer quantized in this format looks like (see :func:`live_signature`)."""
        weight, input_ = self.quantizer_cfgs()
        return QuantizerSignature(weight=_cfg_signature(weight), input=_cfg_signature(input_))


@dataclass(frozen=True)
class QuantizerSignature:
    """Bits and block size of a layer's weight and input quantizers; ``None`` means disabled."""

    weight: tuple | None
    input: tuple | None


def _bits(num_bits) -> Any:
    return tuple(num_bits) if isinstance(num_bits, (list, tuple)) else num_bits


def _block(block_sizes) -> int | None:
    if not block_sizes:
        return None
    for key, value in dict(block_sizes).items():
        if key in (-1, "-1"):
            return int(value)
    return None


def _cfg_signature(cfg) -> tuple | None:
    if cfg is None:
        return None
    if isinstance(cfg, list):  # sequential quantizer, e.g. W4A8 AWQ weights: int4 blocks then fp8
        return tuple(_cfg_signature(c) for c in cfg)
    if cfg.get("enable") is False:
        return None
    return (_bits(cfg.get("num_bits")), _block(cfg.get("block_sizes")))


def _quantizer_signature(quantizer) -> tuple | None:
    """Signature of a live ModelOpt TensorQuantizer or SequentialQuantizer."""
    if quantizer is None:
        return None
    children = list(quantizer) if hasattr(quantizer, "__iter__") and not hasattr(quantizer, "num_bits") else None
    if children is not None:
        sigs = tuple(_quantizer_signature(q) for q in children)
        return None if all(s is None for s in sigs) else sigs
    if not getattr(quantizer, "is_enabled", False):
        return None
    return (_bits(quantizer.num_bits), _block(getattr(quantizer, "block_sizes", None)))


def live_signature(module) -> QuantizerSignature:
    """The quantizer signature of a live (ModelOpt-converted) linear layer."""
    return QuantizerSignature(
        weight=_quantizer_signature(getattr(module, "weight_quantizer", None)),
        input=_quantizer_signature(getattr(module, "input_quantizer", None)),
    )


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("fp8", "FP8_DEFAULT_CFG", "FP8", False, "FP8 E4M3 weights and activations, per-tensor scales", 8.0),
        QuantFormat("int4_awq", "INT4_AWQ_CFG", "W4A16_AWQ", False, "INT4 weights in blocks of 128 (AWQ), BF16 activations", 4.0, True,
                    block_size=128, out_multiple=2),
        QuantFormat("w4a8_awq", "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", False, "INT4 AWQ weights, FP8 activations", 4.0, True,
                    block_size=128, out_multiple=2),
        QuantFormat("int8_sq", "INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", False, "INT8 SmoothQuant, per-channel weights", 8.0, True),
        QuantFormat("nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4", True, "NVFP4 weights and activations, blocks of 16", 4.5, block_size=16),
        QuantFormat("w4a16_nvfp4", "W4A16_NVFP4_CFG", "W4A16_NVFP4", True, "NVFP4 weights, BF16 activations", 4.5, block_size=16),
        QuantFormat("mxfp8", "MXFP8_DEFAULT_CFG", "MXFP8", True, "MXFP8 weights and activations, blocks of 32", 8.0, block_size=32),
    )
}
NO_QUANT = "none"  # the format name vlq gives AutoQuant's always-present "do not quantize" choice


#: Export quant_algo -> vlq format name (what a checkpoint config says, in vlq's names).
ALGO_TO_FORMAT = {f.export_quant_algo: f.name for f in FORMATS.values()}


def format_of_algo(algo: str | None) -> str:
    """vlq's name for an exported quant_algo; ``None`` (unquantized) is :data:`NO_QUANT`."""
    if algo is None:
        return NO_QUANT
    return ALGO_TO_FORMAT.get(algo, algo.lower())


def get_format(name: str) -> QuantFormat:
    key = name.strip().lower()
    if key not in FORMATS:
        raise SchemeError(f"Unknown format {name!r}. Known formats: {', '.join(FORMATS)}.")
    return FORMATS[key]


def format_for_modelopt_name(recipe_name: str) -> str:
    """Map a ModelOpt recipe name (``FP8_DEFAULT_CFG``, ``NONE``) to vlq's format name."""
    base = str(recipe_name).split("(")[0].strip()
    if base == "NONE":
        return NO_QUANT
    for fmt in FORMATS.values():
        if fmt.modelopt_config == base:
            return fmt.name
    raise SchemeError(f"ModelOpt recipe {recipe_name!r} is not one of vlq's formats ({', '.join(FORMATS)}).")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Tokens whose logits exist at once while gradient scoring under ``extract`` (3B: 256 x 151936 vocabulary
# ~ 0.4 GiB with the fp32 log-softmax and its gradient) instead of the whole batch's (batch 4 x 512: ~3 GiB).
LOSS_CHUNK_TOKENS = 256


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


# ------------------------------------------------------------------------------------------------
# Pattern-based config inspection and custom configs
# ------------------------------------------------------------------------------------------------


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


SCHEME_FIELDS_HELP = {
    "formats": "candidate formats joined by '+', from: " + ", ".join(FORMATS),
    "target_bits": "target average bits per LM weight (16 = no compression)",
    "method": "gradient (Taylor score, ILP solve) or kl_div (KL of logits, threshold search)",
    "strategy": "extract (search the text model) or mask (search the VLM, vision/lm_head disabled+cost-excluded)",
}
