"""LM-only AutoQuant variants on the tiny model: search once per variant, then sharp read-only checks.

The variants are data: every ``lane: cpu`` entry of ``tests/matrix/search_variants.yaml``.  Each is
searched and exported once per module through
:mod:`vlq.pipeline` (guards and manifest checks included); the tests below assert on what it returned.
Ids are the scheme id ``<formats>-<bits>b-<method>-<strategy>``, e.g. ``fp8+int4_awq-6b-gradient-mask``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from helpers import MatrixError, SearchedExport, search_variants, variant_params
from vlq import pipeline
from vlq.runtime.errors import GuardViolation, ManifestMismatch, SchemeError
from vlq.manifest.manifest import Manifest
from vlq.pipeline import fresh_copy
from vlq.formats.registry import FORMATS, NO_QUANT
from vlq.search.scheme import Scheme
from vlq.checks.registry import CHECK_NAMES
from vlq.search.guards import LmHeadGuard, VisionGuard
from vlq.search.search import search_lm_only


Variant = SearchedExport  # one matrix variant's search and export


def _search_and_export(pristine, calibration, scheme: Scheme, dest) -> Variant:
    searched = pipeline.search(fresh_copy(pristine), scheme, calibration)
    return Variant(searched, pipeline.export(searched, dest))


@pytest.fixture(scope="module")
def variants(pristine_vlm, calibration, tmp_path_factory):
    """``variants(scheme)``: that scheme searched and exported once for the module, on first use."""
    cache: dict[Scheme, Variant] = {}

    def get(scheme: Scheme) -> Variant:
        if scheme not in cache:
            cache[scheme] = _search_and_export(pristine_vlm, calibration, scheme, tmp_path_factory.mktemp(scheme.id) / "checkpoint")
        return cache[scheme]

    return get


@pytest.fixture(params=variant_params("cpu"))
def variant(request, variants) -> Variant:
    return variants(request.param)


def _matrix_scheme(variant_id: str) -> Scheme:
    found = [v.scheme for v in search_variants("cpu") if v.id == variant_id]
    assert found, f"the cpu matrix has no variant {variant_id}"
    return found[0]


def _strategy_pairs() -> list:
    """(extract, mask) scheme pairs of the cpu matrix: variants that differ only in strategy."""
    pairs: dict[tuple, dict] = {}
    for v in search_variants("cpu"):
        key = (v.scheme.with_(strategy="extract"), "+".join(v.scheme.formats), v.scheme.method)
        pairs.setdefault(key, {})[v.scheme.strategy] = v.scheme
    return [pytest.param(pair["extract"], pair["mask"], id=f"{formats}-{method}")
            for (_, formats, method), pair in pairs.items() if set(pair) == {"extract", "mask"}]


def _check(checks, name_part: str):
    found = [c for c in checks if name_part in c.name]
    assert len(found) == 1, f"expected one check named like {name_part!r}, got {[c.name for c in checks]}"
    return found[0]


# ---- the matrix file -----------------------------------------------------------------------------


def test_matrix_ids_are_readable_scheme_ids():
    cpu = search_variants("cpu")
    assert cpu and all(v.id.count("-") == 3 for v in cpu)
    assert "fp8+int4_awq-6b-gradient-extract" in [v.id for v in cpu]
    assert len(_strategy_pairs()) == len(cpu) // 2, "every cpu variant has its other-strategy twin"


def test_matrix_refuses_a_malformed_entry(tmp_path):
    """Negative control for the loader: a typo or a repeated variant is an error, not a silent skip."""
    entry = dict(lane="cpu", formats="fp8", target_bits=12, method="gradient", strategy="extract", num_calib_steps=2,
                 num_score_steps=2, seq_len=32)
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump({"variants": [{**entry, "stesp": 2}]}))
    with pytest.raises(MatrixError, match=r"unknown keys \['stesp'\]"):
        search_variants("cpu", path)
    # the matrix speaks the scheme's own keys: a second dialect (bits for target_bits) is refused
    dialect = {**{k: v for k, v in entry.items() if k != "target_bits"}, "bits": 12}
    path.write_text(yaml.safe_dump({"variants": [dialect]}))
    with pytest.raises(MatrixError, match=r"missing keys \['target_bits'\], unknown keys \['bits'\]"):
        search_variants("cpu", path)
    path.write_text(yaml.safe_dump({"variants": [entry, entry]}))
    with pytest.raises(MatrixError, match=r"ids repeat in lane cpu: \['fp8-12b-gradient-extract'\]"):
        search_variants("cpu", path)
    path.write_text(yaml.safe_dump({"variants": [{**entry, "formats": "fp9"}]}))
    with pytest.raises(SchemeError, match="Unknown format 'fp9'"):
        search_variants("gpu", path)


# ---- guarantees, per variant ---------------------------------------------------------------------


def test_pipeline_ran_every_check(variant):
    names = [c.name for c in variant.searched.checks + variant.exported.checks]
    # the search, manifest and inspect stages' registered checks, in registry order
    assert names == [CHECK_NAMES[k].format(folder="checkpoint") for k in
                     ("vision_guard", "lm_head_guard", "manifest_vs_search", "checkpoint_on_disk", "manifest_vs_checkpoint")]
    assert all(c.ok for c in variant.searched.checks + variant.exported.checks)


def test_no_vision_quantizer_enabled(variant):
    report = VisionGuard(variant.result.loaded).check(variant.result)  # still true after the export
    assert report.ok, report.problems
    assert report.checked == len(variant.result.loaded.vision.linear_names) > 0


def test_lm_head_stays_unquantized(variant):
    report = LmHeadGuard(variant.result.loaded).check(variant.result)
    assert report.ok, report.problems


def test_manifest_matches_searcher_state(variant):
    variant.manifest.verify(state=variant.result.modelopt_state).require()


def test_manifest_matches_live_quantizers(variant):
    # ModelOpt's export rewrites weights in place, so the pipeline compares live quantizers before it
    live = _check(variant.searched.checks, "live quantizers")
    assert live.ok, live.problems
    assert live.checked == len(variant.result.loaded.lm_module_names())


def test_manifest_matches_exported_config(variant):
    variant.manifest.verify(checkpoint=variant.exported.path).require()


def test_manifest_round_trips_through_json(variant, tmp_path):
    path = variant.manifest.save(tmp_path / "manifest.json")
    assert Manifest.load(path) == variant.manifest


def test_export_passes_on_disk_checks(variant):
    report = variant.exported.export.report
    assert report.check.ok, report.check.problems
    quantized = report.quantized_layers()
    assert quantized, "the export quantized no layer at all"
    assert all(not layer.name.startswith("visual.") for layer in quantized)
    assert report.quant_config.algo_for("lm_head") is None


def test_achieved_bits_within_bounds(variant):
    scheme = variant.result.scheme
    bits = variant.result.achieved_bits
    assert scheme.minimum_bits - 1e-9 <= bits <= scheme.target_bits + 1e-9
    assert variant.result.is_satisfied
    assert bits == pytest.approx(variant.manifest.achieved_bits)


def test_achieved_bits_counts_language_model_only(variant):
    # with vision and lm_head cost-excluded (mask) or absent (extract), ModelOpt's own figure is the LM's
    assert variant.result.modelopt_achieved_bits == pytest.approx(variant.result.achieved_bits)


def test_every_lm_linear_has_one_decision(variant):
    loaded = variant.result.loaded
    decided = sorted(m for g in variant.manifest.groups for m in g.members)
    assert decided == sorted(loaded.lm_module_names())


def test_fused_groups_share_one_format(variant):
    group_of = {m: g for g in variant.manifest.groups for m in g.members}
    lm = variant.result.loaded.lm_path
    for i in range(variant.result.loaded.config.text_config.num_hidden_layers):
        attn = group_of[f"{lm}.layers.{i}.self_attn.q_proj"]
        assert {m.rsplit(".", 1)[1] for m in attn.members} == {"q_proj", "k_proj", "v_proj"}
        mlp = group_of[f"{lm}.layers.{i}.mlp.gate_proj"]
        assert {m.rsplit(".", 1)[1] for m in mlp.members} == {"gate_proj", "up_proj"}
    # and on disk: every quantized fused group carries one quant_algo and shared per-tensor scales
    assert variant.exported.export.report.unified_groups == sum(
        1 for g in variant.manifest.groups if len(g.members) > 1 and g.chosen != NO_QUANT
    )


def test_chosen_formats_are_candidates(variant):
    allowed = set(variant.result.scheme.formats) | {NO_QUANT}
    for g in variant.manifest.groups:
        assert g.chosen in allowed
        assert {c.format for c in g.candidates} == allowed


# ---- strategies agree ----------------------------------------------------------------------------


@pytest.mark.parametrize("extract, mask", _strategy_pairs())
def test_extract_and_mask_make_the_same_decisions(variants, extract, mask):
    """Same formats, target, data: the extracted-LM search and the masked-VLM search agree (each pair
    of matrix variants that differ only in strategy, searched once for the module).

    They are comparable because the mask strategy cost-excludes the vision tower and lm_head, so
    both solve the same program over the same LM groups with the same gradients/logits.

    ModelOpt clamps each group's scores to be non-increasing along its compression order
    (``score = min(score, prev_score)`` in its candidate stats), so two formats of equal bits (fp8 and
    int8_sq, 8 each) end with equal score and cost: a tie the two searches may break differently.
    For such format sets a decision is compared as the bits it spends.
    """
    tied = len({FORMATS[f].bits for f in extract.formats}) < len(extract.formats)

    def decided(chosen: str):
        return (16.0 if chosen == NO_QUANT else FORMATS[chosen].bits) if tied else chosen

    decisions = {}
    for strategy, scheme in (("extract", extract), ("mask", mask)):
        result = variants(scheme).result
        decisions[strategy] = {g.name: (decided(g.chosen), tuple(c.format for c in g.candidates)) for g in result.lm_groups()}
        decisions[strategy + "_bits"] = result.achieved_bits
        decisions[strategy + "_scores"] = [c.score for g in result.lm_groups() for c in g.candidates]
    assert decisions["extract"] == decisions["mask"]
    assert decisions["extract_bits"] == pytest.approx(decisions["mask_bits"])
    assert decisions["extract_scores"] == pytest.approx(decisions["mask_scores"], rel=1e-3, abs=1e-9)


# ---- negative controls ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unguarded_search(pristine_vlm, calibration):
    """A mask search that neither disables nor cost-excludes the vision tower and lm_head.

    Text-only calibration never runs the vision tower, so its groups score 0 and the solver
    quantizes them: exactly the failure the guards exist for.
    """
    scheme = Scheme(formats=("fp8",), target_bits=8.0, strategy="mask", num_calib_steps=2, num_score_steps=2, seq_len=32)
    return search_lm_only(fresh_copy(pristine_vlm), scheme, calibration, disable_vision=False, exclude_cost=False)


def test_vision_guard_catches_a_search_that_quantizes_vision(unguarded_search):
    report = VisionGuard(unguarded_search.loaded).check(unguarded_search)
    assert not report.ok
    assert any("model.visual.blocks.0.attn.qkv" in p for p in report.problems)
    assert any("search chose fp8 for vision group" in p for p in report.problems)
    with pytest.raises(GuardViolation, match=r"VisionGuard\) failed"):
        report.require()


def test_lm_head_guard_catches_a_quantized_lm_head(unguarded_search):
    report = LmHeadGuard(unguarded_search.loaded).check(unguarded_search)
    assert not report.ok
    with pytest.raises(GuardViolation, match="lm_head"):
        report.require()


def test_manifest_refuses_state_that_quantizes_outside_the_lm(unguarded_search):
    manifest = Manifest.from_search(unguarded_search)
    report = manifest.verify(state=unguarded_search.modelopt_state)
    assert any("outside the language model" in m for m in report.problems)


def test_vision_guard_catches_changed_vision_weights(fresh_vlm):
    import torch

    guard = VisionGuard(fresh_vlm)
    assert guard.check().ok
    with torch.no_grad():
        fresh_vlm.vlm.model.visual.blocks[0].mlp.down_proj.weight[0, 0] += 1
    report = guard.check()
    assert not report.ok and "vision weights changed" in report.problems[0]


@pytest.fixture(scope="module")
def fp8_extract(variants) -> Variant:
    """The matrix's fp8+int4_awq gradient/extract variant (read-only: tampering makes new manifests)."""
    return variants(_matrix_scheme("fp8+int4_awq-6b-gradient-extract"))


def _tampered(manifest: Manifest) -> Manifest:
    """Flip the first group's choice to another candidate."""
    first = manifest.groups[0]
    other = next(c.format for c in first.candidates if c.format != first.chosen)
    return manifest.with_groups([dataclasses.replace(first, chosen=other), *manifest.groups[1:]])


def test_tampered_manifest_fails_against_state(fp8_extract):
    bad = _tampered(fp8_extract.manifest)
    with pytest.raises(ManifestMismatch, match="chosen"):
        bad.verify(state=fp8_extract.result.modelopt_state).require()


def test_tampered_manifest_fails_against_checkpoint(fp8_extract):
    bad = _tampered(fp8_extract.manifest)
    report = bad.verify(checkpoint=fp8_extract.exported.path)
    members = bad.groups[0].members
    assert len(report.problems) == len(members)
    assert all(any(m in msg for m in members) for msg in report.problems)


def test_tampered_bits_fail_self_consistency(fp8_extract):
    bad = dataclasses.replace(fp8_extract.manifest, achieved_bits=fp8_extract.manifest.achieved_bits - 0.5)
    with pytest.raises(ManifestMismatch, match="achieved_bits"):
        bad.verify(state=fp8_extract.result.modelopt_state).require()


def test_tampered_manifest_fails_against_live_model(pristine_vlm, calibration):
    # its own search: the matrix's models were exported, which rewrites their weights in place
    scheme = Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=2, num_score_steps=2, seq_len=32)
    searched = pipeline.search(fresh_copy(pristine_vlm), scheme, calibration)  # verified against the live model
    assert searched.manifest.verify(model=searched.loaded.vlm).ok
    report = _tampered(searched.manifest).verify(model=searched.loaded.vlm)
    assert not report.ok and "live quantizers" in report.problems[0]


# ---- refused before calibration -------------------------------------------------------------------


def test_infeasible_bits_refused_with_minimum():
    with pytest.raises(SchemeError, match=r"minimum achievable over the language model is 4\.0000"):
        Scheme(formats=("fp8", "int4_awq"), target_bits=3.5)


@pytest.mark.parametrize("bits", [0, -1, 16.5, float("nan")])
def test_bits_outside_range_refused(bits):
    with pytest.raises(SchemeError, match=r"target_bits must be in \(0, 16\]"):
        Scheme(formats=("fp8",), target_bits=bits)


def test_counting_vision_at_16_bits_makes_a_target_infeasible(fresh_vlm, calibration):
    """Why mask must cost-exclude: disabled-but-counted vision layers push the minimum above 8."""
    scheme = Scheme(formats=("fp8",), target_bits=8.0, strategy="mask", num_calib_steps=2, num_score_steps=2, seq_len=32)
    with pytest.raises(SchemeError, match="minimum achievable effective bits is") as excinfo:
        search_lm_only(fresh_vlm, scheme, calibration, exclude_cost=False)
    minimum = float(str(excinfo.value).split("minimum achievable effective bits is ")[1].split()[0].rstrip("."))
    assert minimum > 8.0


def test_cuda_format_refused_on_cpu(fresh_vlm, calibration):
    scheme = Scheme(formats=("fp8", "nvfp4"), target_bits=6.0)
    with pytest.raises(SchemeError, match="nvfp4 need a CUDA GPU"):
        pipeline.search(fresh_vlm, scheme, calibration)


def test_second_search_on_quantized_model_refused(fresh_vlm, calibration):
    scheme = Scheme(formats=("fp8",), target_bits=8.0, num_calib_steps=1, num_score_steps=1, seq_len=32)
    pipeline.search(fresh_vlm, scheme, calibration)
    with pytest.raises(SchemeError, match="already carries ModelOpt quantizers"):
        pipeline.search(fresh_vlm, scheme, calibration)


def test_format_table_is_complete():
    """Every module of the catalog registers one format under its own name, and nothing else is registered."""
    import pkgutil

    from vlq.formats import catalog

    assert set(FORMATS) == {m.name for m in pkgutil.iter_modules(catalog.__path__)}


def test_in_place_redecisions_refused_where_a_format_folds_weights(variants):
    """AWQ folds its smoothing into the weights of the groups that chose it, so switching decisions in
    place would measure a model that is not BF16 where it says "none" (the fp8-only counterpart, which
    switches and switches back exactly, is in tests/test_fidelity_search.py)."""
    from vlq.search.search import apply_decisions

    awq = variants(_matrix_scheme("fp8+int4_awq-6b-gradient-extract"))
    with pytest.raises(SchemeError, match="folded smoothing scales into the weights"):
        apply_decisions(awq.result, awq.result.lm_groups())


def test_search_leaves_no_gradient_on_an_untied_lm_head(tmp_path):
    """The extracted LM is searched; the parent's untied lm_head gets no weight gradient (compute and memory
    ModelOpt never asked for) and keeps requires_grad afterwards.  Negative control: one plain backward
    through the same model does fill that gradient, so the check can see it."""
    from vlq import pipeline
    from vlq.data.calibration import text_batches
    from vlq.data.tiny import build_tiny_checkpoint
    from vlq.data.models import load_checkpoint
    from vlq.search.losses import causal_lm_loss
    from vlq.search.forward import make_forward_step

    loaded = load_checkpoint(build_tiny_checkpoint(tmp_path / "untied", tie_word_embeddings=False))
    assert not loaded.tied_lm_head
    cal = text_batches(loaded.tokenizer, vocab_size=loaded.vocab_size, num_batches=2, seq_len=32)
    searched = pipeline.fresh_copy(loaded)
    pipeline.search(searched, Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=2, num_score_steps=2, seq_len=32), cal)
    assert searched.lm_head.weight.grad is None and searched.lm_head.weight.requires_grad

    control = pipeline.fresh_copy(loaded)
    batch = cal.batches[0]
    causal_lm_loss(make_forward_step(control, "extract")(control.language_model, batch), batch).backward()
    assert control.lm_head.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# Gradient scoring's loss, chunk by chunk (vlq.search.search.chunked_causal_lm_loss)
# ------------------------------------------------------------------------------------------------


def _trained_text_batch(trained_vlm, *, batch_size=2, seq_len=24):
    from vlq.data.calibration import IGNORE_INDEX, text_batches

    cal = text_batches(trained_vlm.tokenizer, vocab_size=trained_vlm.vocab_size, num_batches=1,
                       batch_size=batch_size, seq_len=seq_len)
    batch = dict(cal.batches[0])
    labels = batch["labels"].clone()
    labels[0, 5:9] = IGNORE_INDEX  # ignored positions inside a chunk and across a chunk edge
    batch["labels"] = labels
    return batch


def _hidden_and_lm_head(trained_vlm, batch):
    import torch

    from vlq.search.forward import make_forward_step

    with torch.no_grad():
        hidden = make_forward_step(trained_vlm, "extract", logits=False)(trained_vlm.language_model, batch)
    lm_head = copy.deepcopy(trained_vlm.lm_head).requires_grad_(False)  # the read-only model stays as it is
    return hidden.detach().requires_grad_(True), lm_head


def test_chunked_loss_equals_full_logits_loss(trained_vlm):
    """Gradient scoring's chunked loss has the full-logits loss's value and gradient on the hidden states,
    with chunks that split rows mid-way and ignored labels.  Control: the same loss read one label
    position off (what a misaligned chunk would compute) differs, so the comparison can fail."""
    import torch

    from vlq.search.losses import causal_lm_loss, chunked_causal_lm_loss

    batch = _trained_text_batch(trained_vlm)
    hidden, lm_head = _hidden_and_lm_head(trained_vlm, batch)
    hidden, lm_head = hidden.float().detach().requires_grad_(True), lm_head.float()
    with torch.autocast("cpu", enabled=False):
        full = causal_lm_loss(lm_head(hidden), batch)
        (full_grad,) = torch.autograd.grad(full, hidden)
        for chunk in (1, 7, 23, 10_000):
            chunked = chunked_causal_lm_loss(hidden, lm_head, batch, chunk)
            (chunked_grad,) = torch.autograd.grad(chunked, hidden)
            torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-4, atol=1e-7)
        shifted = dict(batch, labels=batch["labels"].roll(1, dims=1))
        assert not torch.allclose(chunked_causal_lm_loss(hidden, lm_head, shifted, 7), full, rtol=1e-3)


def test_chunked_loss_keeps_no_whole_batch_logits_for_backward(trained_vlm):
    """The largest tensor autograd keeps for backward is smaller than one chunk's fp32 logits.  Control:
    the full-logits loss keeps the whole batch's fp32 log-softmax (tokens x vocab x 4 bytes)."""
    import torch

    from vlq.search.losses import causal_lm_loss, chunked_causal_lm_loss

    batch = _trained_text_batch(trained_vlm, batch_size=4, seq_len=32)
    hidden, lm_head = _hidden_and_lm_head(trained_vlm, batch)  # bf16, as the search runs them
    tokens = hidden.shape[0] * (hidden.shape[1] - 1)
    chunk = 16

    def largest_saved(loss_of):
        sizes = [0]

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of()
        loss.backward()
        return max(sizes)

    chunked = largest_saved(lambda: chunked_causal_lm_loss(hidden, lm_head, batch, chunk))
    full = largest_saved(lambda: causal_lm_loss(lm_head(hidden), batch))
    vocab_fp32 = trained_vlm.vocab_size * 4
    assert chunked < chunk * vocab_fp32
    assert full >= tokens * vocab_fp32


def test_search_with_chunked_loss_decides_as_with_full_logits(trained_vlm):
    """The search's default (chunked loss) and the full-logits loss ModelOpt's examples use: the same
    decisions and the same scores to float summation order, on the trained tiny model."""
    from vlq.data.calibration import text_batches

    scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=6.0, num_calib_steps=2, num_score_steps=2, seq_len=32)
    cal = text_batches(trained_vlm.tokenizer, vocab_size=trained_vlm.vocab_size, num_batches=2, batch_size=2, seq_len=32)
    chunked = search_lm_only(fresh_copy(trained_vlm), scheme, cal, loss_chunk_tokens=24)
    full = search_lm_only(fresh_copy(trained_vlm), scheme, cal, loss_chunk_tokens=None)
    assert [(g.name, g.chosen) for g in chunked.groups] == [(g.name, g.chosen) for g in full.groups]
    for a, b in zip(chunked.groups, full.groups):
        assert [c.format for c in a.candidates] == [c.format for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], rel=1e-3, abs=1e-9)
    assert any(c.score > 0 for g in full.groups for c in g.candidates)  # scores that could differ


def test_only_extract_can_hand_hidden_states_to_the_chunked_loss(trained_vlm):
    """``mask`` runs the VLM's own lm_head: asking it for hidden states is refused, not silently ignored.
    Control: ``extract`` returns the hidden size, not the vocabulary."""
    from vlq.search.forward import make_forward_step

    with pytest.raises(ValueError, match="Only the extract strategy"):
        make_forward_step(trained_vlm, "mask", logits=False)
    batch = _trained_text_batch(trained_vlm, batch_size=1, seq_len=8)
    hidden, _ = _hidden_and_lm_head(trained_vlm, batch)
    assert hidden.shape[-1] == trained_vlm.config.text_config.hidden_size != trained_vlm.vocab_size


def _amax_by_quantizer(model) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: m.amax.float().clone() for name, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and m.is_enabled and getattr(m, "amax", None) is not None}


@pytest.fixture(scope="module")
def calibration_batching(trained_vlm):
    """fp8+int8_sq (max and SmoothQuant calibration) searched on the trained tiny model with its 4
    calibration batches merged into one forward per format (the default) and one forward per batch."""
    from vlq.search import calibration_feed
    from vlq.data.calibration import text_batches

    scheme = Scheme(formats=("fp8", "int8_sq"), target_bits=10.0, num_calib_steps=4, num_score_steps=2, seq_len=32)
    cal = text_batches(trained_vlm.tokenizer, vocab_size=trained_vlm.vocab_size, num_batches=4, batch_size=2, seq_len=32)
    merged = search_lm_only(fresh_copy(trained_vlm), scheme, cal)
    saved = calibration_feed.CALIBRATION_TOKENS_PER_FORWARD
    calibration_feed.CALIBRATION_TOKENS_PER_FORWARD = 1  # one batch per forward, as ModelOpt's examples calibrate
    try:
        per_batch = search_lm_only(fresh_copy(trained_vlm), scheme, cal)
    finally:
        calibration_feed.CALIBRATION_TOKENS_PER_FORWARD = saved
    fewer_rows = search_lm_only(fresh_copy(trained_vlm), scheme.with_(num_calib_steps=1), cal)
    return scheme, cal, merged, per_batch, fewer_rows


def test_calibration_merges_batches_into_fewer_forwards_with_the_same_amax(calibration_batching):
    """The same 8 calibration rows in one forward per format instead of four: every enabled quantizer's
    amax and every decision as with one forward per batch.  Control: calibrating on the first batch
    only moves some amax, so the comparison can fail."""
    import torch

    scheme, _, merged, per_batch, fewer_rows = calibration_batching
    assert merged.calibration_calls == len(scheme.formats) == per_batch.calibration_calls // 4
    assert [(g.name, g.chosen) for g in merged.groups] == [(g.name, g.chosen) for g in per_batch.groups]
    merged_amax, per_batch_amax = _amax_by_quantizer(merged.searched_model), _amax_by_quantizer(per_batch.searched_model)
    assert merged_amax and merged_amax.keys() == per_batch_amax.keys()
    for name, amax in merged_amax.items():
        torch.testing.assert_close(amax, per_batch_amax[name], rtol=1e-2, atol=0, msg=name)
    fewer = _amax_by_quantizer(fewer_rows.searched_model)
    assert any(not torch.allclose(fewer[n], a, rtol=1e-2, atol=0) for n, a in merged_amax.items() if n in fewer)


def test_awq_keeps_one_calibration_forward_per_batch(calibration_batching):
    """AWQ searches its scales per batch (and ModelOpt feeds it a quarter of the steps), so a scheme with
    an AWQ format is calibrated batch by batch.  Control: the same batches without AWQ are merged."""
    from vlq.search.calibration_feed import calibration_forwards

    scheme, cal, *_ = calibration_batching
    batches = list(cal.batches)
    assert calibration_forwards(scheme.with_(formats=("fp8", "int4_awq")), batches) == batches[: scheme.num_calib_steps]
    merged = calibration_forwards(scheme, batches)
    assert len(merged) == 1 and merged[0]["input_ids"].shape[0] == sum(b["input_ids"].shape[0] for b in batches)


def test_search_leaves_the_garbage_collector_unfrozen(trained_vlm, calibration_batching, monkeypatch):
    """The search freezes older objects out of ModelOpt's gc.collect() and unfreezes them afterwards,
    also when a scoring step fails.  Control: a frozen collector reports frozen objects."""
    import gc

    from vlq.runtime.files import KILL_ENV, KILL_SIGNAL_ENV

    scheme, cal, *_ = calibration_batching
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv(KILL_ENV, "score-step")
    monkeypatch.setenv(KILL_SIGNAL_ENV, "RAISE")
    with pytest.raises(RuntimeError, match="fault injected at kill point 'score-step'"):
        search_lm_only(fresh_copy(trained_vlm), scheme, cal)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_calibration_skips_the_lm_head_under_extract(trained_vlm):
    """Calibration discards its forwards' output and the lm_head is never searched under ``extract``, so
    calibration forwards stop at the hidden states.  Control: scoring does run the lm_head."""
    from vlq.data.calibration import text_batches
    from vlq.search.calibration_feed import calibrating

    calls = {"calibration": 0, "scoring": 0}

    def count(module, args, output):
        calls["calibration" if calibrating() else "scoring"] += 1

    loaded = fresh_copy(trained_vlm)
    handle = loaded.lm_head.register_forward_hook(count)
    try:
        cal = text_batches(trained_vlm.tokenizer, vocab_size=trained_vlm.vocab_size, num_batches=2, batch_size=2, seq_len=32)
        search_lm_only(loaded, Scheme(formats=("fp8",), target_bits=10.0, num_calib_steps=2, num_score_steps=2, seq_len=32), cal)
    finally:
        handle.remove()
    assert calls["calibration"] == 0 and calls["scoring"] > 0


# ---- the CUDA-extension phase ---------------------------------------------------------------------


def test_phases_add_up_with_no_extension_phase_on_cpu(variant):
    """On CPU ModelOpt's fake quantization runs eagerly: the extension phase is 0 and unnamed, and the
    phases add up to the total.  Control: the same result with a 52 s extension build names it in the
    timing line and counts it in the total, while calibrate stays what it was."""
    from vlq.runtime.cuda_extensions import FP8_EXT, ExtensionLoad
    from vlq.search.results import timing_summary

    result = variant.result
    times = result.times
    assert not result.extensions.applicable and result.extensions.phase == "none" and times.extension_build_s == 0
    assert times.total_s == pytest.approx(times.calibrate_s + times.score_s + times.solve_s) == times.searching_s
    assert result.extensions_loaded_while_searching == ()
    assert "extension" not in timing_summary(result) and f"calibrate {times.calibrate_s:.1f}s" in timing_summary(result)

    built = dataclasses.replace(
        result, times=dataclasses.replace(times, extension_build_s=52.0),
        extensions=ExtensionLoad(device="cuda", needed=(FP8_EXT,), loaded=((FP8_EXT, 52.0),), seconds=52.0))
    line = timing_summary(built)
    assert built.extensions.phase == "extension build" and "extension build 52.0s" in line
    assert f"calibrate {times.calibrate_s:.1f}s" in line and built.times.total_s == pytest.approx(times.searching_s + 52.0)


# What each format calls on CUDA (ModelOpt 0.47's tensor_quant dispatch); the second set is for a GPU
# without ModelOpt's Triton FP4 kernel, where NVFP4's dynamic blocks go to the MX extension.
def _extensions_by_format() -> dict[str, tuple[set, set]]:
    """tests/matrix/formats.yaml ``cuda_extensions``: format -> (extensions with Triton FP4, without)."""
    import yaml

    table = yaml.safe_load((Path(__file__).parent / "matrix" / "formats.yaml").read_text())["cuda_extensions"]
    return {name: (set(e["with_triton"]), set(e["without_triton"])) for name, e in table.items()}


_EXTENSIONS_BY_FORMAT = _extensions_by_format()


def test_each_format_names_the_cuda_extensions_it_calls():
    """Read from the formats' ModelOpt configs; every name is one of ModelOpt's loaders.  Control: a
    format whose quantizers are all disabled calls none."""
    import inspect

    from modelopt.torch.quantization import extensions

    from vlq.runtime.cuda_extensions import LOADERS, format_extensions, quantizer_extensions

    assert set(_EXTENSIONS_BY_FORMAT) == set(FORMATS)
    for name, (with_triton, without_triton) in _EXTENSIONS_BY_FORMAT.items():
        assert set(format_extensions([FORMATS[name]], triton_fp4=True)) == with_triton, name
        assert set(format_extensions([FORMATS[name]], triton_fp4=False)) == without_triton, name
    assert format_extensions([FORMATS["mxfp8"], FORMATS["fp8"]], triton_fp4=True) == ("modelopt_cuda_ext_fp8", "modelopt_cuda_ext_mx")
    for ext, loader in LOADERS.items():
        assert f'name="{ext}"' in inspect.getsource(getattr(extensions, loader)), (ext, loader)
    weight, input_ = FORMATS["fp8"].quantizer_cfgs()
    assert quantizer_extensions(weight, triton_fp4=True) == {"modelopt_cuda_ext_fp8"}
    assert quantizer_extensions({**weight, "enable": False}, triton_fp4=True) == set()
    assert quantizer_extensions(None, triton_fp4=True) == set()


def test_extension_phase_is_not_applicable_on_cpu():
    from vlq.runtime.cuda_extensions import load_for_formats, loaded_in_process

    before = loaded_in_process()
    load = load_for_formats(Scheme(formats=("fp8", "int4_awq")).format_objects, "cpu")
    assert not load.applicable and load.phase == "none" and load.seconds == 0 and load.needed == ()
    assert load.summary() == "no CUDA extensions on cpu" and loaded_in_process() == before


def test_a_failed_extension_load_leaves_modelopt_to_retry_lazily():
    """Asking for CUDA where there is none makes ModelOpt's real loader fail: the phase records the failure
    and drops the loader's cached None, so ModelOpt's own first call tries again as it would have without
    the phase.  Control: ModelOpt's loader called directly caches the failure."""
    from modelopt.torch.quantization import extensions

    from vlq.runtime.cuda_extensions import FP8_EXT, load_for_formats

    import torch

    if torch.cuda.is_available():
        pytest.skip(f"needs a machine without CUDA, found {torch.cuda.get_device_name(0)}")
    loader = extensions.get_cuda_ext_fp8
    assert not hasattr(loader, "extension")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        load = load_for_formats([FORMATS["fp8"]], "cuda")
    assert load.needed == (FP8_EXT,) and load.loaded == () and [n for n, _ in load.failed] == [FP8_EXT]
    assert "retries lazily" in load.summary()
    assert not hasattr(loader, "extension")
    try:
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert loader(raise_if_failed=False) is None
        assert hasattr(loader, "extension")
    finally:
        if hasattr(loader, "extension"):
            del loader.extension
