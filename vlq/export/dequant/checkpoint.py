"""A whole export re-read from disk (:func:`dequantize_checkpoint`): its quantized layers and everything else,
loaded into a fresh Qwen2.5-VL with the activation quantization its config prescribes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...runtime.errors import CheckpointError
from .algos import ACT_NONE, COMPANIONS, KV_SCALES, QUANTIZED_DTYPES
from .files import TensorMeta, TensorStore, read_quant_config
from .grids import ActivationQuant
from .layers import DequantizedLayer, read_layer


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`DequantizedCheckpoint.load_into` did to a model."""

    model: nn.Module
    modules: dict[str, str]  # checkpoint layer name -> model module name, for every quantized layer
    hooked_modules: tuple[str, ...]  # model-side names whose inputs are fake-quantized
    tied: tuple[str, ...]  # model tensors not on disk because they share storage with a loaded one
    hooks: tuple[Any, ...] = field(repr=False, compare=False)

    @property
    def quantized_modules(self) -> tuple[str, ...]:
        return tuple(self.modules.values())

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


@dataclass(frozen=True)
class DequantizedCheckpoint:
    """An exported checkpoint re-read from disk: its quantized layers and everything else, lazily."""

    path: Path
    quant_algo: str | None  # FP8, ..., MIXED_PRECISION, or None for an unquantized checkpoint
    config_source: str  # which file the quantization config came from
    layers: tuple[DequantizedLayer, ...]
    unquantized_not_excluded: tuple[str, ...]  # BF16 2-D weights a single-format config does not exclude
    kv_cache_quant_algo: str | None
    kv_cache_scales: dict[str, float] = field(compare=False)
    _plain: tuple[str, ...] = field(repr=False, default=())  # keys loaded as stored (norms, biases, vision...)
    _store: TensorStore | None = field(repr=False, compare=False, default=None)

    def layer(self, name: str) -> DequantizedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{name} is not a quantized layer of {self.path}; quantized: {len(self.layers)} layers")

    def algo_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.quant_algo] = counts.get(layer.quant_algo, 0) + 1
        return dict(sorted(counts.items()))

    def _files(self) -> TensorStore:
        if self._store is None:
            raise CheckpointError(f"{self.path}: this DequantizedCheckpoint has no files attached; use dequantize_checkpoint().")
        return self._store

    def keys(self) -> tuple[str, ...]:
        """The tensor names :meth:`iter_state_dict` yields (checkpoint naming), without reading any."""
        return (*self._plain, *(layer.name + ".weight" for layer in self.layers))

    def iter_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
        """Every model tensor in checkpoint naming, quantized weights dequantized, scales dropped; one at a time."""
        for key in self._plain:
            yield key, _as(self._files().get(key), dtype)
        for layer in self.layers:
            yield layer.name + ".weight", layer.weight(dtype)

    def load_into(self, model: nn.Module, *, activations: bool = True) -> LoadResult:
        """Copy the checkpoint into ``model`` (a fresh Qwen2.5-VL of the same config), layer by layer.

        Names map from the hub layout (``model.layers.N``, ``visual.``) to transformers-5 modules
        (``model.language_model.layers.N``, ``model.visual.``).  Every model parameter and persistent
        buffer must be filled (tied ones excepted) and every checkpoint tensor used, else
        ``CheckpointError``.  With ``activations``, each quantized linear gets a forward pre-hook that
        applies its :class:`ActivationQuant`.
        """
        store = self._files()
        targets = model.state_dict(keep_vars=True)
        filled: dict[str, torch.Tensor] = {}
        unused: list[str] = []
        quantized: list[str] = []

        def put(ckpt_key: str, value: Callable[[torch.dtype], torch.Tensor]) -> str | None:
            model_key = _model_key(ckpt_key, targets)
            if model_key is None:
                unused.append(ckpt_key)
                return None
            target = targets[model_key]
            tensor = value(target.dtype)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{self.path}: {ckpt_key} has shape {tuple(tensor.shape)} but the model's {model_key} is "
                    f"{tuple(target.shape)}; load it into a model built from this checkpoint's config.json."
                )
            with torch.no_grad():
                target.data.copy_(tensor.to(target.device))
            filled[model_key] = target
            return model_key

        for key in self._plain:
            put(key, lambda dtype, key=key: _as(store.get(key), dtype))
        for layer in self.layers:
            model_key = put(layer.name + ".weight", layer.weight)
            if model_key is not None:
                quantized.append(model_key[: -len(".weight")])
        if unused:
            raise CheckpointError(
                f"{self.path}: {len(unused)} checkpoint tensors have no place in the model (first: {unused[0]}); "
                "load it into a Qwen2.5-VL built from this checkpoint's config.json."
            )
        loaded_storage = {t.data_ptr() for t in filled.values()}
        tied = tuple(k for k, t in targets.items() if k not in filled and t.data_ptr() in loaded_storage)
        missing = [k for k in targets if k not in filled and k not in tied]
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} model tensors are not in the checkpoint (first: {missing[0]}); "
                "the checkpoint is incomplete or belongs to another architecture."
            )
        hooks, hooked = [], []
        if activations:
            for module_name, layer in zip(quantized, self.layers, strict=True):
                act = layer.activation
                if act.kind == ACT_NONE and act.pre_quant_scale is None:
                    continue
                module = model.get_submodule(module_name)
                hooks.append(module.register_forward_pre_hook(_activation_hook(act)))
                hooked.append(module_name)
        modules = {layer.name: module_name for layer, module_name in zip(self.layers, quantized, strict=True)}
        return LoadResult(model, modules, tuple(hooked), tied, tuple(hooks))

    def build_model(self, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    activations: bool = True) -> LoadResult:
        """A fresh ``Qwen2_5_VLForConditionalGeneration`` from config.json, loaded with :meth:`load_into`."""
        from ...runtime import compat as _compat

        _compat.apply_torchvision_schema_shim()  # transformers' image utilities import torchvision
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config_dict = json.loads((self.path / "config.json").read_text())
        if config_dict.get("model_type") != "qwen2_5_vl":
            raise CheckpointError(
                f"{self.path} holds model_type={config_dict.get('model_type')!r}; build_model makes a Qwen2.5-VL. "
                "Use load_into with a model of that architecture instead."
            )
        config_dict.pop("quantization_config", None)  # the weights arrive dequantized
        config = Qwen2_5_VLConfig.from_dict(config_dict)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.eval()
        return self.load_into(model, activations=activations)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _model_key(ckpt_key: str, targets: dict[str, Any]) -> str | None:
    """A checkpoint key (hub layout or transformers-5 layout) -> the model's state-dict key."""
    candidates = [ckpt_key]
    if ckpt_key.startswith("model.") and not ckpt_key.startswith(("model.language_model.", "model.visual.")):
        candidates.append("model.language_model." + ckpt_key[len("model."):])
    if ckpt_key.startswith("visual."):
        candidates.append("model." + ckpt_key)
    return next((c for c in candidates if c in targets), None)


def _activation_hook(act: ActivationQuant):
    def hook(_module, args):
        if not args:
            return None
        return (act.apply(args[0]), *args[1:])

    return hook


def dequantize_checkpoint(path: str | os.PathLike) -> DequantizedCheckpoint:
    """Read an exported checkpoint folder: quantization config, tensor index and per-layer formats.

    No weight is decoded here (only the scalar scales an :class:`ActivationQuant` needs and the
    ``pre_quant_scale`` vectors); :meth:`DequantizedLayer.weight` reads and decodes one layer at a
    time.  Raises :class:`~vlq.runtime.errors.CheckpointError` in one line for an unknown ``quant_algo``, a
    missing or unexpected tensor, a quantized weight the config does not account for, or a shape that
    does not fit its format.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; point at an exported checkpoint folder.")
    config = read_quant_config(path)
    store = TensorStore(path)

    groups: dict[str, dict[str, TensorMeta]] = {}
    for key, meta in store.meta.items():
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, {})[leaf] = meta

    layers: list[DequantizedLayer] = []
    plain: list[str] = []
    kv_scales: dict[str, float] = {}
    not_excluded: list[str] = []
    for module in sorted(groups):
        tensors = groups[module]
        companions = [leaf for leaf in tensors if leaf in COMPANIONS]
        weight = tensors.get("weight")
        for leaf in KV_SCALES:
            if leaf in tensors:
                kv_scales[f"{module}.{leaf}"] = float(store.get(f"{module}.{leaf}").float().reshape(-1)[0])
        quantized_weight = weight is not None and weight.dtype in QUANTIZED_DTYPES
        if not quantized_weight and not companions:
            plain.extend(m.key for leaf, m in sorted(tensors.items()) if leaf not in KV_SCALES)
            if (weight is not None and len(weight.shape) == 2 and config.quant_algo not in (None, "MIXED_PRECISION")
                    and config.algo_for(module) is not None):
                not_excluded.append(module)
            continue
        if weight is None:
            raise CheckpointError(
                f"{path}: {module} has {', '.join(sorted(companions))} but no {module}.weight; the checkpoint "
                "is incomplete, re-export it."
            )
        algo = config.algo_for(module)
        if algo is None:
            why = "lists no quant_algo for it" if config.quant_algo else "has no quantization config"
            raise CheckpointError(
                f"{path}: {module}.weight is stored as {weight.dtype} with scales {sorted(companions)} but the "
                f"config ({config.source}) {why}; re-export so config and tensors agree."
            )
        layers.append(read_layer(path, module, algo, tensors, config, store))
        plain.extend(m.key for leaf, m in sorted(tensors.items()) if leaf == "bias")

    if config.quant_algo == "MIXED_PRECISION":
        found = {layer.name for layer in layers}
        absent = sorted(set(config.layers) - found)
        if absent:
            raise CheckpointError(
                f"{path}: quantized_layers lists {len(absent)} layers with no quantized weight on disk "
                f"(first: {absent[0]}); the checkpoint is incomplete, re-export it."
            )
    return DequantizedCheckpoint(
        path=path,
        quant_algo=config.quant_algo,
        config_source=config.source,
        layers=tuple(layers),
        unquantized_not_excluded=tuple(not_excluded),
        kv_cache_quant_algo=config.kv_cache_quant_algo,
        kv_cache_scales=kv_scales,
        _plain=tuple(plain),
        _store=store,
    )
