"""The fidelity stage: held-out references before the search, and measurement points a (fake-quantized model), b
(the checkpoint read back from disk) and c (vLLM), each against the BF16 reference; the export-agreement check."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from ..data.calibration import (
    CalibrationSet, default_text_path, synthetic_text_calibration,
)
from ..checks.check import Check
from ..checks.registry import get_check
from ..runtime.errors import (
    CheckpointError, SchemeError, stage_boundary,
)
from ..fidelity.metrics import FidelityMetrics, NonFiniteLogits, hidden_logits_forward
from ..fidelity.reference import FidelityReference, capture_reference, measure_against
from ..data.heldout import HELDOUT_SEED_BASE, heldout_image_text_batches, heldout_text_batches
from ..inputs.requests import DataRequest, RunFolder
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import writing
from ..formats.registry import FORMATS, NO_QUANT
from ..search.scheme import Scheme
from ..fidelity.quantized_weights import HostOriginals, weights_quantized_once
from .results import Searched


def text_path(loaded: LoadedVLM, data: DataRequest) -> str | Path:
    """The text file calibration and held-out rows are read from: ``--data``, else the model's shipped default."""
    return data.text if data.text is not None else default_text_path(loaded.source)


#: Held-out rows measured for fidelity: a few for the tiny model, 32 (x the scheme's seq_len) for full-size ones.
FIDELITY_ROWS_TINY = 8


FIDELITY_ROWS_FULL_SIZE = 32


#: Rows share a forward up to this many tokens (3B at 512 tokens: 16 rows).  Both sides of a measurement keep
#: final hidden states (vlq.fidelity.metrics.LazyLogits: 2 MB per 3B row) and make logits 1024 positions at a time,
#: so a forward's memory is its activations; fewer, bigger forwards share the fake-quantized model's
#: per-module overhead (H200: ~0.14 s per forward).
FIDELITY_TOKENS_PER_FORWARD = 8192


def fidelity_references(
    loaded: LoadedVLM,
    scheme: Scheme,
    data: DataRequest = DataRequest(),
    *,
    calibration: CalibrationSet | None = None,
    rows: int | None = None,
    kinds: Sequence[str] = ("text", "image_text"),
    progress: Progress = SILENT,
) -> tuple[FidelityReference, ...]:
    """Stage 2b: held-out batches disjoint from calibration, and the BF16 model's logits on them.

    Call it before ``loaded`` is quantized.  Text comes from the end of the calibration text (or the
    shipped corpus), or — without a tokenizer — from seeded tokens of a held-out seed range; image+text
    from generated images of a held-out seed range.  With ``calibration`` the held-out data must be
    disjoint from it.
    """
    if rows is None:
        rows = FIDELITY_ROWS_TINY if loaded.vocab_size <= 4096 else FIDELITY_ROWS_FULL_SIZE  # tiny models: 1024
    forward = hidden_logits_forward(loaded.vlm)
    references = []
    with progress.bar("fidelity reference (BF16)", total=len(kinds)) as bar:
        for kind in kinds:
            if kind == "text":
                if loaded.tokenizer is not None:
                    heldout = heldout_text_batches(
                        loaded.tokenizer, vocab_size=loaded.vocab_size, num_batches=rows, seq_len=scheme.seq_len,
                        path=text_path(loaded, data), calibration=calibration if calibration is not None and calibration.kind == "text" else None)
                else:
                    heldout = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=rows,
                                                         seq_len=scheme.seq_len, seed=HELDOUT_SEED_BASE + data.seed)
            elif kind == "image_text":
                image_calibration = calibration if calibration is not None and calibration.kind == "image_text" else None
                heldout = heldout_image_text_batches(loaded, num_batches=rows, seed=data.seed, calibration=image_calibration)
            else:
                raise SchemeError(f"Unknown fidelity data kind {kind!r}; use text or image_text.")
            per_forward = max(1, FIDELITY_TOKENS_PER_FORWARD // scheme.seq_len)
            references.append(capture_reference(forward, heldout.to(loaded.device), rows_per_forward=per_forward))
            bar.update()
    return tuple(references)


def measure_fake_quant(loaded: LoadedVLM, references: Sequence[FidelityReference], *, progress: Progress = SILENT,
                       originals: HostOriginals | None = None) -> tuple[FidelityMetrics, ...]:
    """Measurement point a: the fake-quantized model right after the search, against the BF16 reference.
    A sweep passes one ``originals`` for all its in-place targets (:class:`vlq.search.search.HostOriginals`)."""
    forward = hidden_logits_forward(loaded.vlm)
    with progress.bar("fidelity (fake-quantized)", total=len(references)) as bar, \
            weights_quantized_once(loaded.vlm, originals=originals):
        metrics = []
        for reference in references:
            metrics.append(measure_against(reference, forward, measurement_point="fake_quant"))
            bar.update()
    return tuple(metrics)


def measure_checkpoint(checkpoint: str | Path, references: Sequence[FidelityReference], *,
                       progress: Progress = SILENT) -> tuple[FidelityMetrics, ...]:
    """Measurement point b: the exported checkpoint re-read from disk by the independent dequantizer
    (:mod:`vlq.export.dequant`: safetensors + quantization config -> BF16 weights plus the activation
    quantization the config prescribes), against the BF16 reference."""
    from ..export.dequant import dequantize_checkpoint

    device = references[0].batches[0]["input_ids"].device if references else "cpu"
    with progress.bar("fidelity (checkpoint from disk)", total=len(references)) as bar, \
            stage_boundary("fidelity of the checkpoint read back from disk", CheckpointError):
        built = dequantize_checkpoint(checkpoint).build_model(device=device)
        forward = hidden_logits_forward(built.model)
        metrics = []
        for reference in references:
            metrics.append(measure_against(reference, forward, measurement_point="checkpoint"))
            bar.update()
        built.remove_hooks()
        del built
    return tuple(metrics)


def measure_served(checkpoint: str | Path, references: Sequence[FidelityReference], *,
                   progress: Progress = SILENT) -> tuple[FidelityMetrics, ...]:
    """Measurement point c: vLLM's prompt log-probabilities (full vocabulary) of the checkpoint, against
    the BF16 reference.  Text references only: vLLM expands image placeholders itself, so image+text
    prompts do not line up token for token with the held-out batches.  Needs a vLLM that has kernels
    for the checkpoint's formats on this machine."""
    from ..serve.runner import VllmRunner

    with progress.bar("fidelity (vLLM)"), VllmRunner(checkpoint, **served_engine_args(references)) as runner:
        return served_fidelity(runner, references)


def served_engine_args(references: Sequence[FidelityReference]) -> dict:
    """Full-vocabulary prompt logprobs, and a context that holds the longest held-out row plus the token vLLM
    generates after it (a real checkpoint's 512-token rows need 513)."""
    from ..serve.runner import context_length_for

    longest = max((b["input_ids"].shape[1] for r in references if r.data_kind == "text" for b in r.batches), default=0)
    return {"max_logprobs": -1, "max_model_len": context_length_for(longest)}


def served_fidelity(runner, references: Sequence[FidelityReference], *, top_k: int | None | str = "auto"
                     ) -> tuple[FidelityMetrics, ...]:
    """Point c on each text reference: vLLM's whole-vocabulary prompt logprobs for small vocabularies, each
    position's top :data:`vlq.serve.runner.PROMPT_LOGPROBS_TOP_K` for Qwen-sized ones (completed in the BF16
    tail's shape, a lower bound on the KLD; the metrics say which).  ``top_k``: "auto", None (whole
    vocabulary) or a number."""
    import torch

    from ..fidelity.metrics import LazyLogits, complete_with_reference_tail
    from ..serve.runner import FULL_PROMPT_LOGPROBS_VOCAB, PROMPT_LOGPROBS_TOP_K

    metrics = []
    for reference in (r for r in references if r.data_kind == "text"):
        vocab = reference.logits[0].shape[-1]
        k = (None if vocab <= FULL_PROMPT_LOGPROBS_VOCAB else PROMPT_LOGPROBS_TOP_K) if top_k == "auto" else top_k
        stored = dict(zip(map(id, reference.batches), reference.logits))

        def forward(batch, vocab=vocab, k=k, stored=stored):
            tables = runner.prompt_logprobs(batch["input_ids"].tolist(), vocab, top_k=k)
            if k is None:
                return torch.stack([t.logprobs for t in tables])
            base = stored[id(batch)]
            rows = []
            for i, table in enumerate(tables):
                logits = base[i : i + 1].materialize()[0] if isinstance(base, LazyLogits) else base[i]
                rows.append(complete_with_reference_tail(table.logprobs, table.returned, logits.to(table.logprobs.device)))
            return torch.stack(rows)

        measured = measure_against(reference, forward, measurement_point="vllm")
        if k is not None:
            measured = dataclasses.replace(measured, vocabulary=f"top-{k}")
        metrics.append(measured)
    return tuple(metrics)


def export_agreement(manifest: Manifest, fake_quant: FidelityReference, checkpoint: str | Path, *,
                     bf16_to_fake_quant: FidelityMetrics) -> Check:
    """Point b agrees with point a: the exported checkpoint, rebuilt from disk, is within the format's
    export-agreement factor (:attr:`vlq.formats.spec.QuantFormat.export_agreement`) of the fake-quantized model (``fake_quant`` holds a's logits)."""
    chosen = {g.chosen for g in manifest.groups} - {NO_QUANT}
    factor = max((FORMATS[f].export_agreement.factor for f in chosen), default=0.0)
    allowed = factor * bf16_to_fake_quant.kld_mean
    spec = get_check("export_agreement")
    try:
        between = measure_checkpoint(checkpoint, [fake_quant])[0]
    except NonFiniteLogits as exc:  # e.g. an E4M3 scale that overflowed to NaN on disk: a verdict, not a crash
        return spec.result((f"checkpoint read back from disk gives non-finite logits ({exc}): scales or weights on disk "
                            "are broken",), 0, "")
    problems = [] if between.kld_mean <= allowed else [
        f"checkpoint read back from disk is {between.kld_mean:.3g} nats/token from the fake-quantized model, more than "
        f"{factor:g} x its {bf16_to_fake_quant.kld_mean:.3g} from BF16 ({', '.join(sorted(chosen))}): scales or weights on "
        "disk do not encode what the search measured"]
    return spec.result(problems, between.tokens, f"KLD {between.kld_mean:.3g} <= {allowed:.3g} ({factor:g} x KLD to BF16)")


def export_agreement_check(*, manifest: Manifest, fake_quant: FidelityReference, checkpoint: str | Path,
                           bf16_to_fake_quant: FidelityMetrics, **_) -> Check:
    """The fidelity stage's registered check (:func:`export_agreement`)."""
    return export_agreement(manifest, fake_quant, checkpoint, bf16_to_fake_quant=bf16_to_fake_quant)


def record_fidelity(searched: Searched, metrics: Sequence[FidelityMetrics], run: RunFolder | None = None) -> Searched:
    """``searched`` with ``metrics`` in its manifest (rewritten in ``run`` when given)."""
    manifest = searched.manifest.with_fidelity(*metrics)
    if run is not None:
        with writing(run) as staged:
            manifest.save(staged.manifest)
    return dataclasses.replace(searched, manifest=manifest)
