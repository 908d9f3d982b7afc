"""One quantized linear of an export: its tensors checked against its quant_algo (:func:`read_layer`) and
its weight decoded on demand (:class:`DequantizedLayer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...runtime.errors import CheckpointError
from .algos import ACT_FP8, ACT_INT8, ACT_MXFP8, ACT_NVFP4, KV_SCALES, SPECS, SUPPORTED_ALGOS
from .files import QuantConfig, TensorMeta, TensorStore
from .grids import E2M1_VALUES, ActivationQuant, e2m1_step, e4m3_step, fp8_per_tensor


def _unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """U8 ``[out/2, in]`` -> int ``[out, in]``: rows 2j (low nibble) and 2j+1 (high), signed."""
    p = packed.view(torch.uint8).to(torch.int16)
    low, high = p & 0x0F, (p >> 4) & 0x0F
    rows = torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(rows >= 8, rows - 16, rows).to(torch.float32)


def _unpack_e2m1_cols(packed: torch.Tensor) -> torch.Tensor:
    """U8 ``[out, in/2]`` -> float ``[out, in]``: columns 2i (low nibble) and 2i+1 (high)."""
    p = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((p & 0x0F, (p >> 4) & 0x0F), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes]


def _per_block(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Expand ``[out, in/block]`` scales to ``[out, in]``."""
    return scale.repeat_interleave(in_features // scale.shape[-1], dim=-1)


def decode(algo: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, grid spacing per element), both float32 ``[out, in]``."""
    w = tensors["weight"]
    ws = tensors["weight_scale"]
    if algo == "FP8":
        code = w.to(torch.float32)
        scale = ws.float()
        return code * scale, e4m3_step(code) * scale
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        code = w.to(torch.float32)
        scale = ws.float().reshape(-1, 1)
        return code * scale, e4m3_step(code) * scale
    if algo == "fp8_pb_wo":
        code = w.to(torch.float32)
        blocks = ws.float().reshape(ws.shape[0], ws.shape[2]) if ws.dim() == 4 else ws.float()
        scale = blocks.repeat_interleave(128, dim=0).repeat_interleave(128, dim=1)[: code.shape[0], : code.shape[1]]
        return code * scale, e4m3_step(code) * scale
    if algo == "MXFP8":
        code = w.to(torch.float32)
        descale = _per_block(torch.exp2(ws.view(torch.uint8).float() - 127.0), w.shape[-1])
        return code * descale, e4m3_step(code) * descale
    if algo == "W8A8_SQ_PER_CHANNEL":
        code = w.to(torch.float32)
        scale = ws.float().reshape(-1, 1).expand_as(code)
        return code * scale, scale.clone()
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        code = _unpack_int4_rows(w)
        scale = _per_block(ws.float(), code.shape[-1])
        weight = code * scale
        if algo == "W4A16_AWQ":
            return weight, scale
        ws2 = tensors["weight_scale_2"].float()
        # the int4 result is rounded to the model dtype (BF16) before its FP8 rounding, as in a BF16
        # model's fake quant (in float32 some FP8 codes would land one step away)
        result, fp8_step = fp8_per_tensor(weight.to(torch.bfloat16).float(), ws2)
        # a moved int4 tie moves the result by one int4 step plus the two FP8 roundings (<= 1.5 steps here)
        return result, scale + 1.5 * fp8_step
    if algo in ("NVFP4", "W4A16_NVFP4"):
        values = _unpack_e2m1_cols(w)
        scale = _per_block(ws.to(torch.float32) * tensors["weight_scale_2"].float(), values.shape[-1])
        return values * scale, e2m1_step(values.abs()) * scale
    raise CheckpointError(f"quant_algo {algo!r} has no decoder; known: {', '.join(SUPPORTED_ALGOS)}.")


@dataclass(frozen=True)
class DequantizedLayer:
    """One quantized linear of the checkpoint, decoded on demand (checkpoint naming)."""

    name: str
    quant_algo: str
    out_features: int
    in_features: int
    weight_block_size: int | None  # block of the weight scales along ``in`` (None: per-tensor or per-channel)
    activation: ActivationQuant
    _tensors: tuple[str, ...] = field(repr=False)  # checkpoint keys this layer consumes
    _store: TensorStore = field(repr=False, compare=False)

    def _read(self) -> dict[str, torch.Tensor]:
        return {key.rpartition(".")[2]: self._store.get(key) for key in self._tensors}

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``[out, in]``, read from disk now."""
        return decode(self.quant_algo, self._read())[0].to(dtype)

    def weight_and_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized weight and the spacing of its format's grid at each element (float32)."""
        return decode(self.quant_algo, self._read())

    def describe(self) -> str:
        block = f" block {self.weight_block_size}" if self.weight_block_size else ""
        return f"{self.name}: {self.quant_algo} [{self.out_features}x{self.in_features}]{block}; input {self.activation.describe()}"


def read_scalar(store: TensorStore, meta: TensorMeta, path: Path) -> float:
    value = store.get(meta.key).float().reshape(-1)
    if value.numel() != 1:
        raise CheckpointError(f"{path}: {meta.key} has shape {meta.shape}, expected a per-tensor scale (one value).")
    if not math.isfinite(float(value[0])) or float(value[0]) <= 0:
        raise CheckpointError(f"{path}: {meta.key} is {float(value[0])}, expected a positive finite scale.")
    return float(value[0])


def _check_tensors(path: Path, module: str, algo: str, tensors: dict[str, TensorMeta]) -> None:
    """The tensors next to the weight are the ones ``algo`` stores, and the weight has its dtype and rank."""
    spec, weight = SPECS[algo], tensors["weight"]
    missing = [leaf for leaf in spec.required if leaf not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: {module} is {algo} but {', '.join(f'{module}.{m}' for m in missing)} is missing; "
            "the checkpoint is incomplete, re-export it."
        )
    allowed = {"weight", "bias", *spec.required, *spec.optional, *KV_SCALES}
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise CheckpointError(
            f"{path}: {module} is {algo} but also carries {', '.join(f'{module}.{e}' for e in extra)}, which "
            f"{algo} does not use; the config and the tensors disagree, re-export the checkpoint."
        )
    if weight.dtype != spec.weight_dtype:
        raise CheckpointError(
            f"{path}: {module}.weight is {weight.dtype} but {algo} stores {spec.weight_dtype}; config and tensors disagree."
        )
    if len(weight.shape) != 2:
        raise CheckpointError(f"{path}: {module}.weight has shape {weight.shape}; only 2-D linear weights are read.")


def _features(algo: str, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in) of the layer from its packed weight: INT4 packs two rows per byte, E2M1 two columns."""
    rows, cols = weight_shape
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        return rows * 2, cols
    if algo in ("NVFP4", "W4A16_NVFP4"):
        return rows, cols * 2
    return rows, cols


def _weight_block(path: Path, module: str, algo: str, ws: tuple[int, ...], out_f: int, in_f: int,
                  group_size: int | None) -> int | None:
    """The block of the weight scales along ``in`` (None: per tensor or per channel), once their shape fits ``algo``."""
    block = SPECS[algo].weight_block
    if algo == "FP8" and ws not in ((), (1,)):
        raise CheckpointError(f"{path}: {module}.weight_scale has shape {ws}; FP8 here is per-tensor (shape []).")
    if algo in ("W8A8_SQ_PER_CHANNEL", "FP8_PER_CHANNEL_PER_TOKEN") and ws not in ((out_f,), (out_f, 1)):
        raise CheckpointError(f"{path}: {module}.weight_scale has shape {ws}, expected [{out_f}] (per output channel).")
    if algo == "fp8_pb_wo":
        grid = (-(-out_f // 128), -(-in_f // 128))
        if ws not in ((grid[0], 1, grid[1], 1), grid):
            raise CheckpointError(f"{path}: {module}.weight_scale has shape {ws}; {algo} needs [{grid[0]}, 1, {grid[1]}, 1] "
                                  "(one scale per 128x128 block).")
    if algo in ("W4A16_AWQ", "W4A8_AWQ", "NVFP4", "W4A16_NVFP4", "MXFP8"):
        if len(ws) != 2 or ws[0] != out_f or ws[1] == 0 or in_f % ws[1]:
            raise CheckpointError(f"{path}: {module}.weight_scale has shape {ws}; {algo} needs [{out_f}, {in_f}/block].")
        found = in_f // ws[1]
        expected = block or group_size
        if expected is not None and found != expected:
            raise CheckpointError(
                f"{path}: {module}.weight_scale implies blocks of {found} but {algo} "
                f"{'uses' if block else 'is configured with group_size'} {expected}; config and tensors disagree."
            )
        block = found
    return block


def _activation(path: Path, module: str, algo: str, tensors: dict[str, TensorMeta], store: TensorStore,
                in_f: int) -> ActivationQuant:
    """The input quantization ``algo`` prescribes, its scalar scales validated now (not mid-forward)."""
    for leaf in ("input_scale", "weight_scale_2"):
        if leaf in tensors:
            read_scalar(store, tensors[leaf], path)
    pqs = None
    if "pre_quant_scale" in tensors:
        pqs = store.get(tensors["pre_quant_scale"].key).reshape(-1)
        if pqs.numel() != in_f:
            raise CheckpointError(
                f"{path}: {module}.pre_quant_scale has {pqs.numel()} values but the layer has {in_f} inputs."
            )
    kind = SPECS[algo].activation
    scale = read_scalar(store, tensors["input_scale"], path) if kind in (ACT_FP8, ACT_INT8, ACT_NVFP4) else None
    act_block = 16 if kind == ACT_NVFP4 else (32 if kind == ACT_MXFP8 else None)
    return ActivationQuant(kind, scale, act_block, pqs)


def read_layer(path: Path, module: str, algo: str, tensors: dict[str, TensorMeta], config: QuantConfig,
               store: TensorStore) -> DequantizedLayer:
    """One quantized layer of ``path``, its tensors checked against ``algo`` (CheckpointError in one line)."""
    _check_tensors(path, module, algo, tensors)
    out_f, in_f = _features(algo, tensors["weight"].shape)
    block = _weight_block(path, module, algo, tensors["weight_scale"].shape, out_f, in_f, config.group_size_for(module))
    activation = _activation(path, module, algo, tensors, store, in_f)
    keys = tuple(tensors[leaf].key for leaf in ("weight", *SPECS[algo].required) if leaf in tensors
                 and leaf not in ("input_scale", "pre_quant_scale"))
    return DequantizedLayer(module, algo, out_f, in_f, block, activation, keys, store)
