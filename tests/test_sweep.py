"""Score once, solve many: every target's decisions equal a fresh search at that target."""

from __future__ import annotations

import json

import pytest

from vlq import pipeline
from vlq.runtime.errors import SchemeError
from vlq.inputs.requests import RunFolder
from vlq.pipeline import fresh_copy
from vlq.search.scheme import Scheme
from vlq.manifest.sweep import decision_agreement

SCHEME = Scheme(formats=("fp8", "int4_awq"), target_bits=7.0, num_calib_steps=2, num_score_steps=2, seq_len=32)
TARGETS = (7.0, 5.0, 4.5, 10.0)


@pytest.fixture(scope="module")
def sweep(pristine_vlm, calibration, tmp_path_factory):
    return pipeline.sweep(pristine_vlm, SCHEME, calibration, TARGETS, RunFolder(tmp_path_factory.mktemp("sweep")))


def test_every_target_exported_and_verified(sweep):
    assert [p.target_bits for p in sweep.points] == list(TARGETS)
    for point in sweep.points:
        assert point.verified and (point.export_path / "config.json").exists()
        assert point.achieved_bits <= point.target_bits + 1e-9


def test_each_target_equals_a_fresh_search(sweep, pristine_vlm, calibration):
    for point in sweep.points[1:3]:
        fresh_manifest = pipeline.search(fresh_copy(pristine_vlm), SCHEME.with_(target_bits=point.target_bits), calibration).manifest
        assert point.manifest.groups == fresh_manifest.groups
        assert point.achieved_bits == pytest.approx(fresh_manifest.achieved_bits)


def test_lower_targets_never_score_better(sweep):
    """A Pareto curve: less bits, more (or equal) total sensitivity."""
    ordered = sorted(sweep.points, key=lambda p: p.target_bits)
    scores = [p.total_score for p in ordered]
    assert all(a >= b - 1e-12 for a, b in zip(scores, scores[1:]))


def test_sweep_json_round_trip(sweep):
    data = json.loads((sweep.points[0].export_path.parent.parent / "sweep.json").read_text())
    assert [p["target_bits"] for p in data["points"]] == list(TARGETS)
    assert data["decisions_s"] >= data["search_s"]
    # measured time counts the BF16 reference too: every target is measured against it
    assert data["fidelity_rows"] == pipeline.FIDELITY_ROWS_TINY and data["reference_s"] > 0
    assert data["measured_s"] == pytest.approx(data["reference_s"] + data["decisions_s"] + sum(p["measure_s"] for p in data["points"]))


def test_fewer_fidelity_rows_measure_every_target_on_those_rows(pristine_vlm, calibration, tmp_path):
    """--fidelity-rows trades precision for speed: each target is measured on exactly that many held-out rows
    per kind (the control: the default sweep above measured FIDELITY_ROWS_TINY)."""
    sweep = pipeline.sweep(pristine_vlm, SCHEME, calibration, (7.0, 5.0), RunFolder(tmp_path), rows=2, export_targets=())
    assert sweep.rows == 2 != pipeline.FIDELITY_ROWS_TINY
    for point in sweep.points:
        assert {m.data_kind for m in point.manifest.fidelity} == {"text", "image_text"}
        text = point.fidelity("text")
        assert text.tokens == 2 * (SCHEME.seq_len - 1), text


def test_agreement_detects_a_different_decision(sweep):
    assert decision_agreement(sweep.points[0].manifest, sweep.points[0].manifest) == 1.0
    assert decision_agreement(sweep.points[0].manifest, sweep.points[1].manifest) < 1.0


def test_infeasible_target_refused_before_search(pristine_vlm, calibration, tmp_path):
    with pytest.raises(SchemeError, match="minimum achievable"):
        pipeline.sweep(pristine_vlm, SCHEME, calibration, (6.0, 3.0), RunFolder(tmp_path))
    assert not (tmp_path / "search_state.pth").exists()
