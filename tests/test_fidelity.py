"""Fidelity metrics (llama.cpp's KL-divergence statistics) and held-out data disjoint from calibration.

Metric tests run on hand-made logits; model tests use the tiny Qwen2.5-VL (``pristine_vlm`` read-only,
``fresh_vlm`` perturbed).  Every property has a negative control that must see the check fail.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlq.data.calibration import IGNORE_INDEX, image_text_calibration, load_text_samples, text_batches
from vlq.runtime.errors import CalibrationDataError
from vlq.fidelity.metrics import (
    SUMMARY_HEADERS, FidelityAccumulator, FidelityMetrics, LazyLogits, hidden_logits_forward, logits_forward, measure_fidelity,
)
from vlq.fidelity.reference import capture_reference, group_rows, measure_against
from vlq.data.heldout import HELDOUT_SEED_BASE, find_overlap, heldout_image_text_batches, heldout_text_batches, require_disjoint

POINT = "fake_quant"


def _finish(acc: FidelityAccumulator) -> FidelityMetrics:
    return acc.finish(data_source="unit", data_kind="text", measurement_point=POINT)


def _metrics(base, quant, labels, mask=None, **chunks) -> FidelityMetrics:
    acc = FidelityAccumulator(**chunks)
    acc.add(base, quant, labels, mask)
    return _finish(acc)


def _random_case(batch=2, length=9, vocab=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, length, vocab, generator=g) * scale
    quant = base + torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    return base, quant, labels


# ---- definitions ----------------------------------------------------------------------------------


def test_identical_logits_give_exactly_zero():
    base, _, labels = _random_case()
    m = _metrics(base, base.clone(), labels)
    assert m.tokens == 2 * 8  # T-1 predictions per row
    assert (m.kld_mean, m.kld_median, m.kld_p99, m.kld_max) == (0.0, 0.0, 0.0, 0.0)
    assert m.same_top_rate == 1.0 and m.same_top_stderr == 0.0
    assert m.ppl_ratio == 1.0 and m.mean_ln_ppl_ratio == 0.0 and m.mean_delta_p == 0.0
    assert m.nll_base == m.nll_quant > 0
    # negative control: a different model on the same data is not "identical"
    _, quant, _ = _random_case()
    other = _metrics(base, quant, labels)
    assert other.kld_mean > 1e-3 and other.ppl_ratio != 1.0


def test_hand_computed_example_matches_llama_cpp_definitions():
    # one row, vocabulary 3: positions 0 and 1 predict labels[1] = 2 and labels[2] = 0
    base = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]])
    quant = torch.tensor([[[1.0, 1.5, -1.0], [0.0, 1.0, 2.0], [-9.0, 0.0, 9.0]]])
    labels = torch.tensor([[1, 2, 0]])

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    klds, same, nll_p, nll_q, dp = [], [], [], [], []
    for t, label in ((0, 2), (1, 0)):
        p = softmax(base[0, t].tolist())
        q = softmax(quant[0, t].tolist())
        klds.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True)))
        same.append(p.index(max(p)) == q.index(max(q)))
        nll_p.append(-math.log(p[label]))
        nll_q.append(-math.log(q[label]))
        dp.append(q[label] - p[label])
    m = _metrics(base, quant, labels)
    assert same == [False, True]
    assert m.tokens == 2
    assert m.kld_mean == pytest.approx(sum(klds) / 2, abs=1e-6)
    assert m.kld_median == pytest.approx(sum(klds) / 2, abs=1e-6)  # even count: mean of the two middles
    assert m.kld_p99 == pytest.approx(min(klds) + 0.99 * abs(klds[1] - klds[0]), abs=1e-6)
    assert m.kld_max == pytest.approx(max(klds), abs=1e-6)
    assert m.same_top_rate == 0.5
    assert m.same_top_stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 1), abs=1e-12)  # sqrt(p(1-p)/(n-1))
    assert m.nll_base == pytest.approx(sum(nll_p) / 2, abs=1e-6)
    assert m.nll_quant == pytest.approx(sum(nll_q) / 2, abs=1e-6)
    assert m.mean_ln_ppl_ratio == pytest.approx((sum(nll_q) - sum(nll_p)) / 2, abs=1e-6)
    assert m.ppl_ratio == pytest.approx(math.exp((sum(nll_q) - sum(nll_p)) / 2), abs=1e-6)
    assert m.mean_delta_p == pytest.approx(sum(dp) / 2, abs=1e-6)
    # negative control: the reverse direction KL(Q||P) is a different number
    reverse = _metrics(quant, base, labels)
    assert abs(reverse.kld_mean - m.kld_mean) > 1e-3


def test_kld_is_kl_base_to_quant_with_llama_cpp_percentiles():
    base, quant, labels = _random_case(batch=3, length=11, vocab=40, seed=1)
    log_p = F.log_softmax(base[:, :-1].double(), -1)
    log_q = F.log_softmax(quant[:, :-1].double(), -1)
    # ModelOpt's kl_div score element-wise: exp(log_p) * (log_p - log_q), summed over the vocabulary
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).flatten().numpy()
    m = _metrics(base, quant, labels)
    assert m.tokens == per_token.size == 30
    assert m.kld_mean == pytest.approx(per_token.mean(), abs=1e-6)
    assert m.kld_median == pytest.approx(np.median(per_token), abs=1e-6)
    assert m.kld_p99 == pytest.approx(np.percentile(per_token, 99), abs=1e-6)  # linear interpolation
    assert m.kld_max == pytest.approx(per_token.max(), abs=1e-6)
    top_same = (base[:, :-1].argmax(-1) == quant[:, :-1].argmax(-1)).double().mean().item()
    assert m.same_top_rate == pytest.approx(top_same, abs=1e-12)


def test_logits_at_t_predict_the_label_at_t_plus_one():
    vocab, length = 16, 7
    labels = torch.arange(length)[None] % vocab
    base = torch.full((1, length, vocab), -20.0)
    base[0, torch.arange(length - 1), labels[0, 1:]] = 20.0  # confident and right, one step ahead
    m = _metrics(base, base.clone(), labels)
    assert m.nll_base < 1e-6
    # negative control: the same logits read without the shift are confidently wrong
    unshifted = torch.full((1, length, vocab), -20.0)
    unshifted[0, torch.arange(length - 1), labels[0, :-1]] = 20.0
    assert _metrics(unshifted, unshifted.clone(), labels).nll_base > 30


def test_chunked_vocabulary_equals_unchunked():
    base, quant, labels = _random_case(batch=3, length=13, vocab=1000, seed=2, scale=6.0)
    whole = _metrics(base, quant, labels, vocab_chunk=1000, position_chunk=10_000)
    chunked = _metrics(base, quant, labels, vocab_chunk=7, position_chunk=5)
    a, b = whole.to_dict(), chunked.to_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        else:
            assert b[key] == a[key], key


def test_top_token_ties_resolve_to_the_first_index_across_chunks():
    vocab = 20
    base = torch.zeros(1, 2, vocab)
    base[0, 0, [3, 10]] = 5.0  # tie: the first index (3) is the top token, as in llama.cpp
    quant = torch.zeros(1, 2, vocab)
    quant[0, 0, 10] = 5.0
    labels = torch.zeros(1, 2, dtype=torch.long)
    for chunk in (vocab, 7, 4):  # 3 and 10 fall into different chunks for 7 and 4
        assert _metrics(base, quant, labels, vocab_chunk=chunk).same_top_rate == 0.0, chunk
    # control: when the tie is broken in favour of index 3 in both, the top tokens agree
    quant[0, 0, 3] = 6.0
    assert _metrics(base, quant, labels, vocab_chunk=4).same_top_rate == 1.0


def test_ignored_and_masked_positions_do_not_count():
    base, quant, labels = _random_case(batch=2, length=10, vocab=30, seed=3)
    mask = torch.ones_like(labels)
    labels = labels.clone()
    labels[0, 4] = IGNORE_INDEX  # drops the prediction made at position 3
    labels[1, 7:] = IGNORE_INDEX  # drops predictions made at 6, 7, 8
    mask[1, 7:] = 0
    mask[0, 0] = 0  # position 0 does not predict position 1 (padding predicts nothing)
    m = _metrics(base, quant, labels, mask)
    assert m.tokens == 18 - 1 - 3 - 1
    # garbage logits at positions that are not scored leave every metric unchanged...
    junk = quant.clone()
    junk[0, 3] += 100 * torch.randn(30)
    junk[1, 6:] += 100 * torch.randn(4, 30)
    junk[0, 0] += 100 * torch.randn(30)
    assert _metrics(base, junk, labels, mask) == m
    # ...and (negative control) the same garbage at a scored position changes them
    scored = quant.clone()
    scored[0, 5] += 100 * torch.randn(30)
    assert _metrics(base, scored, labels, mask).kld_max > m.kld_max


def test_streaming_over_batches_equals_one_batch():
    base, quant, labels = _random_case(batch=4, length=9, vocab=60, seed=4)
    one = _metrics(base, quant, labels)
    acc = FidelityAccumulator(vocab_chunk=16)
    assert [acc.add(base[i : i + 1], quant[i : i + 1], labels[i : i + 1]) for i in range(4)] == [8] * 4
    streamed = _finish(acc)
    assert streamed.tokens == one.tokens == 32
    assert streamed.kld_mean == pytest.approx(one.kld_mean, rel=1e-6)
    assert streamed.kld_p99 == pytest.approx(one.kld_p99, rel=1e-6)
    assert streamed.same_top_rate == one.same_top_rate


def test_refusals_name_the_problem():
    base, quant, labels = _random_case()
    with pytest.raises(ValueError, match=r"must both be \[batch, seq_len, vocab\]"):
        FidelityAccumulator().add(base, quant[..., :-1], labels)
    broken = quant.clone()
    broken[0, 2, 5] = float("nan")
    accumulator = FidelityAccumulator()
    accumulator.add(base, broken, labels)  # counted on the device; reported when the statistics are read
    with pytest.raises(ValueError, match="quantized logits give NaN at 1 of"):
        _finish(accumulator)
    with pytest.raises(CalibrationDataError, match="No position of unit was scored"):
        _metrics(base, quant, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="Unknown measurement_point 'fakequant'"):
        measure_fidelity(lambda b: base, lambda b: quant, [{"labels": labels}], data_source="x", data_kind="text",
                         measurement_point="fakequant")
    with pytest.raises(ValueError, match="needs data_source and data_kind"):
        measure_fidelity(lambda b: base, lambda b: quant, [{"labels": labels}], measurement_point=POINT)


def test_metrics_round_trip_and_summary_row():
    base, quant, labels = _random_case()
    m = _metrics(base, quant, labels)
    data = json.loads(json.dumps(m.to_dict()))
    assert FidelityMetrics.from_dict(data) == m
    row = m.summary_row()
    assert len(row) == len(SUMMARY_HEADERS)
    assert row[:3] == [POINT, "text", "16"] and row[-1] == "unit"
    assert row[3] == f"{m.kld_mean:.6f}" and row[7].endswith("%")
    with pytest.raises(ValueError, match=r"unknown \['kld_mean_typo'\]"):
        FidelityMetrics.from_dict({**data, "kld_mean_typo": 0.0})
    with pytest.raises(ValueError, match=r"missing \['tokens'\]"):
        FidelityMetrics.from_dict({k: v for k, v in data.items() if k != "tokens"})
    with pytest.raises(ValueError, match="Unknown data_kind 'image'"):
        FidelityMetrics.from_dict({**data, "data_kind": "image"})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        FidelityMetrics.from_dict({**data, "version": 99})


# ---- the tiny model -------------------------------------------------------------------------------


def _down_proj(loaded):
    return loaded.vlm.get_submodule(f"{loaded.lm_path}.layers.0.mlp.down_proj").weight


def test_perturbed_model_kld_grows_with_the_perturbation(pristine_vlm, fresh_vlm):
    heldout = heldout_text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=2,
                                   batch_size=2, seq_len=32)
    base = logits_forward(pristine_vlm.vlm)
    weight = _down_proj(fresh_vlm)
    original = weight.detach().clone()
    results = []
    for factor in (1.0, 1.1, 1.5, 2.0, 4.0):
        with torch.no_grad():
            weight.copy_(original * factor)
        results.append(measure_fidelity(base, logits_forward(fresh_vlm.vlm), heldout, measurement_point=POINT,
                                        vocab_chunk=300))
    unchanged, *perturbed = results
    assert unchanged.tokens == 4 * 31
    assert unchanged.kld_max == 0.0 and unchanged.same_top_rate == 1.0 and unchanged.ppl_ratio == 1.0
    klds = [m.kld_mean for m in perturbed]
    assert klds[0] > 0 and all(a < b for a, b in zip(klds, klds[1:], strict=False)), klds
    assert all(m.tokens == unchanged.tokens for m in perturbed)
    assert perturbed[-1].same_top_rate < 1.0
    assert unchanged.data_source == heldout.source and unchanged.data_kind == "text"


def test_image_text_fidelity_counts_only_text_labels(pristine_vlm, fresh_vlm):
    heldout = heldout_image_text_batches(pristine_vlm, num_batches=2, batch_size=2)
    scored = sum(int(((b["labels"][:, 1:] != IGNORE_INDEX) & (b["attention_mask"][:, :-1] != 0)).sum())
                 for b in heldout)
    image_pads = sum(int((b["input_ids"] == pristine_vlm.config.image_token_id).sum()) for b in heldout)
    assert image_pads > 0
    base = logits_forward(pristine_vlm.vlm)
    same = measure_fidelity(base, logits_forward(fresh_vlm.vlm), heldout, measurement_point=POINT)
    assert same.tokens == scored and same.kld_max == 0.0
    assert same.data_kind == "image_text" and same.data_source.startswith("heldout:image_text:generated(seed=4294967296")
    with torch.no_grad():
        _down_proj(fresh_vlm).mul_(2.0)
    moved = measure_fidelity(base, logits_forward(fresh_vlm.vlm), heldout, measurement_point=POINT)
    assert moved.tokens == scored and moved.kld_mean > 1e-3


@pytest.mark.parametrize("kind", ["text", "image_text"])
def test_rows_grouped_into_bigger_forwards_are_the_same_rows_and_measure_the_same(pristine_vlm, fresh_vlm, kind):
    """group_rows merges consecutive single-row batches (fewer forwards: the speed of a measurement on a GPU
    is per-forward overhead); the rows, the tokens scored and the statistics stay the same."""
    if kind == "text":
        heldout = heldout_text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=5, seq_len=32)
    else:
        heldout = heldout_image_text_batches(pristine_vlm, num_batches=5)
    grouped = group_rows(heldout, 2)
    assert [int(b["input_ids"].shape[0]) for b in grouped] == [2, 2, 1]
    real = lambda bs: [row[mask.bool()].tolist() for b in bs for row, mask in zip(b["input_ids"], b["attention_mask"])]
    assert real(grouped) == real(heldout)  # the same rows in the same order, padding aside
    with torch.no_grad():
        _down_proj(fresh_vlm).mul_(1.5)
    base = capture_reference(logits_forward(pristine_vlm.vlm), heldout)
    merged = capture_reference(logits_forward(pristine_vlm.vlm), heldout, rows_per_forward=2)
    assert (len(base.batches), len(merged.batches), base.rows, merged.rows) == (5, 3, 5, 5)
    one = measure_against(base, logits_forward(fresh_vlm.vlm), measurement_point=POINT)
    two = measure_against(merged, logits_forward(fresh_vlm.vlm), measurement_point=POINT)
    assert one.tokens == two.tokens and one.kld_mean > 1e-4
    assert two.kld_mean == pytest.approx(one.kld_mean, rel=0.02) and two.same_top_rate == pytest.approx(one.same_top_rate, abs=0.02)


@pytest.mark.parametrize("kind", ["text", "image_text"])
def test_lazy_logits_measure_as_full_logits_from_a_small_reference(pristine_vlm, fresh_vlm, kind):
    """A reference kept as final hidden states + lm_head (logits made 1024 positions at a time) measures what
    the stored full logits measure, in a fraction of the memory (hidden size / vocabulary).  Control: the
    lazy logits themselves equal the model's logits, and a perturbation they must see moves the KLD."""
    if kind == "text":
        heldout = heldout_text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=4, seq_len=32)
    else:
        heldout = heldout_image_text_batches(pristine_vlm, num_batches=4)
    lazy = capture_reference(hidden_logits_forward(pristine_vlm.vlm), heldout, rows_per_forward=2)
    full = capture_reference(logits_forward(pristine_vlm.vlm), heldout, rows_per_forward=2)
    assert all(isinstance(t, LazyLogits) for t in lazy.logits) and lazy.rows == full.rows == 4
    hidden = pristine_vlm.config.text_config.hidden_size
    assert lazy.nbytes * pristine_vlm.vocab_size == full.nbytes * hidden
    with torch.no_grad():
        # the same GEMM on differently shaped inputs: equal up to bf16 rounding (CPU kernels may pick other blockings)
        torch.testing.assert_close(lazy.logits[0].materialize(), full.logits[0], rtol=2**-6, atol=2**-6)
        _down_proj(fresh_vlm).mul_(1.5)
    by_lazy = measure_against(lazy, hidden_logits_forward(fresh_vlm.vlm), measurement_point=POINT)
    by_full = measure_against(full, logits_forward(fresh_vlm.vlm), measurement_point=POINT)
    assert by_lazy.tokens == by_full.tokens and by_full.kld_mean > 1e-4
    assert by_lazy.kld_mean == pytest.approx(by_full.kld_mean, rel=0.01, abs=1e-6)
    assert by_lazy.same_top_rate == pytest.approx(by_full.same_top_rate, abs=0.02)
    assert by_lazy.nll_base == pytest.approx(by_full.nll_base, rel=1e-3)


def test_lazy_logits_refuse_an_lm_head_changed_after_capture(fresh_vlm):
    """The lm_head is shared with the model, not copied: measuring after it changed raises instead of
    comparing against other logits.  Control: before the change the same logits are made."""
    heldout = heldout_text_batches(fresh_vlm.tokenizer, vocab_size=fresh_vlm.vocab_size, num_batches=1, seq_len=16)
    lazy = capture_reference(hidden_logits_forward(fresh_vlm.vlm), heldout).logits[0]
    positions = torch.arange(4)
    with torch.no_grad():
        assert lazy.rows(positions).shape == (4, fresh_vlm.vocab_size)
        fresh_vlm.vlm.lm_head.weight.mul_(2.0)
        with pytest.raises(ValueError, match="lm_head behind stored hidden states changed"):
            lazy.rows(positions)


def test_shorter_rows_are_right_padded_and_unknown_keys_never_merged():
    row = lambda t: {"input_ids": torch.ones(1, t, dtype=torch.long), "attention_mask": torch.ones(1, t, dtype=torch.long),
                     "labels": torch.ones(1, t, dtype=torch.long)}
    merged, = group_rows([row(8), row(6)], 8)
    assert merged["input_ids"].shape == (2, 8)
    assert merged["attention_mask"][1].tolist() == [1] * 6 + [0, 0] and merged["labels"][1, 6:].tolist() == [IGNORE_INDEX] * 2
    # the control: a key whose rows do not lie along dim 0 (mrope position_ids [3, B, T]) keeps its batches apart
    odd = {**row(8), "position_ids": torch.zeros(3, 1, 8, dtype=torch.long)}
    assert len(group_rows([odd, dict(odd)], 8)) == 2


# ---- held-out data --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_batches,batch_size,seq_len", [(4, 1, 32), (4, 1, 64), (8, 2, 64), (32, 1, 64)],
                         ids=["4x1x32", "4x1x64", "8x2x64", "32x1x64"])
def test_heldout_text_is_disjoint_from_calibration(pristine_vlm, num_batches, batch_size, seq_len):
    tok, vocab = pristine_vlm.tokenizer, pristine_vlm.vocab_size
    settings = dict(vocab_size=vocab, num_batches=num_batches, batch_size=batch_size, seq_len=seq_len)
    calibration = text_batches(tok, **settings)
    heldout = heldout_text_batches(tok, **settings, calibration=calibration)  # refuses on overlap
    assert len(heldout) == num_batches and heldout.batches[0]["input_ids"].shape == (batch_size, seq_len)
    assert heldout.source.startswith("heldout:vlq/data/calibration_corpus.txt(samples ")
    rows = find_overlap(heldout, calibration)
    assert rows.checked == num_batches * batch_size and rows.disjoint
    assert find_overlap(heldout, calibration, window=16).disjoint  # not even 16 consecutive tokens shared
    again = heldout_text_batches(tok, **settings)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(heldout, again, strict=True))


def test_overlapping_split_is_detected(pristine_vlm):
    tok, vocab = pristine_vlm.tokenizer, pristine_vlm.vocab_size
    heldout = heldout_text_batches(tok, vocab_size=vocab, num_batches=4, seq_len=32)
    # a calibration that reads (almost) the whole corpus, cut into rows at other offsets than the held-out
    # rows: it misses only the last total % 32 tokens, so it holds every held-out row but the last
    total = sum(len(tok(s, add_special_tokens=False)["input_ids"]) + 1 for s in load_text_samples())
    everything = text_batches(tok, vocab_size=vocab, num_batches=total // 32, seq_len=32)
    overlap = find_overlap(heldout, everything)
    assert (overlap.checked, overlap.shared, overlap.first_shared) == (4, 3, 0)
    with pytest.raises(CalibrationDataError, match=r"calibration reads samples 0-\d+ and held-out text needs samples"):
        heldout_text_batches(tok, vocab_size=vocab, num_batches=4, seq_len=32, calibration=everything)
    # a "held-out" set that is really the front of the corpus, cut differently, is caught by content
    front = text_batches(tok, vocab_size=vocab, num_batches=2, seq_len=24)
    calibration = text_batches(tok, vocab_size=vocab, num_batches=4, seq_len=32)
    with pytest.raises(CalibrationDataError, match=r"2 of 2 held-out rows occur in it"):
        require_disjoint(front, calibration)


def test_heldout_text_refuses_a_file_too_small_for_both(pristine_vlm, tmp_path):
    tok, vocab = pristine_vlm.tokenizer, pristine_vlm.vocab_size
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n".join(f"Sample {i} says the weights of layer {i} were measured twice." for i in range(12)) + "\n")
    calibration = text_batches(tok, vocab_size=vocab, num_batches=4, seq_len=16, path=corpus)
    ok = heldout_text_batches(tok, vocab_size=vocab, num_batches=2, seq_len=16, path=corpus, calibration=calibration)
    assert ok.source.startswith(f"heldout:{corpus}(samples ")
    # the most held-out rows the file holds reach into the samples calibration read
    total = sum(len(tok(s, add_special_tokens=False)["input_ids"]) + 1 for s in load_text_samples(corpus))
    most = total // 16
    assert heldout_text_batches(tok, vocab_size=vocab, num_batches=most, seq_len=16, path=corpus).num_samples == most
    with pytest.raises(CalibrationDataError, match="calibration reads samples 0-"):
        heldout_text_batches(tok, vocab_size=vocab, num_batches=most, seq_len=16, path=corpus, calibration=calibration)
    with pytest.raises(CalibrationDataError, match=r"were asked"):
        heldout_text_batches(tok, vocab_size=vocab, num_batches=100, seq_len=16, path=corpus)


def test_heldout_images_come_from_a_disjoint_seed_range(pristine_vlm):
    calibration = image_text_calibration(pristine_vlm, "generated", num_batches=2, batch_size=2, seed=0)
    heldout = heldout_image_text_batches(pristine_vlm, num_batches=2, batch_size=2, seed=0, calibration=calibration)
    overlap = find_overlap(heldout, calibration)
    assert overlap.unit == "images" and overlap.checked == 4 and overlap.disjoint
    # negative control: calibration drawn from the held-out seed shares every image and is refused
    clash = image_text_calibration(pristine_vlm, "generated", num_batches=2, batch_size=2, seed=HELDOUT_SEED_BASE)
    assert find_overlap(heldout, clash).shared == 4
    with pytest.raises(CalibrationDataError, match="4 of 4 held-out images occur in it"):
        heldout_image_text_batches(pristine_vlm, num_batches=2, batch_size=2, seed=0, calibration=clash)
    with pytest.raises(CalibrationDataError, match=r"held-out seed must lie in \[0, 2\*\*32\)"):
        heldout_image_text_batches(pristine_vlm, num_batches=1, seed=HELDOUT_SEED_BASE)


def test_fidelity_module_imports_no_heavy_stack():
    import subprocess
    import sys

    code = ("import sys, vlq.fidelity.metrics; "
            "print(sorted(m for m in ('transformers', 'modelopt', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
