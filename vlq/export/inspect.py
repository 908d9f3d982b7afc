"""Stage 6b — read an exported checkpoint from its files alone: quantization config, tensors, checks.

Independent of the code that wrote it: only ``config.json``, ``hf_quant_config.json``, the shard
index and the safetensors headers (plus the scale tensors' values) are read, so what is checked is
what vLLM will load.  :func:`inspect_checkpoint` returns a :class:`CheckpointReport` whose ``check``
lists every broken guarantee; ``vlq check`` runs it before any engine starts.

Nothing here imports torch: safetensors files are parsed by hand (8-byte header length, JSON header,
raw data), so a truncated, empty or garbled file is a named problem, not a loader's traceback, and the
pre-flight costs a fraction of a second.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks.check import Check
from ..checks.registry import get_check, run_stage
from ..formats.registry import FUSED_GROUPS, format_for_algo
from ..runtime.errors import CheckpointError

HF_QUANT_CONFIG = "hf_quant_config.json"

SCALE_SUFFIXES = ("_scale", "_scale_2", "_amax", "pre_quant_scale", "k_scale", "v_scale")
SHARD_INDEX = "model.safetensors.index.json"
KV_CACHE_SCALES = frozenset({"k_scale", "v_scale"})


def expected_scale_shapes(algo: str, weight_shape: tuple[int, ...], group_size: int | None = None) -> dict[str, tuple[int, ...]] | None:
    """The shape of each tensor next to ``weight`` in ModelOpt 0.47's export of ``algo``, from the (packed)
    weight shape (:attr:`vlq.formats.spec.QuantFormat.on_disk`); ``None`` where there is none to expect."""
    fmt = format_for_algo(algo)
    return None if fmt is None else fmt.on_disk.shapes(tuple(weight_shape), group_size)


# ------------------------------------------------------------------------------------------------
# safetensors files, read without torch
# ------------------------------------------------------------------------------------------------

#: Bytes per element of every safetensors dtype vlq may meet.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
#: A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a safetensors file: dtype, shape and where its bytes are."""

    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class UnreadableFile(Exception):
    """A safetensors file that is not one; the message says why, in one line."""


def read_safetensors_header(file: Path) -> dict[str, TensorMeta]:
    """Every tensor's dtype, shape and byte range, checked the way the safetensors loader checks them."""
    size = file.stat().st_size
    if size == 0:
        raise UnreadableFile(f"{file.name} is empty (0 bytes)")
    if size < 8:
        raise UnreadableFile(f"{file.name} is {size} bytes, shorter than a safetensors header")
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise UnreadableFile(f"{file.name} has no valid safetensors header (it claims {length} header bytes, "
                                 f"the file holds {size}); the file is corrupt or not safetensors")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableFile(f"{file.name} has no valid safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise UnreadableFile(f"{file.name} has no valid safetensors header (a JSON {type(header).__name__}, not an object)")
    data_start, data_len = 8 + length, size - 8 - length
    tensors, end_max = {}, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise UnreadableFile(f"{file.name}: header entry {key!r} lacks dtype/shape/data_offsets") from exc
        width = DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != math.prod(shape) * width:
            raise UnreadableFile(f"{file.name}: tensor {key} is {dtype} {list(shape)} ({math.prod(shape) * width} bytes) "
                                 f"but its data range holds {end - begin}")
        tensors[key] = TensorMeta(dtype, shape, file, data_start + begin, data_start + end)
        end_max = max(end_max, end)
    if data_len < end_max:
        raise UnreadableFile(f"{file.name} is truncated: its header promises {end_max} bytes of tensor data, the file holds {data_len}")
    if data_len > end_max:
        raise UnreadableFile(f"{file.name} has {data_len - end_max} bytes after the last tensor its header lists")
    return tensors


def _f8_e4m3_table() -> list[float]:
    values = []
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp, mant = (byte >> 3) & 0xF, byte & 0x7
        if exp == 0xF and mant == 0x7:
            values.append(math.nan)
        elif exp == 0:
            values.append(sign * mant / 8 * 2.0 ** -6)
        else:
            values.append(sign * (1 + mant / 8) * 2.0 ** (exp - 7))
    return values


def tensor_values(meta: TensorMeta):
    """A float64 numpy array of a floating-point tensor's values; ``None`` for integer dtypes."""
    import numpy as np

    with open(meta.file, "rb") as fh:
        fh.seek(meta.start)
        raw = fh.read(meta.end - meta.start)
    if meta.dtype in ("F64", "F32", "F16"):
        return np.frombuffer(raw, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[meta.dtype]).astype(np.float64)
    if meta.dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if meta.dtype == "F8_E4M3":
        return np.asarray(_f8_e4m3_table(), dtype=np.float64)[np.frombuffer(raw, dtype=np.uint8)]
    return None


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc}); the checkpoint is broken, export it again.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}; export the checkpoint again.")
    return data


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
        config = _read_json(config_file)
        qc = config.get("quantization_config")
        if hf_file.exists():
            raw = _read_json(hf_file).get("quantization", {})
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
    return get_check("checkpoint_on_disk").result(problems, len(layers), detail, folder=path.name)


def read_tensor_index(path: Path) -> tuple[dict[str, TensorMeta], list[str]]:
    """Every tensor of the checkpoint's safetensors files, and the problems met reading them.

    An unreadable file is a problem (named, with why), not an exception, so one verdict lists every
    broken file.  With a shard index (``model.safetensors.index.json``) the shards it names must exist
    and hold exactly the tensors it maps to them.
    """
    files = sorted(path.glob("*.safetensors"))
    problems: list[str] = []
    index_file = path / SHARD_INDEX
    weight_map: dict[str, str] | None = None
    if index_file.exists():
        try:
            weight_map = _read_json(index_file).get("weight_map")
        except CheckpointError as exc:
            problems.append(str(exc))
        if weight_map is not None and not isinstance(weight_map, dict):
            problems.append(f"{SHARD_INDEX} has no weight_map object; export the checkpoint again")
            weight_map = None
    if not files and not problems:
        raise CheckpointError(f"{path} holds no *.safetensors files.")
    index: dict[str, TensorMeta] = {}
    by_file: dict[str, set[str]] = {}
    for file in files:
        try:
            tensors = read_safetensors_header(file)
        except UnreadableFile as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"{file.name} cannot be read ({exc.strerror or exc})")
            continue
        by_file[file.name] = set(tensors)
        for key, meta in tensors.items():
            if key in index:
                problems.append(f"tensor {key} is in both {index[key].file.name} and {file.name}")
            index[key] = meta
    if weight_map is not None:
        unreadable = {f.name for f in files} - set(by_file)
        missing_shards: dict[str, list[str]] = {}
        for key, shard in sorted(weight_map.items()):
            if not (path / shard).exists():
                missing_shards.setdefault(shard, []).append(key)
            elif shard not in unreadable and key not in by_file.get(shard, ()):
                problems.append(f"{SHARD_INDEX} maps tensor {key} to {shard}, which does not hold it")
        for shard, keys in sorted(missing_shards.items()):
            problems.append(f"{SHARD_INDEX} names shard {shard} for {len(keys)} tensors (first: {keys[0]}), but the file is missing")
        for name, keys in sorted(by_file.items()):
            unlisted = sorted(k for k in keys if weight_map.get(k) != name)
            if unlisted:
                problems.append(f"{name} holds {len(unlisted)} tensors the index does not map to it (first: {unlisted[0]}); loaders skip them")
    return index, problems


def _scale_problems(layer: str, leaf: str, meta: TensorMeta) -> list[str]:
    """A scale must be finite and positive (a zero block scale is allowed: an all-zero block)."""
    values = tensor_values(meta)
    if values is None or values.size == 0:
        return []
    import numpy as np

    name = f"{layer}.{leaf}"
    bad = []
    if not np.isfinite(values).all():
        bad.append(f"{name} holds {int((~np.isfinite(values)).sum())} non-finite values (NaN/inf)")
    finite = values[np.isfinite(values)]
    if (finite < 0).any():
        bad.append(f"{name} holds {int((finite < 0).sum())} negative values (min {finite.min():.4g})")
    per_tensor = values.size == 1
    if (per_tensor and finite.size and float(finite[0]) == 0.0) or (finite.size and not (finite != 0).any()):
        bad.append(f"{name} is zero: a zero scale maps every value to 0")
    return bad


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    vision_prefix: str = "visual",
    lm_head: str = "lm_head",
    original_vision_dtype: str = "BF16",
) -> CheckpointReport:
    """Check an exported checkpoint on disk, from its files alone.

    * every safetensors file parses, and shards agree with the shard index;
    * every vision tensor keeps ``original_vision_dtype`` and no scale tensor sits under the tower;
    * the quantization config excludes every vision layer and ``lm_head`` (else vLLM quantizes them);
    * every layer the config names exists;
    * each quantized LM layer carries the weight dtype and scale tensors its quant_algo needs, scales
      of the shapes its format exports, finite and positive; each unquantized layer is BF16 and scale-free;
    * members of each fused q/k/v and gate/up group share one format and equal per-tensor scales.
    """
    path = Path(path)
    config = CheckpointQuantConfig.read(path)
    index, problems = read_tensor_index(path)
    vprefix = vision_prefix + "."
    by_layer = _layer_tensors(index)
    problems += _vision_problems(index, vprefix, original_vision_dtype)
    problems += _unheld_layer_problems(config, by_layer)
    group_size = config.raw.get("group_size") if isinstance(config.raw.get("group_size"), int) else None
    layers = []
    for layer, tensors in sorted(by_layer.items()):
        weight = tensors.get("weight")
        if weight is None or len(weight.shape) < 2 or layer.endswith("embed_tokens"):
            continue  # not a linear layer
        algo = config.algo_for(layer)
        layers.append(LayerReport(layer, algo, weight.dtype, tuple(sorted(tensors))))
        problems += _layer_problems(layer, tensors, algo, group_size, in_vision=layer.startswith(vprefix), lm_head=lm_head)
    problems += _lm_head_problems(config, lm_head)
    unified, fused = _fused_group_problems(layers, index, vprefix)
    problems += fused
    return CheckpointReport(path, config, tuple(layers), unified, _checkpoint_check(path, config, layers, unified, problems))


def _layer_tensors(index: dict[str, TensorMeta]) -> dict[str, dict[str, TensorMeta]]:
    """Layer -> its weight, bias and scale tensors, by leaf name."""
    layers: dict[str, dict[str, TensorMeta]] = {}
    for key, meta in index.items():
        if key.endswith(".weight") or any(key.endswith("." + s) or key.endswith(s) for s in SCALE_SUFFIXES) or key.endswith(".bias"):
            layer, _, leaf = key.rpartition(".")
            layers.setdefault(layer, {})[leaf] = meta
    return layers


def _vision_problems(index: dict[str, TensorMeta], vprefix: str, original_dtype: str) -> list[str]:
    """Every vision tensor keeps its dtype, and none is a quantization scale."""
    problems = []
    for key, meta in index.items():
        if not key.startswith(vprefix):
            continue
        leaf = key.rpartition(".")[2]
        if any(leaf.endswith(s) for s in SCALE_SUFFIXES) or leaf in ("input_scale", "weight_scale"):
            problems.append(f"vision tensor {key} is a quantization scale; the vision tower must stay unquantized")
        elif meta.dtype != original_dtype:
            problems.append(f"vision tensor {key} has dtype {meta.dtype}, expected {original_dtype}")
    return problems


def _unheld_layer_problems(config: CheckpointQuantConfig, layers: dict[str, dict[str, TensorMeta]]) -> list[str]:
    """Every layer a MIXED_PRECISION config quantizes is in the files."""
    if config.quant_algo != "MIXED_PRECISION":
        return []
    absent = sorted(name for name in config.quantized_layers if name not in layers)
    if not absent:
        return []
    return [f"quantization config quantizes {len(absent)} layers the checkpoint does not hold: {', '.join(absent[:5])}"
            + (" ..." if len(absent) > 5 else "")]


def _layer_problems(layer: str, tensors: dict[str, TensorMeta], algo: str | None, group_size: int | None, *,
                    in_vision: bool, lm_head: str) -> list[str]:
    """One linear layer against what its quant_algo stores (dtype, tensors, scale shapes and values)."""
    weight = tensors["weight"]
    if (in_vision or layer == lm_head) and algo is not None:
        return [f"quantization config applies {algo} to {layer}: its ignore list does not exclude "
                f"{'the vision tower' if in_vision else 'lm_head'}, so vLLM would quantize it"
                + (f" (on disk it is {weight.dtype} without scales)" if weight.dtype in ("BF16", "F16", "F32") else "")]
    scales = sorted(leaf for leaf in tensors if leaf not in ("weight", "bias"))
    if algo is None:
        if weight.dtype not in ("BF16", "F16", "F32"):
            return [f"{layer} is unquantized in the config but its weight is {weight.dtype}"]
        if set(scales) - KV_CACHE_SCALES and not in_vision:  # k/v cache scales may sit on unquantized k/v_proj
            return [f"{layer} is unquantized in the config but carries scales {', '.join(scales)}"]
        return []
    problems = []
    fmt = format_for_algo(algo)
    allowed = fmt.on_disk.weight_dtypes if fmt is not None else None
    if allowed and weight.dtype not in allowed:
        problems.append(f"{layer}: the config says {algo}, which stores weights as {'/'.join(allowed)}, but the weight on disk is {weight.dtype}")
    for needed in (fmt.on_disk.required if fmt is not None else ()):
        if needed not in tensors:
            problems.append(f"{layer}: {algo} needs tensor {layer}.{needed}, missing")
    shapes = expected_scale_shapes(algo, weight.shape, group_size) if not allowed or weight.dtype in allowed else None
    for leaf in scales:
        meta = tensors[leaf]
        want = (shapes or {}).get(leaf)
        if want is not None and meta.shape != want and not (want == () and meta.numel == 1):
            problems.append(f"{layer}.{leaf} has shape {list(meta.shape)}; {algo} with weight {list(weight.shape)} exports {list(want)}")
        problems += _scale_problems(layer, leaf, meta)
    return problems


def _lm_head_problems(config: CheckpointQuantConfig, lm_head: str) -> list[str]:
    # lm_head must be excluded even when tied: vLLM skips tied lm_head weights but still builds the layer with the
    # checkpoint's quant method when it is not excluded
    if config.quant_algo not in (None, "MIXED_PRECISION") and not config.is_excluded(lm_head):
        return [f"quantization config does not exclude {lm_head}; vLLM would quantize it"]
    if config.quant_algo == "MIXED_PRECISION" and lm_head in config.quantized_layers:
        return [f"quantization config quantizes {lm_head} ({config.quantized_layers[lm_head]})"]
    return []


def _fused_group_problems(layers: list[LayerReport], index: dict[str, TensorMeta], vprefix: str) -> tuple[int, list[str]]:
    """(fused groups checked, problems): the members of each q/k/v and gate/up group share one format and equal
    per-tensor scales, since vLLM serves them as one layer with one scale."""
    problems: list[str] = []
    unified = 0
    by_layer = {l.name: l for l in layers}
    for parent in sorted({l.name.rpartition(".")[0] for l in layers}):
        for names in FUSED_GROUPS.values():
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
                if any(meta is None for meta in metas) or any(meta.numel != 1 for meta in metas):
                    continue  # per-channel / block scales are not fused into one value
                values = [float(tensor_values(meta)[0]) for meta in metas]
                if len(set(values)) != 1 and all(math.isfinite(v) for v in values):
                    problems.append(f"fused group {parent}.{{{','.join(names)}}} has different {scale} values {values}; "
                                    "vLLM fuses them into one layer with one scale")
            unified += 1
    return unified, problems


def checkpoint_verdict(path: str | os.PathLike, manifest=None) -> tuple[Check, ...]:
    """The pre-flight ``vlq check`` runs before vLLM starts: the on-disk check, and — given a
    :class:`vlq.manifest.manifest.Manifest` — the manifest against the checkpoint (every member present, in its
    format): the inspect stage's registered checks.  Only a checkpoint that passes both reaches an engine."""
    return run_stage("inspect", checkpoint=path, manifest=manifest)


def on_disk_check(*, checkpoint=None, report: CheckpointReport | None = None, **_) -> Check:
    """The inspect stage's on-disk check: ``report``'s when the export already inspected the files, else read now."""
    return report.check if report is not None else inspect_checkpoint(checkpoint).check


def manifest_check(*, checkpoint, manifest=None, **_) -> Check | None:
    """The inspect stage's check of a :class:`vlq.manifest.manifest.Manifest` against the exported checkpoint (none
    without a manifest); here, not in the manifest's module, so the pre-flight stays torch-free."""
    return None if manifest is None else manifest.verify(checkpoint=checkpoint)
