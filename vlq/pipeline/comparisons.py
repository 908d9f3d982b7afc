"""The same search twice, on text vs image+text calibration or with two sensitivity methods, compared decision by
decision and by each scheme's fidelity to BF16 (``vlq compare-calibration``, ``vlq compare-methods``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from ..data.calibration import (
    CalibrationSet,
)
from ..fidelity.comparison import CalibrationComparison, MethodComparison, compare_calibration_manifests, compare_method_manifests
from ..runtime.errors import (
    SchemeError,
)
from ..fidelity.reference import FidelityReference
from ..inputs.requests import DataRequest, RunFolder
from ..manifest.manifest import Manifest
from ..data.models import LoadedVLM
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import writing
from ..search.scheme import Scheme
from .results import ComparisonRun, MethodComparisonRun
from .measure import fidelity_references, measure_fake_quant
from .stages import search, fresh_copy, release_model


def _search_and_measure(loaded: LoadedVLM, scheme: Scheme, calibration: CalibrationSet,
                        references: Sequence[FidelityReference], *, progress: Progress) -> Manifest:
    """One guarded search on a private copy of ``loaded``; its manifest with point a measured against
    ``references`` (none: no fidelity block).  The copy is released."""
    copy_ = fresh_copy(loaded)
    searched = search(copy_, scheme, calibration, progress=progress)
    manifest = searched.manifest
    if references:
        manifest = manifest.with_fidelity(*measure_fake_quant(copy_, references, progress=progress))
    del searched
    release_model(copy_)
    return manifest


def compare_calibration(
    loaded: LoadedVLM,
    scheme: Scheme,
    text_calibration: CalibrationSet,
    image_text_calibration: CalibrationSet,
    *,
    data: DataRequest = DataRequest(),
    measure: bool = True,
    out_dir: str | Path | None = None,
    progress: Progress = SILENT,
) -> ComparisonRun:
    """Search ``scheme`` on a fresh copy of ``loaded`` with each calibration set; compare the decisions.

    Each search passes every guard and manifest check.  With ``measure`` (default) each resulting
    scheme is measured at point a against one BF16 reference on held-out text (disjoint from the text
    calibration; from ``data.text`` or the shipped corpus) and held-out image+text (disjoint from the
    image+text calibration), and the comparison reports both KLDs.  With ``out_dir`` the manifests go
    to ``out_dir/text/`` and ``out_dir/image_text/`` and the comparison's JSON, Markdown and plot next
    to them.
    """
    if image_text_calibration.kind != "image_text":
        raise SchemeError(f"The image+text side got {image_text_calibration.kind!r} calibration data ({image_text_calibration.source}).")
    if text_calibration.kind == "image_text":
        raise SchemeError(f"The text-only side got image+text calibration data ({text_calibration.source}).")
    references: tuple[FidelityReference, ...] = ()
    if measure:
        references = (fidelity_references(loaded, scheme, data, calibration=text_calibration, kinds=("text",), progress=progress)
                      + fidelity_references(loaded, scheme, data, calibration=image_text_calibration, kinds=("image_text",),
                                            progress=progress))
    manifests = {}
    with _writing_to(out_dir) as staged:
        for label, calibration in (("text", text_calibration), ("image_text", image_text_calibration)):
            progress.stage(f"{label} search on {calibration.source}")
            manifests[label] = _search_and_measure(loaded, scheme, calibration, references, progress=progress)
            if staged is not None:
                manifests[label].save(RunFolder(staged.root / label).manifest)
        comparison = compare_calibration_manifests(manifests["text"], manifests["image_text"])
        if staged is not None:
            comparison.write(staged.root)
    return ComparisonRun(comparison, manifests["text"], manifests["image_text"])


def _writing_to(out_dir: str | Path | None):
    """A comparison's folder, written together (nothing to write without one)."""
    return writing(RunFolder(Path(out_dir))) if out_dir is not None else contextlib.nullcontext(None)


def write_comparison(comparison: CalibrationComparison | MethodComparison, out_dir: str | Path) -> Path:
    """A comparison of saved manifests, written into ``out_dir`` together; the folder."""
    with writing(RunFolder(Path(out_dir))) as staged:
        comparison.write(staged.root)
    return Path(out_dir)


def compare_saved_calibrations(text_manifest: str | Path, image_text_manifest: str | Path, out_dir: str | Path) -> CalibrationComparison:
    """Two saved searches (text-only and image+text calibration) compared without searching; written to ``out_dir``."""
    comparison = compare_calibration_manifests(Manifest.load(text_manifest), Manifest.load(image_text_manifest))
    write_comparison(comparison, out_dir)
    return comparison


def compare_saved_methods(first: str | Path, second: str | Path, out_dir: str | Path) -> MethodComparison:
    """Two saved searches (two sensitivity methods) compared without searching; written to ``out_dir``."""
    comparison = compare_method_manifests(Manifest.load(first), Manifest.load(second))
    write_comparison(comparison, out_dir)
    return comparison


def compare_methods(
    loaded: LoadedVLM,
    scheme: Scheme,
    calibration: CalibrationSet,
    *,
    methods: tuple[str, str] = ("gradient", "kl_div"),
    data: DataRequest = DataRequest(),
    measure: bool = True,
    out_dir: str | Path | None = None,
    progress: Progress = SILENT,
) -> MethodComparisonRun:
    """Search ``scheme`` once per sensitivity method (same model, formats, bits and calibration), each on
    a fresh copy of ``loaded``; compare the decisions and — with ``measure`` — each scheme's fidelity to
    BF16 (point a) on held-out text and image+text.

    With ``out_dir`` the manifests go to ``out_dir/<method>/`` and ``comparison.json`` / ``.md`` next
    to them.  The same method twice is allowed (a negative control: it must agree everywhere).
    """
    if len(methods) != 2:
        raise SchemeError(f"A method comparison takes two methods, got {list(methods)}.")
    schemes = [scheme.with_(method=m) for m in methods]  # validates each method before any work
    references: tuple[FidelityReference, ...] = ()
    if measure:
        references = fidelity_references(loaded, scheme, data, calibration=calibration, progress=progress)
    folders = list(methods) if methods[0] != methods[1] else [methods[0], f"{methods[1]}-2"]
    manifests = []
    with _writing_to(out_dir) as staged:
        for folder, method_scheme in zip(folders, schemes):
            progress.stage(f"{method_scheme.method} search on {calibration.source}")
            manifests.append(_search_and_measure(loaded, method_scheme, calibration, references, progress=progress))
            if staged is not None:
                manifests[-1].save(RunFolder(staged.root / folder).manifest)
        comparison = compare_method_manifests(manifests[0], manifests[1])
        if staged is not None:
            comparison.write(staged.root)
    return MethodComparisonRun(comparison, (manifests[0], manifests[1]))
