"""Stage 2 — calibration and scoring batches.

Batches are plain ``{"input_ids", "attention_mask", "labels"}`` dicts of ``[batch, seq_len]`` tensors.
``labels`` equal ``input_ids`` with padding set to -100; the gradient method shifts them inside its
loss.  Text comes from local files through ``datasets`` (never the hub) or is generated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CalibrationDataError
from .models import CALIBRATION_CORPUS

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CalibrationSet:
    """Token batches for calibration and scoring, with what made them."""

    batches: tuple[dict[str, torch.Tensor], ...]
    source: str
    batch_size: int
    seq_len: int
    vocab_size: int
    kind: str = "text"

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    @property
    def num_samples(self) -> int:
        return len(self.batches) * self.batch_size

    def to(self, device: str | torch.device) -> "CalibrationSet":
        moved = tuple(
            {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            for batch in self.batches
        )
        return CalibrationSet(moved, self.source, self.batch_size, self.seq_len, self.vocab_size, self.kind)

    def require_steps(self, num_calib_steps: int, num_score_steps: int) -> None:
        """Refuse step counts the data cannot feed (ModelOpt would silently run fewer)."""
        for label, steps in (("num_calib_steps", num_calib_steps), ("num_score_steps", num_score_steps)):
            if steps < 1:
                raise CalibrationDataError(f"{label} must be at least 1, got {steps}.")
            if steps > len(self.batches):
                raise CalibrationDataError(
                    f"{label}={steps} but the calibration data has only {len(self.batches)} batches "
                    f"({self.num_samples} samples of {self.seq_len} tokens from {self.source}). "
                    f"Lower {label} to at most {len(self.batches)} or supply more text."
                )


def _validate_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    if ids.numel() == 0:
        raise CalibrationDataError(f"Calibration data from {source} is empty; supply text with at least one sample.")
    top = int(ids.max())
    low = int(ids.min())
    if low < 0 or top >= vocab_size:
        raise CalibrationDataError(
            f"Calibration data from {source} has token ids in [{low}, {top}] but the model's vocabulary "
            f"has {vocab_size} entries. The data was tokenized for another model; tokenize it with "
            "this checkpoint's tokenizer."
        )


def _batches_from_ids(ids: torch.Tensor, batch_size: int, pad_id: int | None = None):
    batches = []
    for start in range(0, ids.shape[0] - batch_size + 1, batch_size):
        chunk = ids[start : start + batch_size].clone()
        mask = torch.ones_like(chunk)
        if pad_id is not None:
            mask = (chunk != pad_id).long()
        labels = chunk.clone()
        labels[mask == 0] = IGNORE_INDEX
        batches.append({"input_ids": chunk, "attention_mask": mask, "labels": labels})
    return tuple(batches)


def synthetic_batches(
    *, vocab_size: int, num_batches: int, batch_size: int = 1, seq_len: int = 64, seed: int = 0,
    max_token_id: int | None = None,
) -> CalibrationSet:
    """Uniform random tokens: enough for timing and full-size smoke runs, meaningless for accuracy."""
    if num_batches < 1 or batch_size < 1 or seq_len < 2:
        raise CalibrationDataError(
            f"synthetic data needs num_batches>=1, batch_size>=1, seq_len>=2; got "
            f"{num_batches}, {batch_size}, {seq_len}."
        )
    high = vocab_size if max_token_id is None else min(vocab_size, max_token_id + 1)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, high, (num_batches * batch_size, seq_len), generator=generator)
    return CalibrationSet(_batches_from_ids(ids, batch_size), f"synthetic(seed={seed})", batch_size, seq_len, vocab_size, "synthetic")


def load_text_samples(path: str | os.PathLike | None = None, *, text_field: str = "text") -> list[str]:
    """Read text samples from a local .txt (one sample per line) or .jsonl/.json file via ``datasets``."""
    import datasets

    path = Path(path) if path is not None else CALIBRATION_CORPUS
    if not path.exists():
        raise CalibrationDataError(f"Calibration file {path} does not exist; pass a local .txt or .jsonl file.")
    suffix = path.suffix.lower()
    builder = {"txt": "text", "text": "text", "jsonl": "json", "json": "json"}.get(suffix.lstrip("."))
    if builder is None:
        raise CalibrationDataError(f"Calibration file {path} must end in .txt, .jsonl or .json, got {suffix!r}.")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for broken files
        raise CalibrationDataError(f"Could not read calibration file {path}: {exc}") from exc
    if text_field not in dataset.column_names:
        raise CalibrationDataError(
            f"Calibration file {path} has columns {dataset.column_names}; expected a {text_field!r} column "
            "(pass text_field= to name another)."
        )
    samples = [s for s in dataset[text_field] if isinstance(s, str) and s.strip()]
    if not samples:
        raise CalibrationDataError(f"Calibration file {path} holds no non-empty {text_field!r} samples.")
    return samples


def text_batches(
    tokenizer,
    *,
    vocab_size: int,
    num_batches: int,
    batch_size: int = 1,
    seq_len: int = 64,
    path: str | os.PathLike | None = None,
    text_field: str = "text",
) -> CalibrationSet:
    """Pack tokenized local text into ``num_batches`` batches of ``batch_size`` x ``seq_len`` tokens.

    Samples are concatenated with the tokenizer's EOS between them and cut into equal rows, the
    usual packing for calibration; no padding is needed.
    """
    if seq_len < 2:
        raise CalibrationDataError(f"seq_len must be at least 2 (the loss predicts the next token), got {seq_len}.")
    source = str(path) if path is not None else f"vlq/data/{CALIBRATION_CORPUS.name}"
    samples = load_text_samples(path, text_field=text_field)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    stream: list[int] = []
    rows_needed = num_batches * batch_size
    for sample in samples:
        stream.extend(tokenizer(sample, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= rows_needed * seq_len:
            break
    available_rows = len(stream) // seq_len
    if available_rows == 0:
        raise CalibrationDataError(
            f"Calibration text from {source} has {len(stream)} tokens, fewer than one row of "
            f"seq_len={seq_len}. Supply more text or lower seq_len."
        )
    if available_rows < rows_needed:
        raise CalibrationDataError(
            f"Calibration text from {source} gives {available_rows} rows of {seq_len} tokens but "
            f"{num_batches} batches x {batch_size} = {rows_needed} rows were asked. Supply more text, "
            "or lower num_batches, batch_size or seq_len."
        )
    ids = torch.tensor(stream[: rows_needed * seq_len], dtype=torch.long).view(rows_needed, seq_len)
    _validate_ids(ids, vocab_size, source)
    return CalibrationSet(_batches_from_ids(ids, batch_size), source, batch_size, seq_len, vocab_size, "text")


def from_token_ids(ids: torch.Tensor, *, vocab_size: int, batch_size: int = 1, source: str = "token ids") -> CalibrationSet:
    """Wrap pre-tokenized ``[rows, seq_len]`` ids, checking them against the model's vocabulary."""
    if ids.dim() != 2:
        raise CalibrationDataError(f"token ids must be [rows, seq_len], got shape {tuple(ids.shape)}.")
    _validate_ids(ids, vocab_size, source)
    if ids.shape[1] < 2:
        raise CalibrationDataError(f"{source}: rows of {ids.shape[1]} tokens are too short; need at least 2.")
    if ids.shape[0] < batch_size:
        raise CalibrationDataError(f"{source}: {ids.shape[0]} rows cannot fill one batch of {batch_size}.")
    return CalibrationSet(_batches_from_ids(ids.long(), batch_size), source, batch_size, ids.shape[1], vocab_size, "text")
