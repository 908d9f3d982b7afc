"""The loss AutoQuant's gradient scoring differentiates: next-token cross-entropy, whole or chunk by chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import IGNORE_INDEX
from .scheme import LOSS_CHUNK_TOKENS


def causal_lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"].to(logits.device)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def _summed_token_nll(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor, lm_head: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """``causal_lm_loss(lm_head(hidden), batch)`` without holding the batch's logits.

    The logits of ``chunk_tokens`` tokens at a time are made, reduced to a summed cross-entropy and dropped;
    backward makes them again (a torch checkpoint per chunk: one extra vocabulary GEMM, milliseconds).
    Same value and gradients as the full-logits loss up to float summation order
    (``tests/test_search.py::test_chunked_loss_equals_full_logits_loss``).
    """
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    states = hidden[:, :-1].flatten(0, 1)
    labels = batch["labels"].to(hidden.device)[:, 1:].flatten()
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_summed_token_nll, lm_head, states[start:stop], labels[start:stop], use_reentrant=False)
    return total / (labels != IGNORE_INDEX).sum()  # 0/0 = nan with no label, as the mean cross-entropy gives
