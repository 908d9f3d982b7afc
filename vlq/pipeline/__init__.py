"""The one entry that runs vlq's stages in order; the CLI, sweeps, comparisons, tests and benchmarks all go
through it, so a stage changes in one place.

    load_model ─► calibrate ─► search (+ guards, manifest verified) ─► export (+ on-disk checks)
               ─► serve_check (vLLM)                               ─► vlq.report tables

``stages`` holds the stages, ``measure`` the fidelity points, ``runs`` whole runs, ``sweeps`` and
``comparisons`` the studies built from them, ``results`` what they return.

``from vlq import pipeline; pipeline.run(...)``: the names below load their module on first use, so importing
the package costs nothing (the CLI refuses bad input before torch is imported).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    **dict.fromkeys(("Searched", "Exported", "Served", "RunOutcome", "ComparisonRun", "MethodComparisonRun",
                     "MeasuredRun"), "results"),
    **dict.fromkeys(("load_model", "calibrate", "search", "export", "serve_check", "restore", "saved_data_request",
                     "fresh_copy"), "stages"),
    **dict.fromkeys(("FIDELITY_ROWS_TINY", "FIDELITY_ROWS_FULL_SIZE", "fidelity_references", "measure_fake_quant",
                     "measure_checkpoint", "measure_served", "served_engine_args", "served_fidelity", "export_agreement",
                     "record_fidelity"), "measure"),
    **dict.fromkeys(("run", "measure_run", "serving_skip_reason"), "runs"),
    **dict.fromkeys(("sweep",), "sweeps"),
    **dict.fromkeys(("study", "RANDOM_SEEDS"), "studies"),
    **dict.fromkeys(("evaluate_run", "task_accuracy", "EvaluatedRun"), "evaluate"),
    **dict.fromkeys(("compare_calibration", "compare_methods", "compare_saved_calibrations", "compare_saved_methods",
                     "write_comparison"), "comparisons"),
}

if TYPE_CHECKING:  # the same names, for readers and type checkers
    from .comparisons import (  # noqa: F401
        compare_calibration, compare_methods, compare_saved_calibrations, compare_saved_methods, write_comparison,
    )
    from .measure import (  # noqa: F401
        FIDELITY_ROWS_FULL_SIZE, FIDELITY_ROWS_TINY, export_agreement, fidelity_references, measure_checkpoint, measure_fake_quant,
        measure_served, record_fidelity, served_engine_args, served_fidelity,
    )
    from .results import ComparisonRun, Exported, MeasuredRun, MethodComparisonRun, RunOutcome, Searched, Served  # noqa: F401
    from .runs import measure_run, run, serving_skip_reason  # noqa: F401
    from .stages import calibrate, export, fresh_copy, load_model, restore, saved_data_request, search, serve_check  # noqa: F401
    from .studies import RANDOM_SEEDS, study  # noqa: F401
    from .sweeps import sweep  # noqa: F401
    from .evaluate import EvaluatedRun, evaluate_run, task_accuracy  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
