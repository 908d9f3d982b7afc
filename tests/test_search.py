"""LM-only AutoQuant variants on the tiny model: search once per variant, then sharp read-only checks.

Variant ids follow ``<formats>-<bits>b-<method>-<strategy>``, e.g. ``fp8+int4_awq-6b-gradient-mask``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlq.errors import GuardViolation, ManifestMismatch, SchemeError
from vlq.export import ExportResult, export_checkpoint
from vlq.manifest import Manifest
from vlq.schemes import FORMATS, NO_QUANT, Scheme
from vlq.search import LmHeadGuard, SearchResult, VisionGuard, search_lm_only

FORMAT_SETS = {
    "fp8": (("fp8",), 12.0),  # FP8 or BF16 per group: a real choice at 12 bits
    "fp8+int4_awq": (("fp8", "int4_awq"), 6.0),
    "fp8+w4a8_awq": (("fp8", "w4a8_awq"), 6.0),
    "fp8+int8_sq": (("fp8", "int8_sq"), 8.0),
}
MATRIX = [
    Scheme(formats=formats, target_bits=bits, method=method, strategy=strategy, num_calib_steps=2, num_score_steps=2, seq_len=32)
    for formats, bits in FORMAT_SETS.values()
    for method in ("gradient", "kl_div")
    for strategy in ("extract", "mask")
]


@dataclass
class Searched:
    result: SearchResult
    manifest: Manifest
    live_report: object
    export: ExportResult


def _search_and_export(pristine, calibration, scheme: Scheme, tmp_path: Path) -> Searched:
    loaded = copy.deepcopy(pristine)
    result = search_lm_only(loaded, scheme, calibration)
    manifest = Manifest.from_search(result)
    # ModelOpt's export rewrites weights in place, so live quantizers are compared before it.
    live = manifest.verify(model=loaded.vlm)
    export = export_checkpoint(loaded, tmp_path / "export")
    return Searched(result, manifest, live, export)


@pytest.fixture(scope="module", params=MATRIX, ids=lambda s: s.id)
def searched(request, pristine_vlm, calibration, tmp_path_factory) -> Searched:
    return _search_and_export(pristine_vlm, calibration, request.param, tmp_path_factory.mktemp(request.param.id))


# ---- guarantees, per variant ---------------------------------------------------------------------


def test_no_vision_quantizer_enabled(searched):
    report = VisionGuard(searched.result.loaded).check(searched.result)
    assert report.ok, report.problems
    assert report.checked == len(searched.result.loaded.vision.linear_names) > 0


def test_lm_head_stays_unquantized(searched):
    report = LmHeadGuard(searched.result.loaded).check(searched.result)
    assert report.ok, report.problems


def test_manifest_matches_searcher_state(searched):
    searched.manifest.verify(state=searched.result.modelopt_state).require()


def test_manifest_matches_live_quantizers(searched):
    assert searched.live_report.ok, searched.live_report.problems


def test_manifest_matches_exported_config(searched):
    searched.manifest.verify(checkpoint=searched.export.path).require()


def test_manifest_round_trips_through_json(searched, tmp_path):
    path = searched.manifest.save(tmp_path / "manifest.json")
    assert Manifest.load(path) == searched.manifest


def test_export_passes_on_disk_checks(searched):
    report = searched.export.report
    assert report.ok, report.problems
    quantized = report.quantized_layers()
    assert quantized, "the export quantized no layer at all"
    assert all(not l.name.startswith("visual.") for l in quantized)
    assert report.quant_config.algo_for("lm_head") is None


def test_effective_bits_within_bounds(searched):
    scheme = searched.result.scheme
    bits = searched.result.achieved_bits
    assert scheme.minimum_bits - 1e-9 <= bits <= scheme.target_bits + 1e-9
    assert searched.result.is_satisfied
    assert bits == pytest.approx(searched.manifest.achieved_bits)


def test_effective_bits_counts_language_model_only(searched):
    # with vision and lm_head cost-excluded (mask) or absent (extract), ModelOpt's own figure is the LM's
    assert searched.result.modelopt_achieved_bits == pytest.approx(searched.result.achieved_bits)


def test_every_lm_linear_has_one_decision(searched):
    loaded = searched.result.loaded
    decided = sorted(m for g in searched.manifest.groups for m in g.members)
    assert decided == sorted(loaded.lm_module_names())


def test_fused_groups_share_one_format(searched):
    group_of = {m: g for g in searched.manifest.groups for m in g.members}
    lm = searched.result.loaded.lm_path
    for i in range(searched.result.loaded.config.text_config.num_hidden_layers):
        attn = group_of[f"{lm}.layers.{i}.self_attn.q_proj"]
        assert {m.rsplit(".", 1)[1] for m in attn.members} == {"q_proj", "k_proj", "v_proj"}
        mlp = group_of[f"{lm}.layers.{i}.mlp.gate_proj"]
        assert {m.rsplit(".", 1)[1] for m in mlp.members} == {"gate_proj", "up_proj"}
    # and on disk: every quantized fused group carries one quant_algo and shared per-tensor scales
    assert searched.export.report.unified_groups == sum(
        1 for g in searched.manifest.groups if len(g.members) > 1 and g.chosen != NO_QUANT
    )


def test_chosen_formats_are_candidates(searched):
    allowed = set(searched.result.scheme.formats) | {NO_QUANT}
    for g in searched.manifest.groups:
        assert g.chosen in allowed
        assert {c.format for c in g.candidates} == allowed


# ---- strategies agree ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_extract_and_mask_make_the_same_decisions(pristine_vlm, calibration, method):
    """Same formats, target, data: the extracted-LM search and the masked-VLM search agree.

    They are comparable because the mask strategy cost-excludes the vision tower and lm_head, so
    both solve the same program over the same LM groups with the same gradients/logits.
    """
    decisions = {}
    for strategy in ("extract", "mask"):
        scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=6.0, method=method, strategy=strategy,
                        num_calib_steps=2, num_score_steps=2, seq_len=32)
        result = search_lm_only(copy.deepcopy(pristine_vlm), scheme, calibration)
        decisions[strategy] = {g.name: (g.chosen, tuple(c.format for c in g.candidates)) for g in result.lm_groups()}
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
    return search_lm_only(copy.deepcopy(pristine_vlm), scheme, calibration, disable_vision=False, exclude_cost=False)


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
def fp8_extract(pristine_vlm, calibration, tmp_path_factory) -> Searched:
    scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=6.0, strategy="extract", num_calib_steps=2, num_score_steps=2, seq_len=32)
    return _search_and_export(pristine_vlm, calibration, scheme, tmp_path_factory.mktemp("tamper"))


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
    report = bad.verify(checkpoint=fp8_extract.export.path)
    members = bad.groups[0].members
    assert len(report.problems) == len(members)
    assert all(any(m in msg for m in members) for msg in report.problems)


def test_tampered_bits_fail_self_consistency(fp8_extract):
    bad = dataclasses.replace(fp8_extract.manifest, effective_bits=fp8_extract.manifest.achieved_bits - 0.5)
    with pytest.raises(ManifestMismatch, match="effective_bits"):
        bad.verify(state=fp8_extract.result.modelopt_state).require()


def test_tampered_manifest_fails_against_live_model(pristine_vlm, calibration):
    loaded = copy.deepcopy(pristine_vlm)
    scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=6.0, num_calib_steps=2, num_score_steps=2, seq_len=32)
    manifest = Manifest.from_search(search_lm_only(loaded, scheme, calibration))
    assert manifest.verify(model=loaded.vlm).ok
    report = _tampered(manifest).verify(model=loaded.vlm)
    assert not report.ok and "live quantizers" in report.problems[0]


# ---- refused before calibration -------------------------------------------------------------------


def test_infeasible_bits_refused_with_minimum():
    with pytest.raises(SchemeError, match=r"minimum achievable over the language model is 4\.0000"):
        Scheme(formats=("fp8", "int4_awq"), target_bits=3.5)


@pytest.mark.parametrize("bits", [0, -1, 16.5, float("nan")])
def test_bits_outside_range_refused(bits):
    with pytest.raises(SchemeError, match=r"effective_bits must be in \(0, 16\]"):
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
        search_lm_only(fresh_vlm, scheme, calibration)


def test_second_search_on_quantized_model_refused(fresh_vlm, calibration):
    scheme = Scheme(formats=("fp8",), target_bits=8.0, num_calib_steps=1, num_score_steps=1, seq_len=32)
    search_lm_only(fresh_vlm, scheme, calibration)
    with pytest.raises(SchemeError, match="already carries ModelOpt quantizers"):
        search_lm_only(fresh_vlm, scheme, calibration)


def test_format_table_is_complete():
    assert set(FORMATS) == {"fp8", "int4_awq", "w4a8_awq", "int8_sq", "nvfp4", "w4a16_nvfp4", "mxfp8"}
