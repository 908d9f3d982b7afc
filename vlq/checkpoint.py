"""Stage 6b — read an exported checkpoint from its files alone: quantization config, tensors, checks.

Independent of the code that wrote it: only ``config.json``, ``hf_quant_config.json`` and the
safetensors headers (plus the few per-tensor scales of fused groups) are read, so what is checked is
what vLLM will load.  :func:`inspect_checkpoint` returns a :class:`CheckpointReport` whose ``check``
lists every broken guarantee.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import Check
from .errors import CheckpointError

HF_QUANT_CONFIG = "hf_quant_config.json"

# Tensors each exported quant_algo must carry next to ``weight`` (ModelOpt 0.47 unified export).
REQUIRED_TENSORS: dict[str, tuple[str, ...]] = {
    "FP8": ("weight_scale", "input_scale"),
    "W4A16_AWQ": ("weight_scale",),
    "W4A8_AWQ": ("weight_scale", "weight_scale_2", "input_scale"),
    "W8A8_SQ_PER_CHANNEL": ("weight_scale", "input_scale"),
    "NVFP4": ("weight_scale", "weight_scale_2", "input_scale"),
    "W4A16_NVFP4": ("weight_scale", "weight_scale_2"),
    "MXFP8": ("weight_scale",),
}
WEIGHT_DTYPES: dict[str, tuple[str, ...]] = {
    "FP8": ("F8_E4M3",),
    "W4A16_AWQ": ("U8", "I8"),
    "W4A8_AWQ": ("U8", "I8"),
    "W8A8_SQ_PER_CHANNEL": ("I8",),
    "NVFP4": ("U8",),
    "W4A16_NVFP4": ("U8",),
    "MXFP8": ("F8_E4M3",),
}
SCALE_SUFFIXES = ("_scale", "_scale_2", "_amax", "pre_quant_scale", "k_scale", "v_scale")
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


def checkpoint_module_name(name: str, lm_path: str = "model.language_model", vision_root: str = "model.visual") -> str:
    """Map a transformers-5 module name to the name ``save_pretrained`` writes (hub layout).

    ``model.language_model.layers.0.mlp`` -> ``model.layers.0.mlp``;
    ``model.visual.blocks.0`` -> ``visual.blocks.0``; ``lm_head`` stays.
    """
    if name == lm_path or name.startswith(lm_path + "."):
        return "model" + name[len(lm_path):]
    if name == vision_root or name.startswith(vision_root + "."):
        return "visual" + name[len(vision_root):]
    return name


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint's quantization config
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointQuantConfig:
    """A checkpoint's quantization config as vLLM's ModelOpt loader reads it."""

    quant_algo: str | None
    exclude_modules: tuple[str, ...]
    quantized_layers: dict[str, str]  # MIXED_PRECISION only: layer -> quant_algo
    kv_cache_quant_algo: str | None
    raw: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "CheckpointQuantConfig":
        path = Path(path)
        hf_file = path / HF_QUANT_CONFIG
        config_file = path / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{path} has no config.json; it is not an exported checkpoint.")
        config = json.loads(config_file.read_text())
        qc = config.get("quantization_config")
        if hf_file.exists():
            raw = json.loads(hf_file.read_text()).get("quantization", {})
        elif qc is not None:
            raw = qc
        else:
            return cls(None, (), {}, None, {})
        algo = raw.get("quant_algo")
        excludes = tuple(raw.get("exclude_modules") or raw.get("ignore") or ())
        layers = {k: v.get("quant_algo") for k, v in (raw.get("quantized_layers") or {}).items()}
        if qc is not None and hf_file.exists():
            # vLLM reads config.json's copy; the two must agree or what we check is not what serves.
            if qc.get("quant_algo") != algo or tuple(qc.get("ignore") or qc.get("exclude_modules") or ()) != excludes and algo != "MIXED_PRECISION":
                raise CheckpointError(
                    f"{path}: config.json quantization_config (quant_algo={qc.get('quant_algo')}, "
                    f"ignore={qc.get('ignore')}) disagrees with {HF_QUANT_CONFIG} (quant_algo={algo}, "
                    f"exclude_modules={list(excludes)})."
                )
        return cls(algo, excludes, layers, raw.get("kv_cache_quant_algo"), raw)

    def is_excluded(self, name: str) -> bool:
        return any(name == p or fnmatch.fnmatch(name, p) for p in self.exclude_modules)

    def algo_for(self, name: str) -> str | None:
        """The quant_algo vLLM applies to layer ``name`` (checkpoint naming), ``None`` = unquantized."""
        if self.quant_algo is None:
            return None
        if self.quant_algo == "MIXED_PRECISION":
            return self.quantized_layers.get(name)
        return None if self.is_excluded(name) else self.quant_algo


# ------------------------------------------------------------------------------------------------
# On-disk inspection
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerReport:
    name: str  # checkpoint naming
    quant_algo: str | None
    weight_dtype: str
    tensors: tuple[str, ...]  # suffixes present next to the layer (weight, weight_scale, ...)


@dataclass(frozen=True)
class CheckpointReport:
    """What is on disk, layer by layer, and the guarantees it keeps (``check``)."""

    path: Path
    quant_config: CheckpointQuantConfig
    layers: tuple[LayerReport, ...]
    unified_groups: int
    check: Check

    def quantized_layers(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.quant_algo is not None)

    def at(self, path: Path) -> "CheckpointReport":
        """The same report naming another folder (the destination, not the temporary export folder)."""
        return CheckpointReport(path, self.quant_config, self.layers, self.unified_groups,
                                _checkpoint_check(path, self.quant_config, self.layers, self.unified_groups, self.check.problems))


def _checkpoint_check(path: Path, config: CheckpointQuantConfig, layers, unified: int, problems) -> Check:
    quantized = sum(1 for layer in layers if layer.quant_algo is not None)
    detail = (f"{config.quant_algo or 'unquantized'}: {quantized} quantized layers, {unified} fused groups share scales, "
              "vision BF16 and excluded")
    return Check(f"checkpoint on disk ({path.name})", tuple(problems), len(layers), detail, CheckpointError)


def _read_tensor_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors files.")
    index = {}
    for file in files:
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                index[key] = (sl.get_dtype(), tuple(sl.get_shape()), file)
    return index


def _load_tensor(path: Path, key: str):
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return fh.get_tensor(key)


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    vision_prefix: str = "visual",
    lm_head: str = "lm_head",
    original_vision_dtype: str = "BF16",
) -> CheckpointReport:
    """Check an exported checkpoint on disk, from its files alone.

    * every vision tensor keeps ``original_vision_dtype`` and no scale tensor sits under the tower;
    * the quantization config excludes every vision layer and ``lm_head`` (else vLLM quantizes them);
    * each quantized LM layer carries the weight dtype and scale tensors its quant_algo needs;
    * members of each fused q/k/v and gate/up group share one format and equal per-tensor scales.
    """
    path = Path(path)
    config = CheckpointQuantConfig.read(path)
    index = _read_tensor_index(path)
    problems: list[str] = []

    layer_tensors: dict[str, dict[str, tuple[str, tuple[int, ...], Path]]] = {}
    for key, meta in index.items():
        if key.endswith(".weight") or any(key.endswith("." + s) or key.endswith(s) for s in SCALE_SUFFIXES) or key.endswith(".bias"):
            layer, _, leaf = key.rpartition(".")
            layer_tensors.setdefault(layer, {})[leaf] = meta

    vprefix = vision_prefix + "."
    for key, (dtype, _shape, _file) in index.items():
        if key.startswith(vprefix):
            leaf = key.rpartition(".")[2]
            if any(leaf.endswith(s) for s in SCALE_SUFFIXES) or leaf in ("input_scale", "weight_scale"):
                problems.append(f"vision tensor {key} is a quantization scale; the vision tower must stay unquantized")
            elif dtype != original_vision_dtype:
                problems.append(f"vision tensor {key} has dtype {dtype}, expected {original_vision_dtype}")

    layers = []
    for layer, tensors in sorted(layer_tensors.items()):
        if "weight" not in tensors:
            continue
        weight_dtype = tensors["weight"][0]
        is_linear_like = len(tensors["weight"][1]) >= 2 and not layer.endswith("embed_tokens")
        if not is_linear_like:
            continue
        algo = config.algo_for(layer)
        layers.append(LayerReport(layer, algo, weight_dtype, tuple(sorted(tensors))))
        in_vision = layer.startswith(vprefix)
        if (in_vision or layer == lm_head) and algo is not None:
            problems.append(
                f"quantization config applies {algo} to {layer}: its ignore list does not exclude "
                f"{'the vision tower' if in_vision else 'lm_head'}, so vLLM would quantize it"
            )
            continue
        if algo is None:
            if weight_dtype not in ("BF16", "F16", "F32"):
                problems.append(f"{layer} is unquantized in the config but its weight is {weight_dtype}")
            continue
        allowed = WEIGHT_DTYPES.get(algo)
        if allowed and weight_dtype not in allowed:
            problems.append(f"{layer}: {algo} expects weight dtype {'/'.join(allowed)}, found {weight_dtype}")
        for needed in REQUIRED_TENSORS.get(algo, ()):
            if needed not in tensors:
                problems.append(f"{layer}: {algo} needs tensor {layer}.{needed}, missing")

    # lm_head must be excluded even when tied (vLLM skips tied lm_head weights but still builds the
    # layer with the checkpoint's quant method when it is not excluded).
    if config.quant_algo not in (None, "MIXED_PRECISION") and not config.is_excluded(lm_head):
        problems.append(f"quantization config does not exclude {lm_head}; vLLM would quantize it")
    if config.quant_algo == "MIXED_PRECISION" and lm_head in config.quantized_layers:
        problems.append(f"quantization config quantizes {lm_head} ({config.quantized_layers[lm_head]})")

    unified = 0
    by_layer = {l.name: l for l in layers}
    for parent in sorted({l.name.rpartition(".")[0] for l in layers}):
        for names in FUSED_GROUPS:
            members = [by_layer.get(f"{parent}.{n}") for n in names]
            if any(m is None for m in members) or parent.startswith(vprefix):
                continue
            algos = {m.quant_algo for m in members}
            if len(algos) != 1:
                problems.append(f"fused group {parent}.{{{','.join(names)}}} mixes formats {sorted(map(str, algos))}")
                continue
            if None in algos:
                continue
            for scale in ("weight_scale", "input_scale", "weight_scale_2"):
                metas = [index.get(f"{m.name}.{scale}") for m in members]
                if any(meta is None for meta in metas) or any(len(meta[1]) != 0 for meta in metas):
                    continue  # per-channel / block scales are not fused into one value
                values = [float(_load_tensor(meta[2], f"{m.name}.{scale}")) for meta, m in zip(metas, members)]
                if len(set(values)) != 1:
                    problems.append(
                        f"fused group {parent}.{{{','.join(names)}}} has different {scale} values {values}; "
                        "vLLM fuses them into one layer with one scale"
                    )
            unified += 1
    return CheckpointReport(path, config, tuple(layers), unified, _checkpoint_check(path, config, layers, unified, problems))
