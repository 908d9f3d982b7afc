"""``vlq study`` on the tiny model with learned weights: strategies compared on measured frontiers (issue 24).

One module-scoped study (fp8 vs BF16 per group, targets 12 and 10 bits, every default strategy, 8 random
allocations per target) feeds the read-only checks below; each has its negative control:

* the measured oracle's frontier is at or below the random median at every target, and inverted at or above it
  (the same check, with the roles swapped, fails);
* gradient's and kl_div's rank correlation with the oracle beats the shuffled control's 95th percentile (inverted's,
  the same scores reversed, does not);
* the study's gradient point is ``vlq sweep``'s point at that target, bit for bit; uniform:fp8 is an fp8-only
  search's measurement, bit for bit;
* the oracle's shared work: a group's ablation KLD equals a full forward with only that group quantized (another
  group's does not), and nothing quantized gives exactly 0;
* a rerun re-scores nothing; the records read back equal.
"""

from __future__ import annotations

import statistics

import pytest

from vlq import pipeline
from vlq.fidelity.metrics import hidden_logits_forward
from vlq.fidelity.reference import capture_reference
from vlq.formats.registry import NO_QUANT
from vlq.inputs.requests import RunFolder
from vlq.search.scheme import Scheme
from vlq.search.search import apply_decisions
from vlq.study import analysis
from vlq.study.layerwise import capture_layer_inputs, kld_from_layer
from vlq.study.records import load_study
from vlq.study.strategies.ablation import ablation_scores
from vlq.study.strategy import StudyContext, decoder_layer_index, with_choices

SCHEME = Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=4, num_score_steps=4, seq_len=64)
TARGETS = (12.0, 10.0)
SEEDS = 8
#: A frontier "at or below" another may exceed it by this share (8 rows x 64 held-out tokens; near-ties flip).
KLD_MARGIN = 0.10


class Recorded:
    """A progress reporter that keeps the stage lines (to see what a rerun restored)."""

    def __init__(self):
        self.lines: list[str] = []

    def stage(self, message: str) -> None:
        self.lines.append(message)

    def bar(self, label, total=None):
        import contextlib

        class _Bar:
            def update(self, n=1):
                pass

        return contextlib.nullcontext(_Bar())


@pytest.fixture(scope="module")
def calibration(trained_vlm):
    return pipeline.calibrate(trained_vlm, SCHEME)


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    return RunFolder(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def studied(trained_vlm, calibration, study_folder):
    result = pipeline.study(trained_vlm, SCHEME, calibration, TARGETS, study_folder, random_seeds=SEEDS)
    return result.sets[0]


def violations(study, lower: str, upper: str, margin: float = KLD_MARGIN) -> list[float]:
    """Targets where ``lower``'s text KLD exceeds ``upper``'s (random: its median) by more than ``margin``."""
    low, high = study.series(lower), study.series(upper)
    return [t for t in TARGETS if low[t] > high[t] * (1 + margin)]


def test_oracle_is_at_or_below_the_random_median_and_inverted_at_or_above(studied):
    randoms = [p for p in studied.points if p.strategy == "random"]
    assert len(randoms) == SEEDS * len(TARGETS)
    assert all(p.achieved_bits <= p.target_bits + 1e-9 for p in randoms)  # every draw meets its target
    for target in TARGETS:  # and spends it: no draw is more than one group's worth below
        assert statistics.median(p.achieved_bits for p in randoms if p.target_bits == target) > target - 1.0
    assert violations(studied, "ablation", "random") == []
    assert violations(studied, "random", "inverted") == []
    # negative control: the same check with the roles swapped fails at every target
    assert violations(studied, "random", "ablation") == list(TARGETS)
    assert violations(studied, "inverted", "random") == list(TARGETS)


def test_modelopt_scorers_rank_groups_like_the_oracle_beyond_chance(studied):
    by_scorer = {c.scorer: c for c in studied.correlations}
    for scorer in ("gradient", "kl_div"):
        c = by_scorer[scorer]
        assert c.pairs == 16
        assert c.spearman > c.shuffled_p95 > 0, c
        assert abs(c.shuffled) < c.spearman
    inverted = by_scorer["inverted"]  # negative control: gradient's scores reversed rank against the oracle
    assert inverted.spearman < 0 < inverted.shuffled_p95
    assert inverted.spearman == pytest.approx(-by_scorer["gradient"].spearman)


def test_gradient_point_is_the_sweeps_point_bit_for_bit(trained_vlm, calibration, studied, tmp_path):
    swept = pipeline.sweep(trained_vlm, SCHEME, calibration, TARGETS, RunFolder(tmp_path), export_targets=False)
    for point in swept.points:
        mine = next(p for p in studied.points if p.strategy == "gradient" and p.target_bits == point.target_bits)
        assert mine.chosen == {g.name: g.chosen for g in point.manifest.groups}
        assert mine.achieved_bits == point.achieved_bits
        assert [m.to_dict() for m in mine.fidelity] == [m.to_dict() for m in point.manifest.fidelity]
    # the comparison has teeth: the two targets' points differ
    a, b = (next(p for p in studied.points if p.strategy == "gradient" and p.target_bits == t) for t in TARGETS)
    assert a.chosen != b.chosen and a.fidelity != b.fidelity


def test_uniform_fp8_is_an_fp8_only_runs_measurement(trained_vlm, calibration, studied):
    uniform = next(p for p in studied.points if p.strategy == "uniform:fp8")
    assert uniform.target_bits is None and uniform.achieved_bits == 8.0
    assert set(uniform.chosen.values()) == {"fp8"}
    copy_ = pipeline.fresh_copy(trained_vlm)
    searched = pipeline.search(copy_, SCHEME.with_(target_bits=8.0), calibration)
    assert {g.chosen for g in searched.manifest.groups} == {"fp8"}
    references = pipeline.fidelity_references(trained_vlm, SCHEME, calibration=calibration)
    run = pipeline.measure_fake_quant(searched.loaded, references)
    assert [m.to_dict() for m in run] == [m.to_dict() for m in uniform.fidelity]
    gradient = next(p for p in studied.points if p.strategy == "gradient" and p.target_bits == 10.0)
    assert gradient.fidelity != uniform.fidelity  # negative control: another allocation measures differently


def test_kl_div_as_modelopt_solves_it_is_the_kl_div_searchs_own_choice(trained_vlm, calibration, studied):
    """The kl_div@modelopt row is ModelOpt's threshold search over kl_div's scores: at the search's own target it
    decides what a kl_div search decides; the kl_div row (the same scores through the LP) is another solver's."""
    searched = pipeline.search(pipeline.fresh_copy(trained_vlm), SCHEME.with_(method="kl_div"), calibration)
    own = {g.name: g.chosen for g in searched.manifest.groups}
    by_row = {p.strategy: p for p in studied.points if p.target_bits == SCHEME.target_bits}
    assert by_row["kl_div@modelopt"].chosen == own
    assert by_row["kl_div"].chosen != own  # the solver matters here: the LP spends the budget differently


def test_every_strategy_module_is_registered_under_its_own_name():
    from pathlib import Path

    from vlq.study import registry

    modules = {p.stem for p in (Path(registry.__file__).parent / "strategies").glob("*.py") if p.stem != "__init__"}
    assert modules == {module for module, _ in registry.STRATEGY_MODULES.values()}
    for name in registry.STRATEGY_MODULES:
        strategy = registry.get_strategy(name)
        assert strategy.name == name and strategy.scored == hasattr(strategy, "scores"), name
    assert set(registry.DEFAULT_STRATEGIES) == set(registry.STRATEGY_MODULES)
    assert registry.parse_strategies("gradient,uniform:fp8") == ("gradient", "uniform:fp8")
    with pytest.raises(Exception, match="Unknown strategy 'position:3'"):
        registry.parse_strategies("position:3")  # only uniform takes an argument


def test_format_sets_parse_and_refuse_before_torch():
    from vlq.cli.study import format_sets
    from vlq.runtime.errors import SchemeError

    assert format_sets("fp8+nvfp4, fp8+w4a16_nvfp4") == [("fp8", "nvfp4"), ("fp8", "w4a16_nvfp4")]
    with pytest.raises(SchemeError, match="repeats a format set"):
        format_sets("fp8,fp8")
    with pytest.raises(SchemeError, match="w4a8_awq folds scales into the weights"):
        format_sets("fp8+nvfp4,w4a8_awq")


def test_records_read_back_and_the_tables_show_every_strategy(studied, study_folder):
    loaded = load_study(study_folder.root)
    assert loaded.sets[0].to_dict() == studied.to_dict()
    text = (study_folder.root / "study.md").read_text()
    for strategy in ("gradient", "kl_div", "kl_div@modelopt", "ablation", "weight_error", "uniform:fp8", "position",
                     "random", "inverted"):
        assert f"| {strategy} " in text, strategy
    costs = {c.strategy: c for c in studied.costs}
    assert costs["ablation"].seconds > 0 and costs["ablation"].peak_bytes > 0
    assert all(p.metrics("text") and p.metrics("image_text") for p in studied.points)


def test_report_draws_the_three_plots(studied, study_folder, tmp_path):
    from vlq.report.document import write_report
    from vlq.runtime.errors import VlqError

    readme = write_report(tmp_path / "report", studies=[study_folder.root]).read_text()
    pngs = sorted(p.name for p in (tmp_path / "report").glob("study_*.png"))
    assert [n.split("_" + study_folder.root.name)[0] for n in pngs] == ["study_cost", "study_frontiers", "study_proxy_vs_oracle"]
    assert all(f"]({n})" in readme for n in pngs) and "Rank correlation with the oracle" in readme
    (tmp_path / "sweep.json").write_text('{"points": []}')  # negative control: not a study
    with pytest.raises(VlqError, match="is not a vlq study"):
        write_report(tmp_path / "bad", studies=[tmp_path / "sweep.json"])


def test_a_rerun_scores_nothing_again(trained_vlm, calibration, studied, study_folder):
    progress = Recorded()
    again = pipeline.study(trained_vlm, SCHEME, calibration, TARGETS[:1], study_folder,
                           strategies=("gradient", "ablation", "weight_error"), progress=progress)
    restored = [line for line in progress.lines if line.split(":")[0] in ("gradient", "ablation", "weight_error")
                and "scores restored" in line]
    assert len(restored) == 3, progress.lines
    assert again.sets[0].scores["ablation"] == studied.scores["ablation"]
    assert not any("scored 16 groups" in line for line in progress.lines)


# ------------------------------------------------------------------------------------------------
# The oracle's shared work
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_context(trained_vlm, calibration):
    copy_ = pipeline.fresh_copy(trained_vlm)
    searched = pipeline.search(copy_, SCHEME, calibration)
    evaluation = pipeline.fidelity_references(trained_vlm, SCHEME, calibration=calibration)
    from vlq.pipeline.studies import scoring_batches
    from vlq.inputs.requests import DataRequest

    scoring = scoring_batches(trained_vlm, SCHEME, DataRequest(), calibration, evaluation, 4)
    return StudyContext(searched.loaded, searched.result, searched.result.lm_groups(), SCHEME.formats, scoring,
                        modelopt_search=None, scores_of=None)


def _full_forward_kld(context, reference, group, fmt) -> float:
    groups = context.groups
    apply_decisions(context.search_result, with_choices(groups, {**{g.name: NO_QUANT for g in groups}, group.name: fmt}))
    try:
        from vlq.fidelity.reference import measure_against

        return measure_against(reference, hidden_logits_forward(context.model.vlm), measurement_point="fake_quant").kld_mean
    finally:
        apply_decisions(context.search_result, context.search_result.groups)


def test_ablation_equals_a_full_forward_with_only_that_group_quantized(oracle_context):
    context = oracle_context
    groups = context.groups
    apply_decisions(context.search_result, with_choices(groups, {g.name: NO_QUANT for g in groups}))
    reference = capture_reference(hidden_logits_forward(context.model.vlm), context.scoring, data_source="scoring split",
                                  data_kind="text")
    apply_decisions(context.search_result, context.search_result.groups)
    scores = ablation_scores(context)
    picked = [groups[0], groups[5], groups[-1]]  # layers 0, 1 and the last: re-run from the first, a middle, the end
    assert sorted({decoder_layer_index(g.name) for g in picked}) == [0, 1, 3]
    for group in picked:
        full = _full_forward_kld(context, reference, group, "fp8")
        assert scores[group.name]["fp8"] == pytest.approx(full, rel=1e-4, abs=1e-9), group.name
        assert full > 0
    # negative control: another group's ablation is not this group's full forward
    assert scores[groups[1].name]["fp8"] != pytest.approx(_full_forward_kld(context, reference, groups[0], "fp8"), rel=1e-2)


def test_ablation_of_nothing_quantized_is_exactly_zero(oracle_context):
    scores = ablation_scores(oracle_context, include_none=True)
    assert all(s[NO_QUANT] == 0.0 for s in scores.values())
    assert all(s["fp8"] > 0 for s in scores.values())  # the same path with a group quantized moves the output
    context = oracle_context
    apply_decisions(context.search_result, with_choices(context.groups, {g.name: NO_QUANT for g in context.groups}))
    try:
        captured = capture_layer_inputs(context.model, context.scoring)
        assert [kld_from_layer(context.model, captured, layer) for layer in range(4)] == [0.0] * 4
    finally:
        apply_decisions(context.search_result, context.search_result.groups)


# ------------------------------------------------------------------------------------------------
# The conclusions' arithmetic
# ------------------------------------------------------------------------------------------------


def test_spearman_regret_area_and_quartiles():
    assert analysis.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert analysis.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # ties share their rank
    shuffled, p95 = analysis.shuffled_control(list(range(30)), list(range(30)))
    assert abs(shuffled) < p95 < 0.5  # chance stays far from a perfect ranking
    assert analysis.regrets({"a": {8.0: 0.1, 6.0: 0.4}, "b": {8.0: 0.2, 6.0: 0.2}}) == {
        8.0: {"a": 1.0, "b": 2.0}, 6.0: {"a": 2.0, "b": 1.0}}
    assert analysis.frontier_area({8.0: 0.0, 6.0: 0.2}) == pytest.approx(0.1)
    assert analysis.frontier_area({8.0: 0.3}) == 0.3
    assert analysis.quartiles([1, 2, 3, 4, 5]) == (2, 3, 4)
    assert analysis.additive_prediction({"g1": "fp8", "g2": NO_QUANT}, {"g1": {"fp8": 0.5}, "g2": {"fp8": 9.0}}) == 0.5


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("--strategies", "gradient,bogus", "--targets", "12"), "Unknown strategy 'bogus'"),
    (("--targets", "12", "--formats", "fp8,fp8+int4_awq"), "int4_awq folds scales into the weights"),
    (("--targets", "12", "--strategies", "uniform:int8_sq"), "int8_sq is in none of the format sets"),
    (("--targets", "12", "--random-seeds", "0"), "--random-seeds takes a whole number of at least 1"),
    (("--targets", "6", "--formats", "fp8"), "target_bits=6.0 is infeasible for formats fp8"),
    (("--targets", "12", "--method", "kl_div"), "vlq study takes no --method: gradient and kl_div are strategies"),
], ids=["unknown-strategy", "folding-format", "uniform-outside-sets", "zero-seeds", "infeasible-target", "method"])
def test_bad_study_input_is_refused_before_torch(args, message, tmp_path):
    from tests.helpers import vlq_cli

    run = vlq_cli("study", *args, "--device", "cpu", "--out", tmp_path / "study", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and run.stderr.startswith("vlq: error:"), run.stderr
    assert run.heavy_imports == (), f"refused after importing {run.heavy_imports}"
    assert not (tmp_path / "study" / "study.json").exists()


@pytest.mark.slow
def test_vlq_study_writes_its_records(tmp_path):
    from tests.helpers import vlq_cli

    run = vlq_cli("study", "--targets", "12,10", "--strategies", "gradient,ablation,uniform,random", "--random-seeds", "3",
                  "--out", tmp_path / "study", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = load_study(tmp_path / "study")
    assert [p.strategy for p in result.sets[0].points].count("random") == 6
    assert "Rank correlation with the oracle" in run.stdout and (tmp_path / "study" / "study.md").exists()
