"""Fidelity of a quantized model to its BF16 original, in the form llama.cpp's KL-divergence mode reports.

For every scored position (logits at ``t`` predicting the label at ``t + 1``, as in
``vlq.search.search.causal_lm_loss``) with base distribution ``P`` and quantized distribution ``Q``:

* ``KLD = sum_v P(v) * (log P(v) - log Q(v))``  (KL(base || quant), nats; llama.cpp's per-token KLD);
* same top token: ``argmax P == argmax Q`` (first index on ties), with the binomial standard error
  ``sqrt(p * (1 - p) / (n - 1))``;
* ``NLL = -log P(label)`` and ``-log Q(label)``; ``mean ln(PPL(Q)/PPL(base)) = mean NLL_Q - mean NLL_base``
  and ``PPL(Q)/PPL(base) = exp`` of it;
* ``mean Δp = mean(Q(label) - P(label))``.

Median and p99 interpolate linearly between sorted per-token values, as llama.cpp does.

Memory stays bounded: batches are streamed and positions are processed a chunk at a time, so no
full-vocabulary float32 copy of a batch is made; only one float32 KLD per scored token is kept (for the
median and p99).  A vocabulary of at most ``vocab_chunk`` entries is scored in one fused pass per chunk
of positions (``log_softmax``; positions cut so a chunk holds :data:`CHUNK_ELEMENTS` float32 values);
a larger one ``vocab_chunk`` columns at a time (online logsumexp).  Running sums stay on the device
until :meth:`FidelityAccumulator.finish`, so a GPU measurement does not wait on the host per chunk.  A forward may
return :class:`LazyLogits` (final hidden states + lm_head): each chunk's logits are then made when it is
scored, and a stored reference keeps hidden states, not logits.

Nothing here imports modelopt, vLLM or transformers: any callable that maps a batch to logits can be
measured (fake-quantized model, a dequantized checkpoint, vLLM prompt logprobs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..runtime.errors import CalibrationDataError

__all__ = [
    "DATA_KINDS",
    "FIDELITY_VERSION",
    "complete_with_reference_tail",
    "MEASUREMENT_POINTS",
    "SUMMARY_HEADERS",
    "FidelityAccumulator",
    "FidelityMetrics",
    "hidden_logits_forward",
    "LazyLogits",
    "logits_forward",
    "measure_fidelity",
    "percentile",
]

FIDELITY_VERSION = 1
IGNORE_INDEX = -100  # == vlq.data.calibration.IGNORE_INDEX; not imported so this module stays light
DATA_KINDS = ("text", "image_text")
# Where the quantized logits came from (issue 11): the fake-quantized model after the search, the
# exported checkpoint re-read from disk, or vLLM serving that checkpoint.
MEASUREMENT_POINTS = ("fake_quant", "checkpoint", "vllm")
# Qwen2.5-VL's 151936/152064-entry vocabularies are scored whole (one fused pass instead of three
# chunked ones: the 3B's 64-row measurement spent more time in kernel launches and host syncs than in math).
DEFAULT_VOCAB_CHUNK = 2**18
DEFAULT_POSITION_CHUNK = 1024
#: float32 values per chunk of positions x vocabulary (128 MiB; 220 positions of a Qwen vocabulary).  A
#: chunk's scoring holds three such tensors at once.
CHUNK_ELEMENTS = 2**25

SUMMARY_HEADERS = (
    "measured at", "data", "tokens", "mean KLD", "median KLD", "p99 KLD", "max KLD",
    "same top", "PPL(Q)/PPL(base)", "source",
)


@dataclass(frozen=True)
class FidelityMetrics:
    """KL(base || quant) statistics over ``tokens`` scored positions of held-out data."""

    tokens: int
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top_rate: float
    same_top_stderr: float
    nll_base: float
    nll_quant: float
    ppl_ratio: float
    mean_ln_ppl_ratio: float
    mean_delta_p: float
    data_source: str
    data_kind: str
    measurement_point: str
    version: int = FIDELITY_VERSION
    #: The quantized distributions' coverage: "full", or "top-K" when vLLM returned each position's K most
    #: likely tokens (the rest completed in the BF16 tail's shape: see complete_with_reference_tail).
    vocabulary: str = "full"

    def __post_init__(self):
        if self.version != FIDELITY_VERSION:
            raise ValueError(f"Fidelity metrics version {self.version!r} is not supported; this vlq reads version {FIDELITY_VERSION}.")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"Fidelity metrics need tokens >= 1 (an int), got {self.tokens!r}.")
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"Unknown data_kind {self.data_kind!r}; use one of {DATA_KINDS}.")
        if self.measurement_point not in MEASUREMENT_POINTS:
            raise ValueError(f"Unknown measurement_point {self.measurement_point!r}; use one of {MEASUREMENT_POINTS}.")
        if not isinstance(self.data_source, str) or not self.data_source:
            raise ValueError("Fidelity metrics need a non-empty data_source naming the held-out data they were measured on.")
        if not 0.0 <= self.same_top_rate <= 1.0:
            raise ValueError(f"same_top_rate must lie in [0, 1], got {self.same_top_rate!r}.")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FidelityMetrics":
        if not isinstance(data, Mapping):
            raise ValueError(f"Fidelity metrics must be a mapping, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(known - set(data) - {"version", "vocabulary"})
        if unknown or missing:
            raise ValueError(f"Fidelity metrics keys do not match: unknown {unknown}, missing {missing}.")
        return cls(**data)

    # -- report --------------------------------------------------------------------------------
    def summary_row(self) -> list[str]:
        """One row under ``SUMMARY_HEADERS``, formatted as llama.cpp prints these statistics."""
        return [
            self.measurement_point + ("" if self.vocabulary == "full" else f" ({self.vocabulary})"),
            self.data_kind,
            str(self.tokens),
            f"{self.kld_mean:.6f}",
            f"{self.kld_median:.6f}",
            f"{self.kld_p99:.6f}",
            f"{self.kld_max:.6f}",
            f"{100 * self.same_top_rate:.2f} ± {100 * self.same_top_stderr:.2f} %",
            f"{self.ppl_ratio:.6f}",
            self.data_source,
        ]


def complete_with_reference_tail(logprobs: torch.Tensor, returned: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the whole vocabulary from the entries a server returned (``returned``), the rest of
    each position's mass spread over the other tokens in the proportions of the reference (BF16) distribution.

    Measured against that reference, the completed distribution's KLD is the KLD of the coarse distributions
    {each returned token, all others as one outcome}: a lower bound on the full KLD (log-sum inequality), equal
    to it when the quantized tail has the reference's shape, and exact where nothing was left out.
    ``logprobs``/``returned``: ``[T, V]``; ``reference_logits``: ``[T, V]`` logits or log-probabilities.
    """
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    known = logprobs.float().masked_fill(~returned, float("-inf"))
    returned_mass = torch.logsumexp(known, dim=-1, keepdim=True).clamp(max=0.0)
    rest_quant = torch.log1p(-returned_mass.exp().clamp(max=1.0 - 1e-7))  # log(1 - Q_returned)
    rest_reference = torch.logsumexp(reference.masked_fill(returned, float("-inf")), dim=-1, keepdim=True)
    tail = reference + rest_quant - rest_reference
    return torch.where(returned, known, tail)


def percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    """Linear interpolation at ``fraction * (n - 1)`` of ascending values (llama.cpp's percentile).

    ``fraction=0.5`` gives the usual median (mean of the two middle values for even ``n``).
    """
    n = sorted_values.numel()
    if n == 0:
        raise ValueError("percentile of no values")
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    position = fraction * (n - 1)
    low = int(position)
    weight = position - low
    high = min(low + 1, n - 1)
    return (1 - weight) * float(sorted_values[low]) + weight * float(sorted_values[high])


def _scored_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into ``[B * T]`` of the logits that are scored, and the label each one predicts.

    Logits at ``t`` predict the label at ``t + 1``; a pair counts when that label is not -100 and
    both positions are attended (padding neither predicts nor is predicted).
    """
    batch, length = labels.shape
    valid = torch.zeros_like(labels, dtype=torch.bool)
    next_labels = labels[:, 1:]
    keep = next_labels != IGNORE_INDEX
    if attention_mask is not None:
        attended = attention_mask != 0
        keep = keep & attended[:, :-1] & attended[:, 1:]
    valid[:, :-1] = keep
    flat = valid.flatten().nonzero().squeeze(1)
    targets = torch.zeros_like(labels)
    targets[:, :-1] = next_labels.clamp_min(0)
    return flat, targets.flatten()[flat]


class NonFiniteLogits(ValueError):
    """A model under measurement produced NaN (or +inf) logits: its output is broken, not merely far."""


class LazyLogits:
    """``[B, T, V]`` logits not made yet: a model's final hidden states and the lm_head that makes them,
    a few positions at a time.  A 3B row's logits are 155 MB; its hidden states 2 MB, so a stored
    reference stays on the device and a forward can hold many rows.  The lm_head is shared, not copied:
    its weight's checksum is taken here and checked whenever logits are made, so a later change to it
    (it is never quantized) fails loudly instead of measuring against other logits."""

    def __init__(self, hidden: torch.Tensor, lm_head: torch.nn.Module, *, checksum: tuple[int, float] | None = None):
        if hidden.dim() != 3:
            raise ValueError(f"hidden states must be [batch, seq_len, hidden], got {tuple(hidden.shape)}.")
        self.hidden = hidden.detach()
        self.lm_head = lm_head
        self.checksum = _weight_checksum(lm_head) if checksum is None else checksum

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:2], self.lm_head.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def dim(self) -> int:
        return 3

    def __getitem__(self, rows) -> "LazyLogits":
        """Rows (sequences) of the batch, e.g. ``[:2]``: the same lm_head."""
        return LazyLogits(self.hidden[rows], self.lm_head, checksum=self.checksum)

    def verify(self) -> None:
        """Raises if the lm_head changed since these hidden states were captured."""
        if _weight_checksum(self.lm_head) != self.checksum:
            raise ValueError("The lm_head behind stored hidden states changed after they were captured; "
                             "capture the reference again.")

    def rows(self, flat: torch.Tensor, *, verify: bool = True) -> torch.Tensor:
        """``[len(flat), V]`` logits of the flat ``[B * T]`` positions ``flat`` (``verify=False``: the
        caller has just run :meth:`verify`, e.g. once per batch instead of once per chunk)."""
        if verify:
            self.verify()
        states = self.hidden.reshape(-1, self.hidden.shape[-1])[flat.to(self.hidden.device)]
        return self.lm_head(states.to(self.lm_head.weight.device))

    def materialize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.hidden.shape[0] * self.hidden.shape[1], device=self.hidden.device)
                         ).reshape(self.shape)


def _weight_checksum(module: torch.nn.Module) -> tuple[int, float]:
    """Where the weight lives and the sum of every 4099th element: cheap enough to check per chunk of
    positions (a 3B lm_head has 311 M elements), and any scaling or quantization of it moves the sum."""
    weight = module.weight.detach()
    with torch.no_grad():
        return weight.data_ptr(), float(weight.reshape(-1)[::4099].sum(dtype=torch.float64))


def _take(logits: "torch.Tensor | LazyLogits", flat_rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[n, V]`` logits of flat positions ``flat_rows``, on ``device``."""
    if isinstance(logits, LazyLogits):
        return logits.rows(flat_rows, verify=False).to(device)
    flat = logits.reshape(-1, logits.shape[-1])
    return flat[flat_rows.to(flat.device)].to(device)


class FidelityAccumulator:
    """Streams (base logits, quantized logits, labels) batches into llama.cpp-style KLD statistics.

    ``add`` processes one batch and keeps only per-token float32 KLD values and running sums;
    ``finish`` turns them into :class:`FidelityMetrics`.
    """

    def __init__(self, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, position_chunk: int = DEFAULT_POSITION_CHUNK):
        if vocab_chunk < 1 or position_chunk < 1:
            raise ValueError(f"vocab_chunk and position_chunk must be >= 1, got {vocab_chunk} and {position_chunk}.")
        self.vocab_chunk = int(vocab_chunk)
        self.position_chunk = int(position_chunk)
        self._kld: list[torch.Tensor] = []  # per-token KLD, float32, where it was computed
        self._tokens = 0
        # running sums as device tensors (float64; counts int64), read once in finish()
        self._sums: dict[str, torch.Tensor] = {}
        self._vocab: int | None = None

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = value if name not in self._sums else self._sums[name] + value

    @property
    def tokens(self) -> int:
        return self._tokens

    @torch.no_grad()
    def add(
        self,
        base_logits: torch.Tensor,
        quant_logits: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> int:
        """Score one batch of ``[B, T, V]`` logits; returns how many positions it counted."""
        if base_logits.dim() != 3 or base_logits.shape != quant_logits.shape:
            raise ValueError(
                f"base and quantized logits must both be [batch, seq_len, vocab]; got {tuple(base_logits.shape)} "
                f"and {tuple(quant_logits.shape)}."
            )
        batch, length, vocab = base_logits.shape
        if tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels must be [batch, seq_len] = {(batch, length)}, got {tuple(labels.shape)}.")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must be [batch, seq_len] = {(batch, length)}, got {tuple(attention_mask.shape)}.")
        if self._vocab is not None and vocab != self._vocab:
            raise ValueError(f"vocabulary changed between batches: {self._vocab} then {vocab} logits per position.")
        self._vocab = vocab
        # compute where the accelerator is: a stored CPU reference meets GPU logits on the GPU
        device = quant_logits.device if quant_logits.device.type != "cpu" else base_logits.device
        if isinstance(base_logits, torch.Tensor):
            base_logits = base_logits.to(device, non_blocking=base_logits.is_pinned())  # ordered on the stream
        if isinstance(quant_logits, torch.Tensor):
            quant_logits = quant_logits.to(device)
        labels = labels.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        positions, targets = _scored_positions(labels, attention_mask)
        if positions.numel() and int(targets.max()) >= vocab:
            raise ValueError(f"a label id ({int(targets.max())}) is outside the {vocab}-entry vocabulary of the logits.")
        for side in (base_logits, quant_logits):
            if isinstance(side, LazyLogits):
                side.verify()  # once per batch: the chunks below share this check
        step = max(1, min(self.position_chunk, CHUNK_ELEMENTS // min(vocab, self.vocab_chunk)))
        for start in range(0, positions.numel(), step):
            rows = positions[start : start + step]
            # one chunk of positions' logits at a time (made here when the logits are lazy)
            self._add_rows(_take(base_logits, rows, device), _take(quant_logits, rows, device), targets[start : start + step])
        return int(positions.numel())

    def _add_rows(self, base_rows: torch.Tensor, quant_rows: torch.Tensor, targets: torch.Tensor) -> None:
        """Statistics of ``[n, V]`` base and quantized logits whose labels are ``targets``."""
        picked = targets[:, None]
        if base_rows.shape[1] <= self.vocab_chunk:
            # the whole vocabulary at once: fused float32 log-softmax, three [n, V] tensors at most
            log_p = torch.log_softmax(base_rows, dim=1, dtype=torch.float32)
            log_q = torch.log_softmax(quant_rows, dim=1, dtype=torch.float32)
            nll_base = -log_p.gather(1, picked).squeeze(1)
            nll_quant = -log_q.gather(1, picked).squeeze(1)
            term = log_p - log_q
            del log_q
            p = log_p.exp_()
            # p == 0 contributes 0 even where log Q is -inf (0 * inf would be NaN).
            kld = term.mul_(p).masked_fill_(p == 0, 0.0).sum(dim=1, dtype=torch.float64)
            del term, p, log_p
            base_top, quant_top = base_rows.argmax(dim=1), quant_rows.argmax(dim=1)  # first index on ties
        else:
            base_lse, base_top = self._logsumexp_and_argmax(base_rows)
            quant_lse, quant_top = self._logsumexp_and_argmax(quant_rows)
            # KLD = sum_v P (log P - log Q), a second pass over the same vocabulary chunks.
            kld = torch.zeros(base_rows.shape[0], dtype=torch.float64, device=base_rows.device)
            for col in range(0, base_rows.shape[1], self.vocab_chunk):
                log_p = base_rows[:, col : col + self.vocab_chunk].float() - base_lse[:, None]
                log_q = quant_rows[:, col : col + self.vocab_chunk].float() - quant_lse[:, None]
                p = log_p.exp()
                term = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
                kld += term.sum(dim=1, dtype=torch.float64)
            nll_base = base_lse - base_rows.gather(1, picked).squeeze(1).float()
            nll_quant = quant_lse - quant_rows.gather(1, picked).squeeze(1).float()
        for name, values in (("base", nll_base), ("quantized", nll_quant), ("KLD of quantized", kld)):
            self._accumulate(f"nan:{name}", torch.isnan(values).sum())
        self._kld.append(kld.float())
        self._tokens += int(kld.numel())
        self._accumulate("same_top", (base_top == quant_top).sum())
        self._accumulate("kld", kld.sum())
        self._accumulate("nll_base", nll_base.double().sum())
        self._accumulate("nll_quant", nll_quant.double().sum())
        self._accumulate("delta_p", ((-nll_quant.double()).exp() - (-nll_base.double()).exp()).sum())

    def _logsumexp_and_argmax(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Online logsumexp and first-index argmax of ``[n, V]`` logits over vocabulary chunks, in float32."""
        n = logits.shape[0]
        running_max = torch.full((n,), -math.inf, dtype=torch.float32, device=logits.device)
        running_sum = torch.zeros(n, dtype=torch.float32, device=logits.device)
        top = torch.zeros(n, dtype=torch.long, device=logits.device)
        for col in range(0, logits.shape[1], self.vocab_chunk):
            chunk = logits[:, col : col + self.vocab_chunk].float()
            chunk_top = chunk.argmax(dim=1)
            chunk_max = chunk.gather(1, chunk_top[:, None]).squeeze(1)
            better = chunk_max > running_max  # strict: an earlier chunk keeps ties (first index wins)
            top = torch.where(better, chunk_top + col, top)
            new_max = torch.maximum(running_max, chunk_max)
            # Rows that are -inf so far would give exp(-inf - -inf) = NaN; their sum is 0 either way.
            safe_max = torch.where(torch.isinf(new_max) & (new_max < 0), torch.zeros_like(new_max), new_max)
            running_sum = running_sum * (running_max - safe_max).exp() + (chunk - safe_max[:, None]).exp().sum(dim=1)
            running_max = new_max
        return running_max + running_sum.log(), top

    def finish(self, *, data_source: str, data_kind: str, measurement_point: str) -> FidelityMetrics:
        """The statistics over every position added so far."""
        if self._tokens == 0:
            raise CalibrationDataError(
                f"No position of {data_source} was scored: every label is -100 or masked. "
                "Fidelity needs held-out batches with at least one predicted token."
            )
        sums = {name: value.item() for name, value in self._sums.items()}  # one wait for the device, here
        for name in ("base", "quantized", "KLD of quantized"):
            if sums[f"nan:{name}"]:
                raise NonFiniteLogits(
                    f"{name} logits give NaN at {int(sums[f'nan:{name}'])} of {self._tokens} positions "
                    "(NaN or +inf logits); the model's output is broken, fidelity cannot be measured."
                )
        values = torch.sort(torch.cat(self._kld).cpu()).values
        n = self._tokens
        same = sums["same_top"] / n
        nll_base = sums["nll_base"] / n
        nll_quant = sums["nll_quant"] / n
        ln_ratio = nll_quant - nll_base
        return FidelityMetrics(
            tokens=n,
            kld_mean=sums["kld"] / n,
            kld_median=percentile(values, 0.5),
            kld_p99=percentile(values, 0.99),
            kld_max=float(values[-1]),
            same_top_rate=same,
            same_top_stderr=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            nll_base=nll_base,
            nll_quant=nll_quant,
            ppl_ratio=math.exp(ln_ratio),
            mean_ln_ppl_ratio=ln_ratio,
            mean_delta_p=sums["delta_p"] / n,
            data_source=data_source,
            data_kind=data_kind,
            measurement_point=measurement_point,
        )


def as_logits(output: Any) -> "torch.Tensor | LazyLogits":
    if isinstance(output, LazyLogits):
        return output
    logits = getattr(output, "logits", output)  # a Hugging Face ModelOutput or a plain tensor
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"a forward passed to measure_fidelity must return logits (a tensor), got {type(output).__name__}.")
    return logits


def measure_fidelity(
    base_forward: Callable[[dict], Any],
    quant_forward: Callable[[dict], Any],
    batches: Iterable[dict],
    *,
    measurement_point: str,
    data_source: str | None = None,
    data_kind: str | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    position_chunk: int = DEFAULT_POSITION_CHUNK,
) -> FidelityMetrics:
    """KL(base || quant) and friends of ``quant_forward`` against ``base_forward`` over ``batches``.

    Each forward maps one batch dict (``input_ids``, ``attention_mask``, ``labels``, and for image+text
    the pixel inputs) to ``[B, T, V]`` logits (or log-probabilities). Batches are processed one at a
    time under ``torch.no_grad``; neither batch's logits outlive its step. ``batches`` may be a
    ``vlq.data.calibration.CalibrationSet``: its ``source`` and ``kind`` then fill ``data_source`` and
    ``data_kind`` when they are not given.
    """
    if data_source is None:
        data_source = getattr(batches, "source", None)
    if data_kind is None:
        kind = getattr(batches, "kind", None)
        data_kind = "text" if kind == "synthetic" else kind  # random-token batches are text too
    if data_source is None or data_kind is None:
        raise ValueError("measure_fidelity needs data_source and data_kind (or a CalibrationSet that carries them).")
    if data_kind not in DATA_KINDS:
        raise ValueError(f"Unknown data_kind {data_kind!r}; use one of {DATA_KINDS}.")
    if measurement_point not in MEASUREMENT_POINTS:
        raise ValueError(f"Unknown measurement_point {measurement_point!r}; use one of {MEASUREMENT_POINTS}.")
    accumulator = FidelityAccumulator(vocab_chunk=vocab_chunk, position_chunk=position_chunk)
    with torch.no_grad():
        for batch in batches:
            if "labels" not in batch:
                raise ValueError(f"a batch from {data_source} has no 'labels'; fidelity scores next-token labels.")
            base = as_logits(base_forward(batch))
            quant = as_logits(quant_forward(batch))
            accumulator.add(base, quant, batch["labels"], batch.get("attention_mask"))
            del base, quant
    return accumulator.finish(data_source=data_source, data_kind=data_kind, measurement_point=measurement_point)


def logits_forward(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """A forward for :func:`measure_fidelity`: moves a batch to ``model``'s device and returns its logits.

    ``labels`` are not passed (the model would compute a loss over the full vocabulary for nothing).
    """
    device = next(model.parameters()).device

    def forward(batch: dict) -> torch.Tensor:
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
        return as_logits(model(**inputs, use_cache=False))

    return forward


def hidden_logits_forward(model: torch.nn.Module) -> Callable[[dict], "LazyLogits | torch.Tensor"]:
    """:func:`logits_forward` for a model with a base ``model`` and an ``lm_head`` (a Hugging Face
    ``...ForConditionalGeneration``): returns :class:`LazyLogits`, its final hidden states and lm_head,
    whose logits the measurement makes a chunk of positions at a time.  Other models: their logits."""
    base, lm_head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(base, torch.nn.Module) or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        return logits_forward(model)
    device = next(model.parameters()).device

    def forward(batch: dict) -> LazyLogits:
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
        return LazyLogits(base(**inputs, use_cache=False).last_hidden_state, lm_head)

    return forward
