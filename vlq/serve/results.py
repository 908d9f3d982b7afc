"""What vLLM made of a checkpoint, as plain typed data that stays valid after the engine is gone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def is_unquantized_method(name: str | None) -> bool:
    return bool(name) and name.startswith("Unquantized")


def _layer_named(layers, name: str):
    for layer in layers:
        if layer.name == name:
            return layer
    raise KeyError(name)


@dataclass(frozen=True)
class ServedLayer:
    """One module of the served (or resolved) model that carries a quant method."""

    name: str  # vLLM naming, e.g. language_model.model.layers.0.self_attn.qkv_proj
    layer_cls: str
    quant_method: str | None
    weight_dtype: str | None  # None when unknown (resolution without weights)
    scale_params: tuple[str, ...] = ()
    unloaded_scales: tuple[str, ...] = ()  # scale params still holding the never-loaded sentinel


@dataclass(frozen=True)
class KvCacheLayer:
    name: str
    kv_cache_dtype: str
    k_scale: float
    v_scale: float
    quant_method: str | None


@dataclass(frozen=True)
class GenerationResult:
    """A greedy generation: tokens, the logprob of each chosen token, and the top-k per step."""

    kind: str  # "text" or "image"
    prompt_len: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()

    def top(self, step: int) -> dict[int, float]:
        return dict(self.top_logprobs[step]) if step < len(self.top_logprobs) else {}


@dataclass(frozen=True)
class VisionProbe:
    """``model.visual`` run directly on fixed raw pixels inside the engine."""

    ran: bool
    shape: tuple[int, ...] = ()
    values: tuple[float, ...] = ()  # flattened output (small for probe-sized inputs)
    values_alt: tuple[float, ...] = ()  # the output for other pixels
    error: str = ""

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    @property
    def abs_mean(self) -> float:
        return sum(abs(v) for v in self.values) / len(self.values) if self.values else 0.0


@dataclass(frozen=True)
class ServingReport:
    """Everything a serving run observed; plain data, valid after the engine is shut down."""

    checkpoint: str
    device: str
    model_cls: str
    quant_algo: str | None
    kv_cache_dtype: str
    layers: tuple[ServedLayer, ...]
    kv_layers: tuple[KvCacheLayer, ...]
    text: GenerationResult
    image: GenerationResult
    image_alt: GenerationResult  # same prompt, a different image
    vision_probe: VisionProbe
    engine_start_s: float
    generate_s: float
    peak_rss_bytes: int = 0

    def layer(self, name: str) -> ServedLayer:
        return _layer_named(self.layers, name)


@dataclass(frozen=True)
class QuantResolution:
    """Per-layer quant methods vLLM would build for a checkpoint, resolved without kernels."""

    checkpoint: str
    quantization: str | None  # vLLM's quantization name, e.g. modelopt_fp4
    config_class: str | None
    quant_algo: str | None
    layers: tuple[ServedLayer, ...]
    kv_method: str | None
    errors: tuple[str, ...] = ()

    def layer(self, name: str) -> ServedLayer:
        return _layer_named(self.layers, name)


@dataclass(frozen=True)
class PromptLogprobTable:
    """vLLM's log-probabilities of one prompt, aligned like logits: row ``t`` is the distribution of token ``t + 1``.

    ``returned`` is None when vLLM returned the whole vocabulary; else it marks the entries vLLM returned (each
    position's top k and the prompt's own next token), and the others hold -inf in ``logprobs``.
    """

    logprobs: "Any"  # torch.Tensor [T, V] float32
    returned: "Any" = None  # torch.Tensor [T, V] bool, or None (every entry returned)

    @property
    def full(self) -> bool:
        return self.returned is None
