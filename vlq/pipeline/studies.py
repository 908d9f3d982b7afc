"""Compare sensitivity strategies and schemes on measured fidelity frontiers (``vlq study``).

Per format set: one guarded gradient search is the base (its calibrated quantizers serve every allocation); each
scored strategy's scores are solved by the one LP at every target (:mod:`vlq.study.solve`), each baseline allocates
directly, and every allocation is switched in place on the base model and measured at point a on the same
held-out evaluation rows, text and image+text.  The oracle scores on a scoring split of held-out text disjoint
from both the evaluation rows and calibration.  Scores are saved per strategy (``<set>/scores/<strategy>.json``)
and ModelOpt's search states beside them, so a rerun re-scores nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..data.calibration import CalibrationSet, synthetic_text_calibration
from ..data.heldout import HELDOUT_SEED_BASE, heldout_text_batches, require_disjoint
from ..data.models import LoadedVLM
from ..fidelity.quantized_weights import HostOriginals
from ..fidelity.reference import FidelityReference, group_rows
from ..inputs.requests import DataRequest, RunFolder
from ..runtime.errors import SchemeError
from ..runtime.files import atomic_write_text
from ..runtime.progress import SILENT, Progress
from ..search.decisions import lm_achieved_bits
from ..search.scheme import Scheme
from ..search.search import apply_decisions, plan_lm_formats
from ..study import analysis
from ..study.records import Additivity, Correlation, FormatSetStudy, StrategyCost, StudyPoint, StudyResult
from ..study.registry import DEFAULT_STRATEGIES, KL_DIV_MODELOPT, StrategyName, get_strategy, require_arguments_in, require_study_formats
from ..study.solve import LP, solve
from ..study.tables import save_study
from ..study.strategy import Allocation, GroupScores, ModelOptSearch, StudyContext, with_choices
from .measure import FIDELITY_TOKENS_PER_FORWARD, fidelity_references, measure_fake_quant, text_path
from .stages import fresh_copy, guarded_search, release_model

#: Random allocations per target unless asked otherwise.
RANDOM_SEEDS = 8
#: The oracle's scoring rows by default: as many as the evaluation rows, at most this many (3B: 16 x 512 tokens,
#: one forward).
SCORING_ROWS_MAX = 16
#: The scoring split's generated-token rows (models without a tokenizer) come from this seed offset: never the
#: evaluation rows' seeds.
SCORING_SEED_OFFSET = 2**31


def study(
    pristine: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    targets: Sequence[float],
    folder: RunFolder,
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    format_sets: Sequence[Sequence[str]] | None = None,
    random_seeds: int = RANDOM_SEEDS,
    rows: int | None = None,
    scoring_rows: int | None = None,
    data: DataRequest = DataRequest(),
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> StudyResult:
    """Every (format set, strategy) frontier at ``targets``, measured the same way; ``study.json`` / ``.md`` in ``folder``.

    ``rows``: held-out evaluation rows per data kind (the sweep's default); ``scoring_rows``: the oracle's held-out
    text rows (default: as many, at most :data:`SCORING_ROWS_MAX`).  ``pristine`` is never modified.  With ``overwrite`` saved scores are discarded.
    """
    start = time.perf_counter()
    targets = [float(t) for t in targets]
    sets = [tuple(s) for s in (format_sets or [scheme.formats])]
    schemes = _validated(pristine, scheme, sets, targets, strategies)
    if overwrite:
        for s in sets:
            shutil.rmtree(folder.root / "+".join(s), ignore_errors=True)
    first = schemes[0].with_(target_bits=targets[0])
    evaluation = fidelity_references(pristine, first, data, calibration=calibration, rows=rows, progress=progress)
    scoring = scoring_batches(pristine, first, data, calibration, evaluation, scoring_rows or min(evaluation[0].rows, SCORING_ROWS_MAX))
    studied = []
    for set_scheme in schemes:
        progress.stage(f"study {'+'.join(set_scheme.formats)}: {', '.join(strategies)} at {', '.join(f'{t:g}' for t in targets)} bits")
        studied.append(_study_format_set(pristine, set_scheme, calibration, targets, folder, strategies, random_seeds,
                                         evaluation, scoring, progress))
    result = StudyResult(str(pristine.source), tuple(targets), tuple(strategies), random_seeds, evaluation[0].rows,
                         sum(int(b["input_ids"].shape[0]) for b in scoring), tuple(studied), time.perf_counter() - start)
    save_study(result, folder.root)
    progress.stage(f"study written to {folder.root}")
    return result


def _validated(pristine: LoadedVLM, scheme: Scheme, sets, targets, strategies) -> list[Scheme]:
    """One scheme per format set (gradient, first target), everything refused before any work."""
    if not targets:
        raise SchemeError("A study needs at least one effective-bits target, e.g. --targets 8,7,6,5.")
    if len(set(targets)) != len(targets):
        raise SchemeError(f"Study targets repeat: {targets}.")
    if not strategies:
        raise SchemeError("A study needs at least one strategy.")
    schemes = []
    for formats in sets:
        require_study_formats(formats)
        set_scheme = scheme.with_(formats=tuple(formats), method=LP, target_bits=targets[0])
        for t in targets:
            plan_lm_formats(pristine, set_scheme.with_(target_bits=t))  # validates range, feasibility, shapes
        schemes.append(set_scheme)
    require_arguments_in(strategies, sets)
    return schemes


def scoring_batches(pristine: LoadedVLM, scheme: Scheme, data: DataRequest, calibration: CalibrationSet,
                    evaluation: Sequence[FidelityReference], rows: int) -> tuple[dict, ...]:
    """Held-out text rows for the oracle, disjoint (on content) from calibration and the evaluation rows: packed from
    the end of the text like the evaluation rows, just before them; generated tokens of another seed range without
    a tokenizer.  Grouped into forwards like a reference's."""
    text_eval = next(r for r in evaluation if r.data_kind == "text")
    if pristine.tokenizer is not None:
        both = heldout_text_batches(pristine.tokenizer, vocab_size=pristine.vocab_size, num_batches=text_eval.rows + rows,
                                    seq_len=scheme.seq_len, path=text_path(pristine, data),
                                    calibration=calibration if calibration.kind == "text" else None)
        split = CalibrationSet(both.batches[:rows], f"{both.source} (scoring split: rows 0-{rows - 1})", 1, scheme.seq_len,
                               both.vocab_size, "text")
    else:
        split = synthetic_text_calibration(pristine.config, vocab_size=pristine.vocab_size, num_batches=rows,
                                           seq_len=scheme.seq_len, seed=HELDOUT_SEED_BASE + SCORING_SEED_OFFSET + data.seed)
    require_disjoint(split, calibration)
    require_disjoint(split, CalibrationSet(text_eval.batches, text_eval.data_source, 1, scheme.seq_len,
                                           pristine.vocab_size, "text"))
    per_forward = max(1, FIDELITY_TOKENS_PER_FORWARD // scheme.seq_len)
    return tuple(group_rows(split.to(pristine.device).batches, per_forward))


def _modelopt_search(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, where: Path, method: str,
                     progress: Progress):
    """A guarded ModelOpt search with ``method`` whose state is kept in ``where`` (a rerun restores it: no scoring)."""
    searched = guarded_search(loaded, scheme.with_(method=method), calibration, state=where / f"search_{method}.pth",
                              progress=progress)
    r = searched.result
    on_gpu = r.peak_gpu_bytes is not None
    return searched, ModelOptSearch(method, r.modelopt_state, r.name_prefix, r.times.searching_s,
                                    r.peak_gpu_own_bytes if on_gpu else r.peak_rss_bytes, "gpu" if on_gpu else "rss",
                                    r.restored_from_checkpoint)


def _saved_or_scored(name: str, context: StudyContext, where: Path, settings: dict, progress: Progress) -> GroupScores:
    """A strategy's scores: from ``where/scores/<name>.json`` when saved with the same settings, else computed and saved."""
    strategy = get_strategy(name)
    if not strategy.saved:  # derived from another strategy's scores: recomputed from them, never stale
        return strategy.scores(context)
    path = where / "scores" / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            progress.stage(f"{name}: scores restored from {path}")
            return GroupScores.from_dict(saved["scores"])
        progress.stage(f"{name}: {path} was scored with other settings; scoring again")
    scores = strategy.scores(context)
    atomic_write_text(path, json.dumps({"settings": settings, "scores": scores.to_dict()}, indent=1) + "\n")
    progress.stage(f"{name}: scored {len(scores.scores)} groups in {scores.seconds:.1f}s")
    return scores


def _measure(base, allocation: Allocation, evaluation, originals: HostOriginals) -> StudyPoint:
    """``allocation`` switched in on the base model and measured at point a on the evaluation rows."""
    groups = with_choices(base.result.lm_groups(), allocation.chosen)
    apply_decisions(base.result, groups)
    start = time.perf_counter()
    metrics = measure_fake_quant(base.loaded, evaluation, originals=originals)
    return StudyPoint(allocation.strategy, allocation.target_bits, lm_achieved_bits(groups), allocation.choices, metrics,
                      time.perf_counter() - start, allocation.seed)


def _strategy_points(name: str, context: StudyContext, base, targets, seeds: int, evaluation, originals,
                     progress: Progress) -> tuple[list[StudyPoint], list[StrategyCost]]:
    strategy = get_strategy(name)
    points: list[StudyPoint] = []
    if strategy.scored:
        scores = context.scores_of(strategy.name)
        state, prefix, lm_path = base.result.modelopt_state, base.result.name_prefix, base.loaded.lm_path
        solved = [(name, LP)] + ([(KL_DIV_MODELOPT, "kl_div")] if name == "kl_div" else [])
        costs = [StrategyCost(label, scores.seconds, scores.peak_bytes, scores.memory, scores.detail) for label, _ in solved]
        for label, method in solved:
            for target in targets:
                allocation, _ = solve(state, scores, target, name_prefix=prefix, lm_path=lm_path, method=method, label=label)
                points.append(_measure(base, allocation, evaluation, originals))
    else:
        start = time.perf_counter()
        allocations = strategy.allocations(context, targets, argument=StrategyName.parse(name).argument, seeds=seeds)
        allocations = tuple(a for a in allocations if a.strategy.partition(":")[2] in ("", *context.formats))
        costs = [StrategyCost(name, time.perf_counter() - start, None, "rss", "no scoring: allocated directly")]
        points = [_measure(base, a, evaluation, originals) for a in allocations]
    for label in dict.fromkeys(p.strategy for p in points):
        mine = [p for p in points if p.strategy == label]
        progress.stage(f"{label}: {len(mine)} points measured, text KLD " + ", ".join(
            f"{p.kld():.4g}@{p.achieved_bits:.2f}b" for p in mine[:8]) + (" ..." if len(mine) > 8 else ""))
    return points, costs


def _settings(pristine: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, scoring, groups) -> dict:
    """What a saved score depends on: a rerun with other settings scores again."""
    return {"model": str(pristine.source), "formats": list(scheme.formats), "calibration": calibration.source,
            "seq_len": scheme.seq_len, "batch_size": scheme.batch_size, "num_calib_steps": scheme.num_calib_steps,
            "num_score_steps": scheme.num_score_steps, "scoring_rows": sum(int(b["input_ids"].shape[0]) for b in scoring),
            "groups": sorted(g.name for g in groups)}


def _study_format_set(pristine: LoadedVLM, scheme: Scheme, calibration: CalibrationSet, targets, folder: RunFolder,
                      strategies, seeds: int, evaluation, scoring, progress: Progress) -> FormatSetStudy:
    where = folder.root / "+".join(scheme.formats)
    (where / "scores").mkdir(parents=True, exist_ok=True)
    base, base_search = _modelopt_search(fresh_copy(pristine), scheme, calibration, where, "gradient", progress)
    searches = {"gradient": base_search}

    def modelopt_search(method: str) -> ModelOptSearch:
        if method not in searches:
            copy_ = fresh_copy(pristine)
            _, searches[method] = _modelopt_search(copy_, scheme, calibration, where, method, progress)
            release_model(copy_)
        return searches[method]

    settings = _settings(pristine, scheme, calibration, scoring, base.result.lm_groups())
    cache: dict[str, GroupScores] = {}

    def scores_of(name: str) -> GroupScores:
        if name not in cache:
            cache[name] = _saved_or_scored(name, context, where, settings, progress)
        return cache[name]

    context = StudyContext(base.loaded, base.result, base.result.lm_groups(), scheme.formats, scoring, modelopt_search,
                           scores_of, progress)
    points: list[StudyPoint] = []
    costs: list[StrategyCost] = []
    originals = HostOriginals()  # the base model's weights, copied out once for every measurement
    try:
        for name in strategies:
            more_points, more_costs = _strategy_points(name, context, base, targets, seeds, evaluation, originals, progress)
            points += more_points
            costs += more_costs
    finally:
        apply_decisions(base.result, base.result.groups)
    del originals
    release_model(base.loaded)
    return _concluded(scheme.formats, points, costs, {name: s.scores for name, s in cache.items()})


def _concluded(formats, points: list[StudyPoint], costs: list[StrategyCost], scores: dict) -> FormatSetStudy:
    """The format set's record with its conclusions: correlations with the oracle, regrets, areas, additivity."""
    partial = FormatSetStudy(tuple(formats), tuple(points), tuple(costs), scores, (), {}, {}, ())
    per_target = list(dict.fromkeys(p.strategy for p in points if p.target_bits is not None))
    series = {s: partial.series(s) for s in per_target}
    correlations, additivity = [], []
    oracle = scores.get("ablation")
    if oracle is not None:
        for scorer in (s for s in scores if s != "ablation"):
            xs, ys = analysis.paired_scores(scores[scorer], oracle)
            if len(xs) >= 2:
                shuffled, p95 = analysis.shuffled_control(xs, ys)
                correlations.append(Correlation(scorer, len(xs), analysis.spearman(xs, ys), shuffled, p95))
        for p in points:
            if p.target_bits is not None and p.seed is None:
                additivity.append(Additivity(p.strategy, p.target_bits, analysis.additive_prediction(p.chosen, oracle),
                                             p.kld()))
    return FormatSetStudy(tuple(formats), tuple(points), tuple(costs), scores, tuple(correlations),
                          analysis.regrets(series), {s: analysis.frontier_area(v) for s, v in series.items()},
                          tuple(additivity))
