"""A BF16 reference captured once, measured against many times: held-out batches with the base model's logits
(or final hidden states), grouped into bigger forwards where the rows allow it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.errors import CalibrationDataError
from .metrics import (
    DATA_KINDS, DEFAULT_POSITION_CHUNK, DEFAULT_VOCAB_CHUNK, IGNORE_INDEX, FidelityMetrics, LazyLogits, as_logits, measure_fidelity,
)


@dataclass(frozen=True)
class FidelityReference:
    """Held-out batches and the BF16 model's logits on them, captured before anything is quantized.

    A BF16 model's logits are bf16, so keeping them in bf16 on the CPU is lossless: measuring against
    the stored logits equals measuring against the live BF16 model, without a second copy of the model
    in memory (a 3B search would otherwise need twice its weights).  The same reference then scores
    every measurement point (fake-quantized model, dequantized checkpoint, vLLM) and every sweep target.
    """

    batches: tuple[dict, ...]
    # one [B, T, V] per batch: a CPU tensor, or LazyLogits (hidden states on the model's device)
    logits: tuple["torch.Tensor | LazyLogits", ...]
    data_source: str
    data_kind: str
    capture_s: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, LazyLogits) else t.numel() * t.element_size() for t in self.logits)

    @property
    def rows(self) -> int:
        """Held-out rows (sequences), however they are grouped into forwards."""
        return sum(int(t.shape[0]) for t in self.logits)


#: Keys a held-out batch may hold: per-token [rows, T] tensors (right-padded with this value when rows of
#: different lengths share a forward), and Qwen2.5-VL's image tensors, which list the patches and images of
#: all rows one after another.
_TOKEN_KEYS = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}


_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def group_rows(batches: Iterable[dict], rows_per_forward: int) -> list[dict]:
    """Consecutive batches merged into forwards of up to ``rows_per_forward`` rows: the same rows, in the
    same order, fewer forwards.  A fake-quantized model spends most of a 512-token row's forward in
    per-module Python overhead (H200: ~0.14 s per row against 23 ms of BF16 compute), which a bigger
    forward shares.  Shorter rows are right-padded (attention mask 0, label -100: never scored, never
    attended to by a real token).  Batches with other keys are never merged."""
    grouped: list[list[dict]] = []
    for batch in batches:
        last = grouped[-1] if grouped else None
        if (last is not None and sum(int(b["input_ids"].shape[0]) for b in last) + int(batch["input_ids"].shape[0]) <= rows_per_forward
                and _mergeable(last[0], batch)):
            last.append(batch)
        else:
            grouped.append([batch])
    return [group[0] if len(group) == 1 else _merge(group) for group in grouped]


def _mergeable(a: dict, b: dict) -> bool:
    if set(a) != set(b) or not set(a) <= set(_TOKEN_KEYS) | set(_IMAGE_KEYS) or "input_ids" not in a:
        return False
    return all(isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype
               and a[k].dim() == b[k].dim() and (k in _TOKEN_KEYS and a[k].dim() == 2 or a[k].shape[1:] == b[k].shape[1:])
               for k in a)


def _merge(group: list[dict]) -> dict:
    length = max(int(b["input_ids"].shape[1]) for b in group)
    merged = {}
    for key in group[0]:
        if key in _TOKEN_KEYS:
            merged[key] = torch.cat([torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=_TOKEN_KEYS[key])
                                     for b in group])
        else:
            merged[key] = torch.cat([b[key] for b in group])
    if "attention_mask" not in merged and any(int(b["input_ids"].shape[1]) != length for b in group):
        raise ValueError("rows of different lengths need an attention_mask to share a forward")
    return merged


def capture_reference(forward: Callable[[dict], Any], batches: Iterable[dict], *, data_source: str | None = None,
                      data_kind: str | None = None, rows_per_forward: int = 1) -> FidelityReference:
    """Run the BF16 ``forward`` over ``batches`` once and keep its logits (CPU, in their own dtype).

    With ``rows_per_forward`` > 1 consecutive batches are merged (:func:`group_rows`) and every later
    measurement against this reference runs those bigger forwards.
    """
    import time

    if data_source is None:
        data_source = getattr(batches, "source", None)
    if data_kind is None:
        kind = getattr(batches, "kind", None)
        data_kind = "text" if kind == "synthetic" else kind
    if data_source is None or data_kind not in DATA_KINDS:
        raise ValueError(f"capture_reference needs a data_source and a data_kind in {DATA_KINDS} (or a CalibrationSet).")
    start = time.perf_counter()
    kept_batches, kept_logits = [], []
    if rows_per_forward > 1:
        batches = group_rows(batches, rows_per_forward)
    with torch.no_grad():
        for batch in batches:
            kept_batches.append(batch)
            logits = as_logits(forward(batch))
            kept_logits.append(logits if isinstance(logits, LazyLogits) else _to_host(logits.detach()))
    if not kept_batches:
        raise CalibrationDataError(f"{data_source} holds no batch; fidelity needs held-out data.")
    return FidelityReference(tuple(kept_batches), tuple(kept_logits), data_source, data_kind, time.perf_counter() - start)


def _to_host(logits: torch.Tensor) -> torch.Tensor:
    """Logits kept on the CPU; from a GPU into page-locked memory, which every later measurement copies
    back several times faster than from pageable memory (a 3B row's logits are 155 MB)."""
    if logits.device.type != "cuda":
        return logits.to("cpu")
    host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
    host.copy_(logits)
    return host


def measure_against(reference: FidelityReference, quant_forward: Callable[[dict], Any], *, measurement_point: str,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK, position_chunk: int = DEFAULT_POSITION_CHUNK) -> FidelityMetrics:
    """KL(BF16 || quant) of ``quant_forward`` over the reference's batches, against its stored logits."""
    stored = dict(zip(map(id, reference.batches), reference.logits))

    def base_forward(batch: dict) -> torch.Tensor:
        return stored[id(batch)]

    return measure_fidelity(base_forward, quant_forward, reference.batches, measurement_point=measurement_point,
                            data_source=reference.data_source, data_kind=reference.data_kind,
                            vocab_chunk=vocab_chunk, position_chunk=position_chunk)
