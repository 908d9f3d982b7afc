"""The one entry that runs vlq's stages in order; the CLI, sweeps, comparisons, tests and benchmarks all go
through it, so a stage changes in one place.

    load_model ─► calibrate ─► search (+ guards, manifest verified) ─► export (+ on-disk checks)
               ─► serve_check (vLLM)                               ─► vlq.report.tables tables

``from vlq import pipeline; pipeline.run(...)``: the names below load their module on first use, so importing
the package costs nothing (the CLI refuses bad input before torch is imported).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    **dict.fromkeys(("Searched", "Exported", "Served", "RunOutcome", "ComparisonRun", "MethodComparisonRun", "MeasuredRun",
                     "load_model", "calibrate", "fidelity_references", "measure_fake_quant", "measure_checkpoint",
                     "measure_served", "served_engine_args", "served_fidelity", "export_agreement", "record_fidelity",
                     "search", "export", "serve_check", "serving_skip_reason", "run", "restore", "saved_data_request",
                     "fresh_copy", "sweep", "compare_calibration", "write_comparison", "compare_methods", "measure_run",
                     "FIDELITY_ROWS_TINY", "FIDELITY_ROWS_FULL_SIZE"), "stages"),
}

if TYPE_CHECKING:  # the same names, for readers and type checkers
    from .stages import (  # noqa: F401
        FIDELITY_ROWS_FULL_SIZE, FIDELITY_ROWS_TINY, ComparisonRun, Exported, MeasuredRun, MethodComparisonRun, RunOutcome, Searched,
        Served, calibrate, compare_calibration, compare_methods, export, export_agreement, fidelity_references, fresh_copy, load_model,
        measure_checkpoint, measure_fake_quant, measure_run, measure_served, record_fidelity, restore, run, saved_data_request, search,
        serve_check, served_engine_args, served_fidelity, serving_skip_reason, sweep, write_comparison,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
