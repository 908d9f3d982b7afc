"""What each stage returns: frozen results carrying the checks it made (the CLI and the tests read these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.calibration import (
    CalibrationSet,
)
from ..checks.check import Check
from ..checks.registry import in_registry_order
from ..fidelity.comparison import CalibrationComparison, MethodComparison
from ..export.export import ExportResult
from ..fidelity.metrics import FidelityMetrics
from ..inputs.requests import RunFolder
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM
from ..search.results import SearchResult
from ..serve.results import QuantResolution, ServedLayer, ServingReport


@dataclass(frozen=True)
class Searched:
    """A finished LM-only search whose guards held and whose manifest matches the searcher state
    and the live quantizers.  ``loaded`` now carries the quantizers (fake-quantized in place)."""

    loaded: LoadedVLM
    calibration: CalibrationSet
    result: SearchResult
    manifest: Manifest
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Exported:
    """A checkpoint on disk that matches its manifest and keeps every on-disk guarantee."""

    export: ExportResult
    checks: tuple[Check, ...]

    @property
    def path(self) -> Path:
        return self.export.path


@dataclass(frozen=True)
class Served:
    """What vLLM made of a checkpoint: per-layer methods, and generations where kernels exist."""

    checkpoint: Path
    expected: dict[str, str]  # vLLM layer name -> expected format
    expectations_from: str
    layers: tuple[ServedLayer, ...]
    checks: tuple[Check, ...]
    report: ServingReport | None = None  # None when only resolved (no kernels on this device)
    resolution: QuantResolution | None = None
    note: str = ""
    fidelity: tuple[FidelityMetrics, ...] = ()  # measurement point c, when references were given

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class RunOutcome:
    run: RunFolder
    searched: Searched  # its manifest carries the fidelity block
    exported: Exported
    served: Served | None = None
    serve_skipped: str = ""  # why serving was not checked, when it was not

    @property
    def checks(self) -> tuple[Check, ...]:
        """Every check of the run, each once, in registry order (serving re-reads the checkpoint from disk before
        vLLM starts: that verdict shows where it failed, if it did)."""
        return in_registry_order(self.searched.checks + self.exported.checks + (self.served.checks if self.served else ()))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class ComparisonRun:
    comparison: CalibrationComparison
    text_manifest: Manifest  # each manifest carries its scheme's fidelity block (point a)
    image_text_manifest: Manifest


@dataclass(frozen=True)
class MethodComparisonRun:
    comparison: MethodComparison
    manifests: tuple[Manifest, Manifest]  # in the order of the methods; each carries its fidelity block (point a)


@dataclass(frozen=True)
class MeasuredRun:
    """Measurement points taken again on a finished run folder, recorded in its manifest."""

    run: RunFolder
    manifest: Manifest  # the run's manifest with the new metrics in its fidelity block (as saved)
    measured: tuple[FidelityMetrics, ...]  # what this call measured, in the order of the points asked
