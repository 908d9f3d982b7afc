"""Before an engine starts: refuse a checkpoint vLLM cannot serve (:func:`preflight`), and resolve the quant
method vLLM would build for every layer without kernels or weights (:func:`resolve_quant_methods`: the check
there is for formats with no kernel on this machine, e.g. NVFP4 and MXFP8 on CPU)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.registry import ALGO_TO_FORMAT, VLLM_SERVABLE_ALGOS, runnable_devices, servability
from ..runtime.errors import CheckpointError, ServingError
from .environment import default_device, prepare_environment
from .results import QuantResolution, ServedLayer, is_unquantized_method


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServingError(f"{path / 'config.json'} cannot be read: {exc}") from exc


@dataclass(frozen=True)
class Preflight:
    path: Path
    quant_algo: str | None
    algos: tuple[str, ...]  # every per-layer quant_algo in the checkpoint
    kv_cache_quant_algo: str | None
    runnable_on: tuple[str, ...]  # devices whose vLLM has kernels for every algo


def preflight(path: str | os.PathLike) -> Preflight:
    """Read a checkpoint's quant config and refuse formats vLLM cannot serve (ServingError)."""
    from ..export.inspect import CheckpointQuantConfig

    path = Path(path).expanduser()
    if not path.exists():
        raise ServingError(f"Checkpoint path {path} does not exist; pass an exported checkpoint folder.")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ServingError(f"{path} is not a checkpoint folder (no config.json); pass the folder vlq exported.")
    config = read_config(path)
    if config.get("model_type") != "qwen2_5_vl":
        raise ServingError(
            f"{path} holds model_type={config.get('model_type')!r}; the serving check covers Qwen2.5-VL "
            "(model_type='qwen2_5_vl') exports."
        )
    if not any(path.glob("*.safetensors")):
        raise ServingError(f"{path} has config.json but no *.safetensors weights.")
    try:
        qc = CheckpointQuantConfig.read(path)
    except CheckpointError as exc:
        raise ServingError(f"Cannot read the quantization config of {path}: {exc}") from exc
    if qc.quant_algo is None:
        algos: tuple[str, ...] = ()
    elif qc.quant_algo == "MIXED_PRECISION":
        algos = tuple(sorted({a for a in qc.quantized_layers.values() if a}))
    else:
        algos = (qc.quant_algo,)
    unknown = [a for a in algos if a not in ALGO_TO_FORMAT and a not in VLLM_SERVABLE_ALGOS]
    if unknown:
        raise ServingError(f"{path}: quant_algo {', '.join(unknown)} is unknown to vlq and vLLM's ModelOpt loader.")
    formats = [ALGO_TO_FORMAT[a] for a in algos if a in ALGO_TO_FORMAT]
    if formats:
        verdict = servability(formats)
        if not verdict.servable:
            raise ServingError(f"{path} cannot be served by vLLM: {verdict.reason}")
    return Preflight(path, qc.quant_algo, algos, qc.kv_cache_quant_algo, runnable_devices(algos))


_MODELOPT_QUANTIZATIONS = ("modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed")


def _vllm_layer_inventory(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(vLLM name, vLLM layer class) of every linear Qwen2.5-VL builds, from its HF config."""
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {}
    rows = []
    for i in range(int(vision.get("depth", 0))):
        p = f"visual.blocks.{i}"
        rows += [(f"{p}.attn.qkv", "QKVParallelLinear"), (f"{p}.attn.proj", "RowParallelLinear"),
                 (f"{p}.mlp.gate_up_proj", "MergedColumnParallelLinear"), (f"{p}.mlp.down_proj", "RowParallelLinear")]
    rows += [("visual.merger.mlp.0", "ColumnParallelLinear"), ("visual.merger.mlp.2", "RowParallelLinear")]
    for i in range(int(text["num_hidden_layers"])):
        p = f"language_model.model.layers.{i}"
        rows += [(f"{p}.self_attn.qkv_proj", "QKVParallelLinear"), (f"{p}.self_attn.o_proj", "RowParallelLinear"),
                 (f"{p}.mlp.gate_up_proj", "MergedColumnParallelLinear"), (f"{p}.mlp.down_proj", "RowParallelLinear")]
    rows.append(("language_model.lm_head", "ParallelLMHead"))
    return rows


def _choose_quantization(quant_cfg: dict[str, Any]) -> str | None:
    """vLLM's choice among its ModelOpt configs, as ``ModelConfig._verify_quantization`` makes it."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    for name in _MODELOPT_QUANTIZATIONS:
        cls = get_quantization_config(name)
        try:
            claimed = cls.override_quantization_method(quant_cfg, None, hf_config=None)
        except TypeError:
            claimed = cls.override_quantization_method(quant_cfg, None)
        if claimed is not None:
            return claimed
    return quant_cfg.get("quant_method")


def resolve_quant_methods(checkpoint_path: str | os.PathLike) -> QuantResolution:
    """Per-layer quant methods vLLM would build for ``checkpoint_path``, without kernels or weights.

    Parses the checkpoint's quantization config exactly as vLLM does (config.json first, then
    hf_quant_config.json), maps names with Qwen2.5-VL's ``hf_to_vllm_mapper`` and asks
    ``get_quant_method`` for each linear, using bare layer objects (kernels are chosen only later,
    in ``create_weights``).  Works for NVFP4/MXFP8 on CPU, where no kernel exists.
    """
    path = Path(checkpoint_path).expanduser().resolve()
    preflight(path)
    prepare_environment(default_device())
    from torch import nn
    from vllm.model_executor.layers import linear as vllm_linear
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen25VL

    config = read_config(path)
    quant_cfg = config.get("quantization_config")
    hf_file = path / "hf_quant_config.json"
    if quant_cfg is None and hf_file.exists():
        quant_cfg = json.loads(hf_file.read_text())
        quant_cfg.setdefault("quant_method", "modelopt")
    inventory = _vllm_layer_inventory(config)
    if quant_cfg is None:
        layers = tuple(ServedLayer(n, c, "UnquantizedLinearMethod" if c != "ParallelLMHead" else "UnquantizedEmbeddingMethod", None)
                       for n, c in inventory)
        return QuantResolution(str(path), None, None, None, layers, None)

    quantization = _choose_quantization(dict(quant_cfg))
    cls = get_quantization_config(quantization)
    qc = cls.from_config(quant_cfg)
    qc.packed_modules_mapping = dict(getattr(VllmQwen25VL, "packed_modules_mapping", {}))
    qc.apply_vllm_mapper(VllmQwen25VL.hf_to_vllm_mapper)

    classes = {"ParallelLMHead": ParallelLMHead}
    layers, errors = [], []
    for name, cls_name in inventory:
        layer_cls = classes.get(cls_name) or getattr(vllm_linear, cls_name)
        layer = object.__new__(layer_cls)  # isinstance-compatible, no TP groups, no weights
        nn.Module.__init__(layer)
        try:
            method = qc.get_quant_method(layer, name)
        except Exception as exc:  # e.g. "Mixed quant_algo within fused layer"
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            layers.append(ServedLayer(name, cls_name, None, None))
            continue
        method_name = type(method).__name__ if method is not None else None
        weight = getattr(getattr(method, "spec", None), "weight", None)
        dtype = str(weight.dtype) if weight is not None and getattr(weight, "dtype", None) is not None else None
        if is_unquantized_method(method_name):
            dtype = None
        layers.append(ServedLayer(name, cls_name, method_name, dtype))

    kv_method = None
    try:
        from vllm.model_executor.layers.attention import Attention  # type: ignore[attr-defined]
    except ImportError:
        try:
            from vllm.attention.layer import Attention  # type: ignore[no-redef]
        except ImportError:
            Attention = None
    if Attention is not None:
        attn = object.__new__(Attention)
        nn.Module.__init__(attn)
        try:
            method = qc.get_quant_method(attn, "language_model.model.layers.0.self_attn.attn")
            kv_method = type(method).__name__ if method is not None else None
        except Exception as exc:
            errors.append(f"attention: {type(exc).__name__}: {exc}")
    return QuantResolution(str(path), quantization, cls.__name__, quant_cfg.get("quant_algo") or
                           (quant_cfg.get("quantization") or {}).get("quant_algo"), tuple(layers), kv_method, tuple(errors))
