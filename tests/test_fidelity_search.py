"""Does the search pick good schemes?  Fidelity to BF16 on the tiny model with learned weights.

Four families, each with its negative control (issue 11):

* fidelity improves with bits: a measured sweep is non-increasing in KLD within a stated margin, and
  a target that quantizes nothing gives KLD exactly 0;
* the search beats uninformed allocation: at equal bits AutoQuant's allocation has lower KLD than the
  median of random allocations, and the inverted allocation (most sensitive groups quantized first)
  is worse than both;
* export fidelity: the checkpoint read back from disk (point b) agrees with the fake-quantized model
  (point a); a checkpoint with one weight scale doubled does not;
* serving fidelity (CPU, FP8): vLLM's prompt log-probabilities (point c) agree with the fake-quantized
  model; the same tampered scale does not.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import statistics

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlq import pipeline
from vlq.fidelity.reference import capture_reference
from vlq.fidelity.metrics import logits_forward
from vlq.inputs.requests import RunFolder
from vlq.formats.registry import NO_QUANT
from vlq.search.scheme import Scheme
from vlq.fidelity.quantized_weights import HostOriginals, weights_quantized_once
from vlq.search.search import apply_decisions
from vlq.search.decisions import lm_achieved_bits
from vlq.search.guards import enabled_quantizers

SCHEME = Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=4, num_score_steps=4, seq_len=64)
SWEEP_TARGETS = (16.0, 14.0, 12.0, 10.0, 8.0)
#: A measured sweep may rise by this much between neighbouring targets and still count as non-increasing
#: (different held-out tokens flip at near-ties; 8 rows x 64 tokens).
KLD_NOISE = dict(rel=0.05, abs=1e-6)
#: On image+text the trained model's captions barely move (KLD ~1e-4 even with every group in FP8, same top
#: token ~99%), so there a rise below 20% of the sweep's largest KLD is noise, not a trend.
IMAGE_NOISE_SHARE_OF_MAX = 0.2
RANDOM_ALLOCATIONS = 8


def first_increase(kld_by_bits: dict[float, float], *, rel: float, abs: float) -> tuple[float, float] | None:
    """The first (higher bits, lower bits) pair where KLD rises beyond the noise margin, else None."""
    bits = sorted(kld_by_bits, reverse=True)
    for high, low in zip(bits, bits[1:]):
        if kld_by_bits[high] > kld_by_bits[low] * (1 + rel) + abs:
            return high, low
    return None


@pytest.fixture(scope="module")
def trained(trained_vlm):
    """The tiny Qwen2.5-VL with learned weights, BF16, read-only (every test quantizes a copy)."""
    return trained_vlm


@pytest.fixture(scope="module")
def references(trained):
    return pipeline.fidelity_references(trained, SCHEME, kinds=("text",))


@pytest.fixture(scope="module")
def searched(trained, references):
    copy_ = pipeline.fresh_copy(trained)
    return pipeline.search(copy_, SCHEME, pipeline.calibrate(copy_, SCHEME))


def _kld(loaded, references) -> float:
    return pipeline.measure_fake_quant(loaded, references)[0].kld_mean


# ------------------------------------------------------------------------------------------------
# Fidelity improves with bits
# ------------------------------------------------------------------------------------------------


def test_measured_sweep_is_non_increasing_in_bits_and_zero_at_16(trained, tmp_path):
    result = pipeline.sweep(trained, SCHEME.with_(target_bits=SWEEP_TARGETS[0]), pipeline.calibrate(trained, SCHEME),
                            SWEEP_TARGETS, RunFolder(tmp_path), export_targets=False)
    text = {p.target_bits: p.fidelity("text") for p in result.points}
    image = {p.target_bits: p.fidelity("image_text") for p in result.points}
    assert text[16.0].kld_mean == 0.0 and text[16.0].kld_max == 0.0 and text[16.0].same_top_rate == 1.0
    assert image[16.0].kld_mean == 0.0
    assert first_increase({b: m.kld_mean for b, m in text.items()}, **KLD_NOISE) is None, text
    image_kld = {b: m.kld_mean for b, m in image.items()}
    margin = dict(rel=KLD_NOISE["rel"], abs=IMAGE_NOISE_SHARE_OF_MAX * max(image_kld.values()))
    assert first_increase(image_kld, **margin) is None, image_kld
    assert text[8.0].kld_mean > 10 * text[14.0].kld_mean > 0  # the yardstick resolves the targets


def test_monotonicity_check_catches_a_rise():
    """Negative control for the check above: a sweep whose KLD rises as bits grow fails it."""
    assert first_increase({16: 0.0, 12: 0.002, 8: 0.01}, **KLD_NOISE) is None
    assert first_increase({16: 0.0, 12: 0.02, 8: 0.01}, **KLD_NOISE) == (12, 8)
    assert first_increase({12: 0.0104, 8: 0.0100}, **KLD_NOISE) is None  # within the 5% margin


# ------------------------------------------------------------------------------------------------
# The search beats uninformed allocation
# ------------------------------------------------------------------------------------------------


def _fill(groups, order, floor_bits: float):
    """Quantize groups to fp8 in ``order`` while the achieved bits stay at or above ``floor_bits``."""
    chosen = {g.name: NO_QUANT for g in groups}
    for group in order:
        trial = {**chosen, group.name: "fp8"}
        if lm_achieved_bits([dataclasses.replace(g, chosen=trial[g.name]) for g in groups]) >= floor_bits - 1e-9:
            chosen = trial
    return [dataclasses.replace(g, chosen=chosen[g.name]) for g in groups]


def test_search_beats_random_and_inverted_allocations(searched, references):
    groups = searched.result.lm_groups()
    achieved = searched.result.achieved_bits
    measured = {"search": _kld(searched.loaded, references)}
    rng = random.Random(0)
    randoms = []
    for _ in range(RANDOM_ALLOCATIONS):
        order = list(groups)
        rng.shuffle(order)
        allocation = _fill(groups, order, achieved)
        assert lm_achieved_bits(allocation) >= achieved - 1e-9  # never fewer bits than the search: fair to random
        apply_decisions(searched.result, allocation)
        randoms.append(_kld(searched.loaded, references))
    inverted = _fill(groups, sorted(groups, key=lambda g: -g.candidate("fp8").score), achieved)
    apply_decisions(searched.result, inverted)
    measured["inverted"] = _kld(searched.loaded, references)
    apply_decisions(searched.result, searched.result.groups)
    assert _kld(searched.loaded, references) == measured["search"]  # switching back restores the search's model
    median = statistics.median(randoms)
    assert measured["search"] < median, (measured, randoms)
    assert measured["inverted"] > max(measured["search"], median), (measured, randoms)


def _held_out_logits(loaded, references) -> torch.Tensor:
    forward = logits_forward(loaded.vlm)
    with torch.no_grad():
        return torch.cat([forward(batch) for batch in references[0].batches])


def test_weights_quantized_once_give_the_live_fake_quant_logits(searched, references):
    """Measurement serves each fake-quantized weight once instead of per forward: the logits must be
    exactly the live ones, and everything is back afterwards.  Negative control: serving the weights
    unquantized (quantizers off, no fold) moves the logits, so the equality has teeth."""
    live = _held_out_logits(searched.loaded, references)
    enabled_before = enabled_quantizers(searched.loaded.vlm)
    weights_before = {n: p.detach().clone() for n, p in searched.loaded.language_model.named_parameters()}
    with weights_quantized_once(searched.loaded.vlm) as folded:
        assert folded == sum(len(g.members) for g in searched.result.lm_groups() if g.chosen != NO_QUANT) > 0
        assert len(enabled_quantizers(searched.loaded.vlm)) < len(enabled_before)
        assert torch.equal(_held_out_logits(searched.loaded, references), live)
    assert enabled_quantizers(searched.loaded.vlm) == enabled_before
    assert all(torch.equal(p, weights_before[n]) for n, p in searched.loaded.language_model.named_parameters())
    assert torch.equal(_held_out_logits(searched.loaded, references), live)

    weight_quantizers = [m.weight_quantizer for m in searched.loaded.vlm.modules()
                         if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)]
    for quantizer in weight_quantizers:
        quantizer.disable()
    try:
        assert not torch.equal(_held_out_logits(searched.loaded, references), live)
    finally:
        for quantizer in weight_quantizers:
            quantizer.enable()
    assert torch.equal(_held_out_logits(searched.loaded, references), live)


def test_host_originals_are_reused_across_measurements(searched, references):
    """A sweep keeps the host copies of the original weights between targets: the second fold copies
    nothing out, still serves exactly the live fake-quant logits, and restores the same weights.
    Control: a copy kept for one weight object is never served for another (identity, not ``id`` reuse)."""
    loaded = searched.loaded
    live = _held_out_logits(loaded, references)
    weights_before = {n: p.detach().clone() for n, p in loaded.language_model.named_parameters()}
    originals = HostOriginals()
    with weights_quantized_once(loaded.vlm, originals=originals) as folded:
        pass
    params = list(loaded.language_model.parameters())
    kept = {id(p): originals.get(p) for p in params if originals.get(p) is not None}
    assert len(originals) == len(kept) == folded > 0
    with weights_quantized_once(loaded.vlm, originals=originals) as folded_again:
        assert folded_again == folded
        assert torch.equal(_held_out_logits(loaded, references), live)
    assert len(originals) == len(kept) and all(originals.get(p) is kept[id(p)] for p in params if id(p) in kept)
    assert all(torch.equal(p, weights_before[n]) for n, p in loaded.language_model.named_parameters())
    weight = next(p for p in params if id(p) in kept)
    assert originals.get(torch.nn.Parameter(weight.detach().clone())) is None


# ------------------------------------------------------------------------------------------------
# Export fidelity (point b against point a)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained, references, tmp_path_factory):
    """A fresh search exported; a's own logits captured first (the export packs the live weights)."""
    copy_ = pipeline.fresh_copy(trained)
    searched = pipeline.search(copy_, SCHEME, pipeline.calibrate(copy_, SCHEME))
    from vlq.export.export import unify_fused_scales

    unify_fused_scales(copy_.language_model)
    to_bf16 = pipeline.measure_fake_quant(copy_, references)[0]
    fake_quant = capture_reference(logits_forward(copy_.vlm), references[0].batches, data_source="fake-quant", data_kind="text")
    path = pipeline.export(searched, tmp_path_factory.mktemp("export") / "checkpoint").path
    return searched.manifest, fake_quant, to_bf16, path


def _changed_scale(path, dest, change):
    """``path`` copied to ``dest`` with the first down_proj weight scale replaced by ``change(scale)``."""
    shutil.copytree(path, dest)
    tensors = load_file(dest / "model.safetensors")
    key = sorted(k for k in tensors if k.endswith("mlp.down_proj.weight_scale"))[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest, key


def _doubled_scale(path, tmp_path):
    return _changed_scale(path, tmp_path / "tampered", lambda scale: scale * 2)


def test_checkpoint_from_disk_agrees_with_fake_quant(exported):
    manifest, fake_quant, to_bf16, path = exported
    check = pipeline.export_agreement(manifest, fake_quant, path, bf16_to_fake_quant=to_bf16)
    assert check.ok, check.problems
    assert to_bf16.kld_mean > 0


def test_checkpoint_with_a_doubled_scale_disagrees(exported, tmp_path):
    manifest, fake_quant, to_bf16, path = exported
    tampered, key = _doubled_scale(path, tmp_path)
    check = pipeline.export_agreement(manifest, fake_quant, tampered, bf16_to_fake_quant=to_bf16)
    assert not check.ok and "do not encode what the search measured" in check.problems[0], key


def test_checkpoint_with_a_nan_scale_is_a_failed_check_not_a_crash(exported, tmp_path):
    """An overflowed scale on disk (NaN) makes the rebuilt model's logits NaN: the agreement check says
    so as a verdict instead of raising out of the measurement."""
    manifest, fake_quant, to_bf16, path = exported
    tampered, key = _changed_scale(path, tmp_path / "nan", lambda scale: torch.full_like(scale, float("nan")))
    check = pipeline.export_agreement(manifest, fake_quant, tampered, bf16_to_fake_quant=to_bf16)
    assert not check.ok and "non-finite logits" in check.problems[0], key


# ------------------------------------------------------------------------------------------------
# Serving fidelity (point c), CPU FP8
# ------------------------------------------------------------------------------------------------

#: vLLM's CPU FP8 path (torch _scaled_mm, static per-tensor scales) against the fake-quantized model,
#: as a multiple of the fake-quantized model's KLD to BF16 (export rounding included; see
#: the format registry's export agreement, whose FP8 factor is 1.5 for the checkpoint alone).
SERVED_AGREEMENT_FACTOR = 1.5


@pytest.mark.vllm
def test_vllm_prompt_logprobs_agree_with_fake_quant_and_catch_a_doubled_scale(exported, tmp_path):
    manifest, fake_quant, to_bf16, path = exported
    # two held-out rows: vLLM hands back the full vocabulary as Python objects per position (slow on CPU)
    # (held-out text rows share one forward: the first batch's first two rows)
    first, logits = fake_quant.batches[0], fake_quant.logits[0]
    fake_quant = dataclasses.replace(fake_quant, batches=({k: v[:2] for k, v in first.items()},), logits=(logits[:2],))
    served = pipeline.measure_served(path, [fake_quant])[0]
    assert served.measurement_point == "vllm" and served.tokens == 2 * (SCHEME.seq_len - 1)
    assert served.kld_mean <= SERVED_AGREEMENT_FACTOR * to_bf16.kld_mean, (served.kld_mean, to_bf16.kld_mean)
    tampered, key = _doubled_scale(path, tmp_path)
    broken = pipeline.measure_served(tampered, [fake_quant])[0]
    assert broken.kld_mean > 3 * SERVED_AGREEMENT_FACTOR * to_bf16.kld_mean, (key, broken.kld_mean)
    assert torch.isfinite(torch.tensor(broken.kld_mean))


@pytest.mark.vllm
def test_vllm_top_k_prompt_logprobs_bound_the_whole_vocabulary_kld(exported):
    """Qwen-sized vocabularies are measured from each position's top k (the rest in the reference tail's
    shape): a lower bound on the whole-vocabulary KLD, close to it at k=256 here; k=4 is looser (the control:
    the comparison sees a truncation that leaves mass out)."""
    from vlq.serve.runner import VllmRunner

    manifest, fake_quant, to_bf16, path = exported
    first, logits = fake_quant.batches[0], fake_quant.logits[0]
    reference = dataclasses.replace(fake_quant, batches=({k: v[:2] for k, v in first.items()},), logits=(logits[:2],))
    with VllmRunner(path, **pipeline.served_engine_args([reference])) as runner:
        (whole,) = pipeline.served_fidelity(runner, [reference], top_k=None)
        (top,) = pipeline.served_fidelity(runner, [reference], top_k=256)
        (few,) = pipeline.served_fidelity(runner, [reference], top_k=4)
    assert (whole.vocabulary, top.vocabulary, few.vocabulary) == ("full", "top-256", "top-4")
    assert top.tokens == whole.tokens and top.same_top_rate == whole.same_top_rate
    assert 0.9 * whole.kld_mean <= top.kld_mean <= whole.kld_mean * (1 + 1e-5), (top.kld_mean, whole.kld_mean)
    assert few.kld_mean < top.kld_mean, (few.kld_mean, top.kld_mean)

