"""The ``vlq`` parser (one function per command) and the entry point that turns every failure into one line
and an exit code."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..inputs.requests import TINY_TRAINED
from ..runtime.errors import VlqError
from . import commands
from . import evaluate as evaluate_cli, recipe as recipe_cli, study as study_command
from .arguments import common_args, model_args, scheme_args


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="search -> manifest -> export -> on-disk checks -> vLLM (tiny model by default)")
    model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    scheme_args(p)
    p.add_argument("--out", help="run folder (default runs/<scheme id>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in the run folder")
    p.add_argument("--no-serve", action="store_true", help="skip the vLLM check of the export")
    p.add_argument("--fidelity-rows", help="held-out rows per data kind the fidelity points are measured on "
                   "(default: 32 for full-size models, 8 for tiny ones; fewer is faster and noisier)")
    common_args(p)
    p.set_defaults(func=commands.cmd_run)


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="LM-only AutoQuant search; writes manifest.json and the search state")
    model_args(p)
    scheme_args(p)
    p.add_argument("--out", help="run folder (default runs/<scheme id>)")
    common_args(p)
    p.set_defaults(func=commands.cmd_search)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export the checkpoint of a finished search (state restored, not re-scored)")
    p.add_argument("run_dir", help="folder written by `vlq search`")
    model_args(p, default_model=None)
    p.add_argument("--overwrite", action="store_true")
    common_args(p)
    p.set_defaults(func=commands.cmd_export)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="score once, solve many: decide several effective-bits targets (export some)")
    model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    scheme_args(p)
    p.add_argument("--targets", required=True, help="comma-separated effective-bits targets, e.g. 8,7,6,5")
    p.add_argument("--export", help="targets to export and verify: comma-separated (e.g. 6,5) or 'all' (default: none)")
    p.add_argument("--fidelity-rows", help="held-out rows per data kind each target is measured on "
                   "(default: 32 for full-size models, 8 for tiny ones; fewer is faster and noisier)")
    p.add_argument("--out", help="sweep folder")
    p.add_argument("--overwrite", action="store_true")
    common_args(p)
    p.set_defaults(func=commands.cmd_sweep)


def _add_study(sub) -> None:
    from .preparation import prepared, session

    study_command.add_parser(sub, model_args, scheme_args, common_args, func=lambda a: study_command.run(a, prepared, session))


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="Markdown tables and PNG plots from saved benchmarks, manifests and sweeps")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report; reports/README.md is hand-written)")
    p.add_argument("--benchmarks", nargs="*", help="pytest-benchmark JSON files")
    p.add_argument("--baseline", help="a saved benchmark JSON to compare against (regressions flagged)")
    p.add_argument("--manifests", nargs="*", help="manifest.json files (per-layer format maps)")
    p.add_argument("--sweeps", nargs="*", help="sweep.json files (Pareto curves)")
    p.add_argument("--comparisons", nargs="*", help="comparison.json files of compare-calibration / compare-methods "
                   "(decision agreement beside each scheme's KLD to BF16)")
    p.add_argument("--studies", nargs="*", help="study folders or study.json files of `vlq study` (frontiers, proxy vs oracle, cost)")
    p.set_defaults(func=commands.cmd_report)


def _add_compare_calibration(sub) -> None:
    p = sub.add_parser("compare-calibration", help="search text-only and image+text on one model and budget; compare the decisions")
    model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    scheme_args(p)
    p.add_argument("--text-manifest", help="compare two saved manifests instead of searching: the text-only one")
    p.add_argument("--image-manifest", help="... and the image+text one")
    p.add_argument("--out", help="folder for comparison.md/.json/.png and both manifests")
    common_args(p)
    p.set_defaults(func=commands.cmd_compare_calibration)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="estimate weights, search peak, export size and GPUs needed, before loading anything")
    model_args(p, default_model="qwen2.5-vl-3b-random")
    scheme_args(p)
    p.set_defaults(func=commands.cmd_plan)


def _add_compare_methods(sub) -> None:
    p = sub.add_parser("compare-methods", help="search with gradient and with kl_div sensitivity on one model, budget and "
                       "data; compare the decisions and each scheme's KLD to BF16")
    model_args(p, default_model=TINY_TRAINED)  # fidelity on learned weights
    scheme_args(p)
    p.add_argument("--methods", default="gradient,kl_div", help="the two methods, comma-separated (default gradient,kl_div)")
    p.add_argument("--manifests", nargs=2, metavar="MANIFEST", help="compare two saved manifests instead of searching")
    p.add_argument("--out", help="folder for comparison.md/.json and both manifests")
    common_args(p)
    p.set_defaults(func=commands.cmd_compare_methods)


def _add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="measure a finished run folder against its BF16 model at one measurement point "
                       "(fake / checkpoint / served) and record it in its manifest")
    p.add_argument("run_dir", help="folder written by `vlq run` (or `vlq search` + `vlq export`)")
    p.add_argument("--point", default="checkpoint", help="fake: the fake-quantized model (search state restored); checkpoint "
                   "(default): the export re-read by the independent dequantizer; served: vLLM prompt logprobs of the export. "
                   "Comma-separated for several")
    model_args(p, default_model=None)
    common_args(p)
    p.set_defaults(func=commands.cmd_fidelity, seed=None)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="print the live ModelOpt facts vlq relies on")
    p.add_argument("--format", default="fp8", help="format whose config entries to show")
    p.set_defaults(func=commands.cmd_explain)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="serve an exported checkpoint in vLLM and check it layer by layer")
    p.add_argument("path", help="exported checkpoint folder")
    p.add_argument("--manifest", help="manifest.json to compare per-layer methods against (default: the run folder's)")
    p.add_argument("--reference", help="BF16 checkpoint to compare greedy outputs against")
    common_args(p)
    p.set_defaults(func=commands.cmd_check)


#: One function per command, in the order `vlq --help` lists them.
_COMMANDS = (_add_run, _add_search, _add_export, _add_sweep, _add_study, _add_report, _add_compare_calibration, _add_plan,
             _add_compare_methods, _add_fidelity, _add_explain, _add_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlq", description="Quantize the language model of Qwen2.5-VL with ModelOpt "
                                     "AutoQuant, keep the vision tower BF16, check the export in vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    recipe_cli.add_parser(sub)
    evaluate_cli.add_parser(sub)
    return parser


#: Exit codes (docs/guide.md, "What can go wrong").
EXIT_OK, EXIT_CHECK_FAILED, EXIT_REFUSED, EXIT_INTERNAL = 0, 1, 2, 3


def _raise_on_signal(signum, _frame) -> None:
    import signal

    from ..runtime.errors import Terminated

    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; every failure ends as one line on stderr and an exit code, never a traceback.

    0: done, every check holds; 1: a check failed (its verdict is printed); 2: refused (bad input, or a
    stage failed: ``vlq: error:`` names the first cause, the trace is in the log); 3: ``vlq: internal
    error`` (a vlq bug; the trace is in the log); 128+N: stopped by signal N (SIGTERM 143, SIGINT 130)
    after cleaning up what it was writing.
    """
    import signal

    from ..runtime.errors import Terminated

    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["vlq", *map(str, sys.argv[1:] if argv is None else argv)])  # names this command in run-folder locks
    signal.signal(signal.SIGTERM, _raise_on_signal)  # cleanup runs in `finally` blocks, as for Ctrl-C
    try:
        return args.func(args)
    except VlqError as exc:
        print(f"vlq: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (Terminated, KeyboardInterrupt) as exc:
        name = exc.signal_name if isinstance(exc, Terminated) else "SIGINT"
        print(f"vlq: error: stopped by {name}; nothing half-written was kept (a search resumes when the same command runs again).",
              file=sys.stderr)
        return 128 + int(getattr(signal, name))
    except Exception as exc:
        from ..runtime.console import log_exception
        from ..runtime.errors import one_line

        log = log_exception(exc)
        print(f"vlq: internal error: {one_line(exc)} (details: {log or 'no log could be written'})", file=sys.stderr)
        return EXIT_INTERNAL

