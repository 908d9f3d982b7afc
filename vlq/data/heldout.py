"""Held-out evaluation batches, disjoint from the calibration data, for fidelity measurements.

Calibration (``vlq.data.calibration.text_batches``) packs samples from the *front* of a text file until it
has enough tokens; held-out text is packed from the *back* of the same file, so the two meet only when
the file is too small for both, which is refused.  Generated image+text calibration uses seeds below
``HELDOUT_SEED_BASE``; held-out image+text uses ``HELDOUT_SEED_BASE + seed``, a disjoint seed range.

Disjointness is also checked on content (:func:`find_overlap`): no held-out row of tokens occurs in the
calibration token stream, and no held-out image has the pixels of a calibration image.  Batches are
the same ``{"input_ids", "attention_mask", "labels", ...}`` dicts as calibration batches, wrapped in a
``CalibrationSet`` whose ``source`` starts with ``heldout:`` and names what was read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .calibration import (
    IMAGE_TEXT, CalibrationSet, from_token_ids, image_text_calibration, load_text_samples, sample_token_ids, text_source,
)
from ..runtime.errors import CalibrationDataError

__all__ = [
    "HELDOUT_PREFIX",
    "HELDOUT_SEED_BASE",
    "Overlap",
    "find_overlap",
    "heldout_image_text_batches",
    "heldout_text_batches",
    "require_disjoint",
]

HELDOUT_PREFIX = "heldout:"
# Calibration seeds live in [0, 2**32); held-out seeds in [2**32, 2**33). Both numpy's PCG64 and
# torch.Generator accept seeds this large.
HELDOUT_SEED_BASE = 2**32


@dataclass(frozen=True)
class Overlap:
    """How much of a held-out set also occurs in a calibration set.

    ``unit`` is what was compared: ``"rows"`` (each held-out row's attended tokens searched in the
    calibration token stream), ``"windows of N tokens"``, or ``"images"`` (pixel values of each image).
    """

    unit: str
    checked: int
    shared: int
    first_shared: int | None  # index of the first held-out row/window/image found in calibration

    @property
    def disjoint(self) -> bool:
        return self.shared == 0


def _attended_rows(calibration: CalibrationSet) -> list[torch.Tensor]:
    rows = []
    for batch in calibration:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for r in range(ids.shape[0]):
            row = ids[r] if mask is None else ids[r][mask[r] != 0]
            rows.append(row.long().cpu())
    return rows


def _image_digests(calibration: CalibrationSet) -> list[str]:
    """One digest per image: ``pixel_values`` rows are split by each image's patch count (t*h*w)."""
    digests = []
    for batch in calibration:
        pixels, grids = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pixels is None or grids is None:
            continue
        start = 0
        for t, h, w in grids.tolist():
            patches = pixels[start : start + t * h * w].detach().float().cpu().contiguous()
            digests.append(hashlib.sha256(patches.numpy().tobytes()).hexdigest())
            start += t * h * w
    return digests


def _contains(haystack: bytes, needle: bytes, itemsize: int) -> bool:
    """``needle`` occurs in ``haystack`` at a whole-token offset (bytes.find may match mid-token)."""
    pos = haystack.find(needle)
    while pos != -1 and pos % itemsize:
        pos = haystack.find(needle, pos + 1)
    return pos != -1


def find_overlap(heldout: CalibrationSet, calibration: CalibrationSet, *, window: int | None = None) -> Overlap:
    """Count held-out rows (or ``window``-token windows, or images) that also occur in ``calibration``.

    Text rows are searched in the concatenated calibration token stream, so a row counts as shared
    even when the two sets were cut into rows at different offsets.  Image+text sets compare images
    (their captions come from a few templates and may repeat legitimately).
    """
    if heldout.kind == IMAGE_TEXT:
        seen = set(_image_digests(calibration))
        mine = _image_digests(heldout)
        hits = [i for i, d in enumerate(mine) if d in seen]
        return Overlap("images", len(mine), len(hits), hits[0] if hits else None)
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}.")
    stream = torch.cat(_attended_rows(calibration)).numpy().tobytes()
    pieces = []
    for row in _attended_rows(heldout):
        if window is None:
            pieces.append(row)
        else:
            pieces.extend(row[i : i + window] for i in range(0, max(row.numel() - window, 0) + 1))
    itemsize = torch.empty((), dtype=torch.long).element_size()
    hits = [i for i, piece in enumerate(pieces) if _contains(stream, piece.numpy().tobytes(), itemsize)]
    unit = "rows" if window is None else f"windows of {window} tokens"
    return Overlap(unit, len(pieces), len(hits), hits[0] if hits else None)


def require_disjoint(heldout: CalibrationSet, calibration: CalibrationSet, *, window: int | None = None) -> Overlap:
    """:func:`find_overlap`, raising ``CalibrationDataError`` when anything is shared."""
    overlap = find_overlap(heldout, calibration, window=window)
    if not overlap.disjoint:
        raise CalibrationDataError(
            f"Held-out data {heldout.source} overlaps calibration data {calibration.source}: "
            f"{overlap.shared} of {overlap.checked} held-out {overlap.unit} occur in it (first: #{overlap.first_shared}). "
            "Supply more text, or fewer/shorter held-out or calibration rows."
        )
    return overlap


def _samples_read_from_front(tokenizer, samples: list[str], tokens: int) -> int:
    """How many samples front-to-back packing reads to fill ``tokens`` tokens (as text_batches does)."""
    total = 0
    for i, sample in enumerate(samples):
        total += len(sample_token_ids(tokenizer, sample))
        if total >= tokens:
            return i + 1
    return len(samples)


def heldout_text_batches(
    tokenizer,
    *,
    vocab_size: int,
    num_batches: int,
    batch_size: int = 1,
    seq_len: int = 64,
    path: str | os.PathLike | None = None,
    text_field: str = "text",
    calibration: CalibrationSet | None = None,
) -> CalibrationSet:
    """``num_batches`` x ``batch_size`` rows of ``seq_len`` tokens packed from the end of the text file.

    Samples are taken from the last one backwards until enough tokens are available, then packed in
    file order with EOS between them and the *last* ``rows * seq_len`` tokens are kept, so held-out rows
    stay as far as possible from the front, where calibration reads.  With ``calibration``, refuses
    (``CalibrationDataError``) when the calibration read any sample used here, or shares any row.
    """
    if num_batches < 1 or batch_size < 1:
        raise CalibrationDataError(f"held-out text needs num_batches>=1 and batch_size>=1, got {num_batches}, {batch_size}.")
    if seq_len < 2:
        raise CalibrationDataError(f"seq_len must be at least 2 (the loss predicts the next token), got {seq_len}.")
    source = text_source(path)
    samples = load_text_samples(path, text_field=text_field)
    needed = num_batches * batch_size * seq_len
    tail: list[list[int]] = []
    count = 0
    for sample in reversed(samples):
        tail.append(sample_token_ids(tokenizer, sample))
        count += len(tail[-1])
        if count >= needed:
            break
    if count < needed:
        raise CalibrationDataError(
            f"Held-out text from {source} has {count} tokens but {num_batches} batches x {batch_size} rows x "
            f"{seq_len} tokens = {needed} were asked. Supply more text, or lower num_batches, batch_size or seq_len."
        )
    first = len(samples) - len(tail)
    stream = [token for ids in reversed(tail) for token in ids][-needed:]
    if calibration is not None and calibration.source == source:
        calibration_tokens = len(calibration) * calibration.batch_size * calibration.seq_len
        read = _samples_read_from_front(tokenizer, samples, calibration_tokens)
        if read > first:
            raise CalibrationDataError(
                f"{source} has {len(samples)} samples: calibration reads samples 0-{read - 1} and held-out text "
                f"needs samples {first}-{len(samples) - 1}. Supply more text, or fewer/shorter held-out or calibration rows."
            )
    ids = torch.tensor(stream, dtype=torch.long).view(num_batches * batch_size, seq_len)
    label = f"{HELDOUT_PREFIX}{source}(samples {first}-{len(samples) - 1} of {len(samples)})"
    heldout = from_token_ids(ids, vocab_size=vocab_size, batch_size=batch_size, source=label)
    if calibration is not None:
        require_disjoint(heldout, calibration)
    return heldout


def heldout_image_text_batches(
    loaded,
    *,
    num_batches: int,
    batch_size: int = 1,
    seq_len: int | None = None,
    seed: int = 0,
    calibration: CalibrationSet | None = None,
) -> CalibrationSet:
    """Generated image+text batches from seed ``HELDOUT_SEED_BASE + seed``, disjoint from calibration seeds.

    Built by ``vlq.data.calibration.image_text_calibration`` (the checkpoint's processor, or processor-less
    batches of the right geometry), exactly like generated calibration.  With ``calibration``, refuses
    when any held-out image has the pixels of a calibration image.
    """
    if not 0 <= seed < HELDOUT_SEED_BASE:
        raise CalibrationDataError(f"held-out seed must lie in [0, 2**32) (it is offset by 2**32), got {seed}.")
    inner = image_text_calibration(
        loaded, "generated", num_batches=num_batches, batch_size=batch_size, seq_len=seq_len,
        seed=HELDOUT_SEED_BASE + seed,
    )
    heldout = CalibrationSet(
        inner.batches, HELDOUT_PREFIX + inner.source, inner.batch_size, inner.seq_len, inner.vocab_size, inner.kind
    )
    if calibration is not None:
        require_disjoint(heldout, calibration)
    return heldout
