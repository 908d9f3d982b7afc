"""``vlq study``: parse, validate (before any heavy import), call :func:`vlq.pipeline.study`, print.

Hooked into :mod:`vlq.cli.parser` by one call: ``add_parser`` is handed the shared argument groups and
the command function, so this module imports nothing from it.
"""

from __future__ import annotations

import argparse
from typing import Callable

from ..runtime.errors import SchemeError


def add_parser(subparsers, model_args: Callable, scheme_args: Callable, common: Callable, *, func: Callable) -> argparse.ArgumentParser:
    """The ``study`` sub-command, its arguments, and ``func`` as what it runs."""
    from ..inputs.requests import TINY_TRAINED
    from ..study.registry import DEFAULT_STRATEGIES, STRATEGY_MODULES

    p = subparsers.add_parser("study", help="compare sensitivity strategies and format sets on measured fidelity frontiers "
                              "(study.json, study.md)")
    model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    scheme_args(p)
    p.add_argument("--strategies", help=f"comma-separated, of {', '.join(STRATEGY_MODULES)} (uniform:<format> for one "
                   f"format; default {','.join(DEFAULT_STRATEGIES)})")
    p.add_argument("--targets", required=True, help="comma-separated effective-bits targets, e.g. 8,7,6,5")
    p.epilog = "--formats takes several candidate sets separated by commas, e.g. fp8+nvfp4,fp8+w4a16_nvfp4"
    p.add_argument("--random-seeds", help="random allocations per target (default 8)")
    p.add_argument("--fidelity-rows", help="held-out rows per data kind every point is measured on "
                   "(default: 32 for full-size models, 8 for tiny ones)")
    p.add_argument("--scoring-rows", help="held-out text rows the ablation oracle scores on, disjoint from the "
                   "fidelity rows and calibration (default: as many as --fidelity-rows, at most 16)")
    p.add_argument("--out", help="study folder (default runs/study-<format sets>)")
    p.add_argument("--overwrite", action="store_true", help="discard saved scores and search states in the folder")
    common(p)
    p.set_defaults(func=func)
    return p


def _count(text: str | None, flag: str, *, minimum: int = 1) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise SchemeError(f"{flag} takes a whole number of at least {minimum} (e.g. 16); got {text!r}.")
    return value


def _targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SchemeError(f"--targets takes comma-separated numbers (e.g. 8,7,6,5); got {text!r}.") from None
    if not targets:
        raise SchemeError("--targets needs at least one effective-bits target, e.g. --targets 8,7,6,5.")
    return targets


def format_sets(text: str | None) -> list[tuple[str, ...]] | None:
    """``fp8+nvfp4,fp8+int8_sq`` -> [("fp8", "nvfp4"), ("fp8", "int8_sq")], each validated and refused if it folds."""
    if text is None:
        return None
    from ..formats.registry import get_format
    from ..study.registry import require_study_formats

    sets = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        formats = tuple(get_format(f).name for f in part.split("+") if f)
        require_study_formats(formats)
        sets.append(formats)
    if len(set(sets)) != len(sets):
        raise SchemeError(f"--formats repeats a format set: {text!r}.")
    return sets or None


def run(args, prepared: Callable, session: Callable) -> int:
    """Validate light, lock the folder, load, calibrate, study, print the frontiers and conclusions."""
    from ..study.registry import parse_strategies, require_arguments_in

    for flag, value, why in (("--method", args.method, "gradient and kl_div are strategies: name them in --strategies"),
                             ("--bits", args.target_bits, "the targets are --targets"),
                             ("--kv-cache-fp8", args.kv_cache_fp8, "a study exports nothing")):
        if value is not None:
            raise SchemeError(f"vlq study takes no {flag}: {why}.")
    strategies = parse_strategies(args.strategies)
    targets = _targets(args.targets)
    seeds = _count(args.random_seeds, "--random-seeds")
    rows = _count(args.fidelity_rows, "--fidelity-rows")
    scoring_rows = _count(args.scoring_rows, "--scoring-rows")
    sets = format_sets(args.formats)
    if sets is not None:
        args.formats = "+".join(sets[0])  # the base scheme; every set is checked below
    args.target_bits = targets[0]  # the base search's target (a device default may not suit the formats)
    default_out = (lambda scheme: f"runs/study-{','.join('+'.join(s) for s in (sets or [scheme.formats]))}")
    with prepared(args, default_out) as (model, data, scheme, folder):
        require_arguments_in(strategies, sets or [scheme.formats])
        for formats in sets or [scheme.formats]:
            for target in targets:  # an infeasible target, a format the device cannot run: refused before loading
                scheme.with_(formats=formats, target_bits=target).require_device(model.device)
        with session(folder, args.verbose) as (_terminal, progress):
            from .. import pipeline

            loaded = pipeline.load_model(model, progress=progress)
            calibration = pipeline.calibrate(loaded, scheme, data, progress=progress)
            result = pipeline.study(loaded, scheme, calibration, targets, folder, strategies=strategies, format_sets=sets,
                                    random_seeds=seeds if seeds is not None else pipeline.RANDOM_SEEDS, rows=rows,
                                    scoring_rows=scoring_rows, data=data, overwrite=args.overwrite, progress=progress)
    from ..study.tables import conclusions_tables, cost_table, frontier_table

    blocks = []
    for studied in result.sets:
        blocks += [f"{studied.label}:", frontier_table(studied, result.targets), cost_table(studied),
                   *conclusions_tables(studied)]
    print("\n\n".join(blocks + [f"study {result.total_s:.1f}s; written to {folder.root}/study.json and study.md"]), flush=True)
    return 0
