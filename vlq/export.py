"""Stage 6 — export the full VLM with its quantized LM, then prove the checkpoint on disk.

Export goes through ModelOpt's unified HF export.  Two things are done first, because the serving
side depends on them:

* ModelOpt lists in ``exclude_modules`` only modules that carry a (disabled) quantizer.  After an
  ``extract`` search the vision tower and ``lm_head`` carry none, so they would be missing from the
  checkpoint's ignore list and vLLM would quantize them (the load succeeds, the output is
  garbage).  :func:`mark_unquantized` gives them disabled quantizers so ModelOpt excludes them.
* vLLM fuses q/k/v and gate/up into one layer with one scale.  :func:`unify_fused_scales` makes the
  members of each fused group share input and weight scales (ModelOpt's
  ``preprocess_linear_fusion``), so nothing has to be re-quantized at load.

The checkpoint is written to a temporary sibling folder, inspected, and only then moved into
place; a failure leaves the previous contents of ``export_dir`` untouched.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_write
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
# Preparing the model
# ------------------------------------------------------------------------------------------------


def _has_quantizers(module: nn.Module) -> bool:
    return any(hasattr(m, "weight_quantizer") for m in module.modules())


def mark_unquantized(modules: dict[str, nn.Module]) -> list[str]:
    """Give every module in ``modules`` disabled quantizers so the export lists it as excluded."""
    import modelopt.torch.quantization as mtq

    disable_all = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": None}
    marked = []
    for name, module in modules.items():
        if not _has_quantizers(module):
            mtq.quantize(module, disable_all)
            marked.append(name)
    return marked


def unify_fused_scales(model: nn.Module) -> list[tuple[str, ...]]:
    """Share scales inside every q/k/v and gate/up group that is quantized in one format."""
    from modelopt.torch.export.quant_utils import get_quantization_format, preprocess_linear_fusion

    unified = []
    for parent_name, parent in model.named_modules():
        for names in FUSED_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None or not hasattr(m, "weight_quantizer") for m in members):
                continue
            formats = {get_quantization_format(m) for m in members}
            if len(formats) != 1 or None in formats:
                continue
            preprocess_linear_fusion(members)
            unified.append(tuple(f"{parent_name}.{n}" for n in names))
    return unified


# ------------------------------------------------------------------------------------------------
# Atomic file helpers
# ------------------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").exists()


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place; an existing ``dest`` is swapped out, then removed.

    Killed between the two renames, ``dest`` is missing and ``.dest.old-PID`` holds the previous
    contents: :func:`recover_interrupted_export` puts it back on the next export.
    """
    from .state import kill_point

    backup = None
    if dest.exists():
        backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, backup)
        kill_point("export-swap")
    try:
        os.replace(tmp, dest)
    except BaseException:
        if backup is not None:
            os.replace(backup, dest)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted_export(export_dir: Path) -> list[str]:
    """Undo what an export killed mid-way left next to ``export_dir`` (by processes no longer alive).

    A ``.NAME.partial-PID-*`` folder is an unfinished export: removed.  A ``.NAME.old-PID`` folder is
    the previous checkpoint swapped out just before the new one moved in: restored when
    ``export_dir`` is missing (the kill came between the two renames), else removed.
    """
    export_dir = Path(export_dir)
    parent = export_dir.parent
    actions: list[str] = []
    if not parent.is_dir():
        return actions
    pattern = re.compile(rf"^\.{re.escape(export_dir.name)}\.(partial|old)-(\d+)(-.*)?$")
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not export_dir.exists():
            os.replace(entry, export_dir)
            actions.append(f"restored the previous checkpoint from {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry.name} left by an interrupted export")
    return actions


def check_export_dir(export_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over something that is not ours to replace."""
    recover_interrupted_export(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise CheckpointError(f"Export path {export_dir} is a file; pass a folder path.")
    if export_dir.exists() and any(export_dir.iterdir()) and not overwrite:
        what = "a checkpoint" if _is_checkpoint_dir(export_dir) else "files"
        raise CheckpointError(
            f"Export folder {export_dir} already holds {what}. Pass overwrite=True (--overwrite) to "
            "replace it, or choose an empty folder."
        )
    parent = export_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"Cannot write to {parent}; choose a writable export folder.")


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
    path: Path
    quant_config: CheckpointQuantConfig
    layers: tuple[LayerReport, ...]
    problems: tuple[str, ...]
    unified_groups: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def quantized_layers(self) -> tuple[LayerReport, ...]:
        return tuple(l for l in self.layers if l.quant_algo is not None)

    def require(self) -> "CheckpointReport":
        if self.problems:
            shown = "\n  ".join(self.problems[:25])
            more = f"\n  ... and {len(self.problems) - 25} more" if len(self.problems) > 25 else ""
            raise CheckpointError(f"Checkpoint {self.path} fails {len(self.problems)} checks:\n  {shown}{more}")
        return self


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


def _load_tensor(path: Path, key: str) -> torch.Tensor:
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
    return CheckpointReport(path, config, tuple(layers), tuple(problems), unified)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    path: Path
    report: CheckpointReport
    marked_unquantized: tuple[str, ...]
    unified_groups: tuple[tuple[str, ...], ...]
    kv_cache_fp8: bool


def add_fp8_kv_cache(loaded, calibration, forward_step) -> list[str]:
    """Quantize the LM's k/v cache to FP8 after the search, calibrating only the k/v quantizers.

    ``mtq.calibrate(algorithm="max")`` re-calibrates *every* enabled quantizer, which would move the
    input/weight scales the search decided.  Every other enabled quantizer is disabled while the
    k/v quantizers calibrate, then re-enabled with its amax untouched.  Returns the calibrated
    k/v quantizer names.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    kv_cfg = {"quant_cfg": [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}}], "algorithm": "max"}
    batches = list(calibration.to(loaded.device).batches)

    def loop(model):
        with torch.no_grad():
            for batch in batches:
                forward_step(model, batch)

    model = loaded.language_model
    mtq.set_quantizer_by_cfg(model, kv_cfg["quant_cfg"])
    kv_names = [n for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and fnmatch.fnmatch(n, "*[kv]_bmm_quantizer") and q.is_enabled]
    if not kv_names:
        raise CheckpointError("No k/v cache quantizer found in the language model; FP8 KV cache needs ModelOpt's quantized attention.")
    others = [q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled and n not in set(kv_names)]
    for quantizer in others:
        quantizer.disable()
    try:
        with torch.no_grad():
            mtq.calibrate(model, algorithm="max", forward_loop=loop)
    finally:
        for quantizer in others:
            quantizer.enable()
    return kv_names


def export_checkpoint(
    loaded,
    export_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    verify: bool = True,
    exclude_unsearched: bool = True,
) -> ExportResult:
    """Export ``loaded.vlm`` (quantized LM, BF16 vision) through ModelOpt, atomically, and inspect it."""
    from modelopt.torch.export import export_hf_checkpoint

    export_dir = Path(export_dir).expanduser().resolve()
    check_export_dir(export_dir, overwrite)
    vlm = loaded.vlm
    head_name = next(n for n, m in vlm.named_modules() if m is loaded.lm_head)
    marked = []
    if exclude_unsearched:  # False only for the negative control that reproduces the silent-garbage export
        marked = mark_unquantized({loaded.vision.root: vlm.get_submodule(loaded.vision.root), head_name: loaded.lm_head})
    unified = unify_fused_scales(loaded.language_model)
    from .state import kill_point

    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.partial-{os.getpid()}-", dir=export_dir.parent))
    try:
        with torch.no_grad():
            export_hf_checkpoint(vlm, export_dir=tmp)
        _copy_processor_files(loaded, tmp)
        kill_point("export")
        found = inspect_checkpoint(tmp)
        # name the destination, not the temporary folder, in every message
        report = CheckpointReport(export_dir, found.quant_config, found.layers, found.problems, found.unified_groups)
        if verify:
            report.require()
        _replace_dir(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kv = report.quant_config.kv_cache_quant_algo is not None
    return ExportResult(export_dir, report, tuple(marked), tuple(unified), kv)


_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
    "video_preprocessor_config.json", "added_tokens.json",
)


def _copy_processor_files(loaded, dest: Path) -> None:
    """Carry tokenizer and processor files so the export serves on its own."""
    if loaded.path is not None:
        for name in _PROCESSOR_FILES:
            src = Path(loaded.path) / name
            if src.exists() and not (dest / name).exists():
                shutil.copy2(src, dest / name)
    elif loaded.processor is not None:
        loaded.processor.save_pretrained(dest)
