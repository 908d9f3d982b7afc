"""The measured oracle's shared work: each decoder layer's BF16 input captured once per batch, then one group
quantized and only the layers from its own onward re-run.

One BF16 forward per batch of the scoring split records, through a forward pre-hook on every decoder layer, the
hidden states and keyword arguments (causal mask, rotary position embeddings, position ids) the text model hands
that layer; vision features are already merged into the hidden states before layer 0, so image+text rows need
nothing more.  :func:`kld_from_layer` runs layers ``L..end``, the final norm and the lm_head from layer ``L``'s
capture, with whatever quantizers are live, and scores KL(BF16 || that) against the captured final hidden states.
With nothing quantized it repeats the BF16 forward's own operations, so its KLD is exactly 0; with one group
quantized it equals a full forward with that group quantized (``tests/test_study.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..fidelity.metrics import FidelityAccumulator, LazyLogits


@dataclass(frozen=True)
class CapturedBatch:
    """One batch's input to every decoder layer, and the BF16 final hidden states (after the norm)."""

    hidden: tuple[torch.Tensor, ...]  # per layer: the hidden states it receives
    kwargs: tuple[dict, ...]  # per layer: the keyword arguments the text model passes it
    final: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None


def _inputs(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def capture_layer_inputs(loaded, batches: Sequence[dict]) -> tuple[CapturedBatch, ...]:
    """One forward of ``loaded.vlm`` per batch (call it with nothing quantized), every layer's input kept."""
    layers = list(loaded.language_model.layers)
    captured = []
    for batch in batches:
        seen: list[tuple[torch.Tensor, dict]] = []

        def keep(module, args, kwargs, seen=seen):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            seen.append((hidden.detach(), rest))

        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
        try:
            out = loaded.vlm.model(**_inputs(batch, loaded.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if len(seen) != len(layers):
            raise RuntimeError(f"captured {len(seen)} decoder-layer inputs for {len(layers)} layers; the text model "
                               "did not call each layer once")
        captured.append(CapturedBatch(tuple(h for h, _ in seen), tuple(k for _, k in seen), out.last_hidden_state.detach(),
                                      batch["labels"], batch.get("attention_mask")))
    return tuple(captured)


@torch.no_grad()
def final_hidden_from_layer(loaded, captured: CapturedBatch, start: int) -> torch.Tensor:
    """Final hidden states (after the norm) from layer ``start``'s captured input, with the live quantizers."""
    text = loaded.language_model
    hidden = captured.hidden[start]
    for index in range(start, len(text.layers)):
        out = text.layers[index](hidden, **captured.kwargs[index])
        hidden = out[0] if isinstance(out, tuple) else out
    return text.norm(hidden)


@torch.no_grad()
def kld_from_layer(loaded, captured: Sequence[CapturedBatch], start: int) -> float:
    """Mean KL(BF16 || live model) over every scored position of ``captured``, re-running layers ``start..end``."""
    accumulator = FidelityAccumulator()
    for batch in captured:
        quant = LazyLogits(final_hidden_from_layer(loaded, batch, start), loaded.lm_head)
        accumulator.add(LazyLogits(batch.final, loaded.lm_head), quant, batch.labels, batch.attention_mask)
    return accumulator.finish(data_source="scoring split", data_kind="text", measurement_point="fake_quant").kld_mean
