"""Reading an export's files: the safetensors tensor index (opened lazily) and its quantization config."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...runtime.errors import CheckpointError
from .algos import HF_QUANT_CONFIG, SPECS, SUPPORTED_ALGOS


@dataclass(frozen=True)
class TensorMeta:
    key: str
    dtype: str  # safetensors dtype string: BF16, F32, F8_E4M3, U8, I8
    shape: tuple[int, ...]
    file: Path


class TensorStore:
    """Key -> tensor over a checkpoint's safetensors files; file handles opened on first use."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no *.safetensors files; point at an exported checkpoint folder.")
        self.meta: dict[str, TensorMeta] = {}
        for file in files:
            with safe_open(file, "pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    self.meta[key] = TensorMeta(key, sl.get_dtype(), tuple(sl.get_shape()), file)
        self._handles: dict[Path, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        meta = self.meta.get(key)
        if meta is None:
            raise CheckpointError(f"Tensor {key} is missing from the checkpoint.")
        handle = self._handles.get(meta.file)
        if handle is None:
            handle = self._handles[meta.file] = self._safe_open(meta.file, "pt")
        return handle.get_tensor(key)


@dataclass(frozen=True)
class QuantConfig:
    quant_algo: str | None
    exclude_modules: tuple[str, ...]
    layers: dict[str, dict[str, Any]]  # MIXED_PRECISION: layer -> its entry (quant_algo, group_size...)
    group_size: int | None
    kv_cache_quant_algo: str | None
    source: str

    def algo_for(self, name: str) -> str | None:
        if self.quant_algo is None:
            return None
        if self.quant_algo == "MIXED_PRECISION":
            entry = self.layers.get(name)
            return None if entry is None else entry.get("quant_algo")
        if any(name == p or fnmatch.fnmatch(name, p) for p in self.exclude_modules):
            return None
        return self.quant_algo

    def group_size_for(self, name: str) -> int | None:
        entry = self.layers.get(name) or {}
        value = entry.get("group_size", self.group_size)
        return int(value) if value else None


def read_quant_config(path: Path) -> QuantConfig:
    """The quantization config, from ``hf_quant_config.json`` (ModelOpt's own) or config.json's copy."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; point at an exported checkpoint folder.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON ({exc}); re-export the checkpoint.") from exc
    in_config = config.get("quantization_config")
    hf_file = path / HF_QUANT_CONFIG
    raw: dict[str, Any] | None = None
    source = "none"
    if hf_file.is_file():
        try:
            raw = json.loads(hf_file.read_text()).get("quantization")
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{hf_file} is not readable JSON ({exc}); re-export the checkpoint.") from exc
        source = HF_QUANT_CONFIG
    if raw is None and in_config is not None:
        method = in_config.get("quant_method")
        if method != "modelopt":
            # other producers (compressed-tensors, AWQ, GPTQ...) pack differently under the same names
            raise CheckpointError(
                f"{config_file}: quantization_config has quant_method={method!r}; vlq.export.dequant reads ModelOpt "
                "exports (quant_method 'modelopt'). Re-export with vlq."
            )
        raw, source = in_config, "config.json"
    if raw is None:
        return QuantConfig(None, (), {}, None, None, source)
    algo = raw.get("quant_algo")
    if in_config is not None and source == HF_QUANT_CONFIG and in_config.get("quant_algo") != algo:
        # vLLM reads config.json, ModelOpt wrote hf_quant_config.json: disagreeing copies serve differently
        raise CheckpointError(
            f"{path}: config.json quantization_config has quant_algo={in_config.get('quant_algo')!r} but "
            f"{HF_QUANT_CONFIG} has {algo!r}; re-export so both say the same."
        )
    layers = {str(k): dict(v) for k, v in (raw.get("quantized_layers") or {}).items()}
    excludes = tuple(raw.get("exclude_modules") or raw.get("ignore") or ())
    for name, entry in ([("(checkpoint)", {"quant_algo": algo})] if algo != "MIXED_PRECISION" else []) + list(layers.items()):
        require_known(path, name, entry.get("quant_algo"))
    return QuantConfig(algo, excludes, layers, raw.get("group_size"), raw.get("kv_cache_quant_algo"), source)


def require_known(path: Path, layer: str, algo: str | None) -> None:
    if algo is None or algo in SPECS:
        return
    raise CheckpointError(
        f"{path}: quant_algo {algo!r} ({layer}) is not one vlq.export.dequant reads; known: "
        f"{', '.join(SUPPORTED_ALGOS)} (and MIXED_PRECISION of them). Export with one of vlq's formats."
    )
