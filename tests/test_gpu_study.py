"""`pytest -m gpu`: ``vlq study`` on the full-size 3B architecture (random weights: timing and memory, not fidelity).

fp8+nvfp4 (144 groups x 2 formats) and fp8+w4a16_nvfp4 at two targets with the oracle, the data-free score and the baselines, on a
few held-out rows: every point meets its target and is measured on text and image+text, the oracle scores every
(group, format) pair, its shared work reproduces a full forward on the GPU (bf16 tolerance) and gives exactly 0
with nothing quantized.  The time and memory a study costs are printed here and recorded by
``benchmarks/test_study_benchmarks.py`` (the goals: ablation <= 30 s, a default study <= 4 minutes).
"""

from __future__ import annotations

import dataclasses

import pytest

from vlq import pipeline
from vlq.fidelity.metrics import hidden_logits_forward
from vlq.fidelity.reference import capture_reference, measure_against
from vlq.formats.registry import NO_QUANT
from vlq.inputs.requests import RunFolder
from vlq.search.scheme import Scheme
from vlq.search.search import apply_decisions
from vlq.study.layerwise import capture_layer_inputs, kld_from_layer
from vlq.study.strategy import decoder_layer_index, with_choices

pytestmark = pytest.mark.gpu

SCHEME = Scheme(formats=("fp8", "nvfp4"), target_bits=8.0, num_calib_steps=4, num_score_steps=4, seq_len=512)
TARGETS = (8.0, 6.0)
FORMAT_SETS = (("fp8", "nvfp4"), ("fp8", "w4a16_nvfp4"))
STRATEGIES = ("gradient", "ablation", "weight_error", "uniform", "position", "random", "inverted")


@pytest.fixture(scope="module")
def calibration(gpu_pristine_vlm):
    return pipeline.calibrate(gpu_pristine_vlm, SCHEME)


@pytest.fixture(scope="module")
def study_result(gpu_pristine_vlm, calibration, tmp_path_factory):
    import torch

    result = pipeline.study(gpu_pristine_vlm, SCHEME, calibration, TARGETS, RunFolder(tmp_path_factory.mktemp("study")),
                            strategies=STRATEGIES, format_sets=FORMAT_SETS, random_seeds=2, rows=4, scoring_rows=8)
    for studied in result.sets:
        print(f"[gpu study {studied.label}]", {c.strategy: (round(c.seconds, 2), c.peak_bytes) for c in studied.costs}, flush=True)
    print(f"[gpu study] total {result.total_s:.1f}s", flush=True)
    torch.cuda.empty_cache()
    return result


def test_each_format_set_gets_its_own_frontier(study_result):
    assert [s.formats for s in study_result.sets] == list(FORMAT_SETS)
    second = {p.strategy for p in study_result.sets[1].points}
    assert "uniform:w4a16_nvfp4" in second and "uniform:nvfp4" not in second
    first, other = (next(p for p in s.points if p.strategy == "gradient" and p.target_bits == 6.0) for s in study_result.sets)
    assert set(first.chosen.values()) <= {"fp8", "nvfp4", NO_QUANT} and set(other.chosen.values()) <= {"fp8", "w4a16_nvfp4", NO_QUANT}


@pytest.fixture(scope="module")
def studied(study_result):
    return study_result.sets[0]


def test_study_on_the_3b_shape_measures_every_strategy(studied):
    assert len(studied.scores["ablation"]) == 144
    pairs = [v for s in studied.scores["ablation"].values() for v in s.values()]
    assert len(pairs) == 288 and all(v > 0 and v == v for v in pairs)
    strategies = {p.strategy for p in studied.points}
    assert strategies == {"gradient", "ablation", "weight_error", "uniform:fp8", "uniform:nvfp4", "position", "random",
                          "inverted"}
    for p in studied.points:
        assert p.metrics("text") is not None and p.metrics("image_text") is not None
        if p.target_bits is not None:
            assert p.achieved_bits <= p.target_bits + 1e-9, p
    uniform = {p.strategy: p.achieved_bits for p in studied.points if p.target_bits is None}
    assert uniform["uniform:fp8"] == pytest.approx(8.0) and uniform["uniform:nvfp4"] < 5.0
    assert {c.strategy for c in studied.costs} >= {"gradient", "ablation", "weight_error"}
    assert all(c.peak_bytes and c.memory == "gpu" for c in studied.costs if c.strategy in ("gradient", "ablation"))


def test_oracle_shared_work_on_the_gpu(gpu_pristine_vlm, calibration):
    from vlq.inputs.requests import DataRequest
    from vlq.pipeline.studies import scoring_batches
    from vlq.study.strategy import StudyContext

    evaluation = pipeline.fidelity_references(gpu_pristine_vlm, SCHEME, calibration=calibration, rows=2, kinds=("text",))
    scoring = scoring_batches(gpu_pristine_vlm, SCHEME, DataRequest(), calibration, evaluation, 2)
    searched = pipeline.search(pipeline.fresh_copy(gpu_pristine_vlm), SCHEME, calibration)
    context = StudyContext(searched.loaded, searched.result, searched.result.lm_groups(), SCHEME.formats, scoring, None, None)
    groups = context.groups
    apply_decisions(searched.result, with_choices(groups, {g.name: NO_QUANT for g in groups}))
    captured = capture_layer_inputs(searched.loaded, scoring)
    assert [kld_from_layer(searched.loaded, captured, layer) for layer in (0, 17, 35)] == [0.0, 0.0, 0.0]
    reference = capture_reference(hidden_logits_forward(searched.loaded.vlm), scoring, data_source="scoring", data_kind="text")
    group = next(g for g in groups if decoder_layer_index(g.name) == 20)
    apply_decisions(searched.result, [dataclasses.replace(group, chosen="nvfp4")])
    shared = kld_from_layer(searched.loaded, captured, 20)
    full = measure_against(reference, hidden_logits_forward(searched.loaded.vlm), measurement_point="fake_quant").kld_mean
    assert shared > 0 and shared == pytest.approx(full, rel=2e-2)
    apply_decisions(searched.result, searched.result.groups)
