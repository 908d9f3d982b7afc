"""Stage 6a — write the checkpoint: the full VLM with its quantized LM, inspected before it is moved into place.

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
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..formats.registry import FUSED_GROUPS
from .inspect import CheckpointReport, inspect_checkpoint
from ..runtime.errors import CheckpointError
from ..runtime.files import check_export_dir, kill_point, replace_dir


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
        for names in FUSED_GROUPS.values():
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
    shown_as: str | os.PathLike | None = None,
) -> ExportResult:
    """Export ``loaded.vlm`` (quantized LM, BF16 vision) through ModelOpt, atomically, and inspect it.

    ``shown_as``: the folder messages name (where a staged export will be committed), if not ``export_dir``."""
    from modelopt.torch.export import export_hf_checkpoint

    export_dir = Path(export_dir).expanduser().resolve()
    check_export_dir(export_dir, overwrite)
    vlm = loaded.vlm
    head_name = next(n for n, m in vlm.named_modules() if m is loaded.lm_head)
    marked = []
    if exclude_unsearched:  # False only for the negative control that reproduces the silent-garbage export
        marked = mark_unquantized({loaded.vision.root: vlm.get_submodule(loaded.vision.root), head_name: loaded.lm_head})
    unified = unify_fused_scales(loaded.language_model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.partial-{os.getpid()}-", dir=export_dir.parent))
    try:
        with torch.no_grad():
            export_hf_checkpoint(vlm, export_dir=tmp)
        _copy_processor_files(loaded, tmp)
        kill_point("export")
        # name the destination, not the temporary folder, in every message
        report = inspect_checkpoint(tmp).at(Path(shown_as) if shown_as is not None else export_dir)
        if verify:
            report.check.require()
        replace_dir(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kv = report.quant_config.kv_cache_quant_algo is not None
    return ExportResult(export_dir, report, tuple(marked), tuple(unified), kv)


#: Tokenizer and processor files an export carries so vLLM can serve it on its own.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
    "video_preprocessor_config.json", "added_tokens.json",
)


def _copy_processor_files(loaded, dest: Path) -> None:
    """Carry tokenizer and processor files so the export serves on its own."""
    if loaded.path is not None:
        for name in PROCESSOR_FILES:
            src = Path(loaded.path) / name
            if src.exists() and not (dest / name).exists():
                shutil.copy2(src, dest / name)
    elif loaded.processor is not None:
        loaded.processor.save_pretrained(dest)
