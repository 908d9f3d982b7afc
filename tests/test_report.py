"""`vlq report`: tables and plots from saved benchmark JSON, manifests and sweeps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlq import pipeline
from vlq.inputs.requests import RunFolder
from vlq.pipeline import fresh_copy
from vlq.runtime.errors import VlqError
from vlq.report.benchmarks import benchmark_table, compare_runs, load_benchmarks
from vlq.report.document import write_report
from vlq.search.scheme import Scheme

REPO = Path(__file__).resolve().parent.parent
SAVED = REPO / "reports" / "benchmarks" / "h200-3b.json"
#: A committed run saved before benchmarks said what they measure: a fidelity measurement, a sweep, a search.
MIXED_OLD = REPO / "reports" / "benchmarks" / "h200-fidelity-sweep-7b-2026-12-01c.json"


def _slower_copy(tmp_path, factor):
    data = json.loads(SAVED.read_text())
    for bench in data["benchmarks"]:
        bench["stats"]["mean"] *= factor
    path = tmp_path / f"x{factor}.json"
    path.write_text(json.dumps(data))
    return path


def test_saved_benchmark_is_readable():
    machine, rows = load_benchmarks(SAVED)
    assert machine["gpu"] == "NVIDIA H200" and len(rows) == 4
    assert all(r.peak_gpu_gib and r.achieved_bits <= 6.0 for r in rows)


def test_comparison_flags_a_regression(tmp_path):
    _, base = load_benchmarks(SAVED)
    _, same = load_benchmarks(_slower_copy(tmp_path, 1.0))
    _, slow = load_benchmarks(_slower_copy(tmp_path, 1.5))
    assert not any(c.regressed for c in compare_runs(base, same))
    assert all(c.regressed for c in compare_runs(base, slow))


@pytest.fixture(scope="module")
def run_outputs(pristine_vlm, calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=6.0, num_calib_steps=1, num_score_steps=1, seq_len=32)
    run = RunFolder(out / "run")
    pipeline.search(fresh_copy(pristine_vlm), scheme, calibration, run=run)  # writes run.manifest once every check holds
    manifest_path = run.manifest
    pipeline.sweep(pristine_vlm, scheme.with_(target_bits=7.0), calibration, (7.0, 5.0), RunFolder(out / "sweep"), export_targets=False)
    return manifest_path, out / "sweep" / "sweep.json"


def test_write_report(run_outputs, tmp_path):
    manifest_path, sweep_path = run_outputs
    slower = _slower_copy(tmp_path, 1.5)
    md = write_report(tmp_path / "report", benchmarks=[slower], baseline=SAVED, manifests=[manifest_path], sweeps=[sweep_path])
    text = md.read_text()
    assert "REGRESSION" in text and "| layer" in text.replace("|   layer", "| layer")
    for png in ("format_map_run.png", "pareto_sweep.png"):
        assert (md.parent / png).stat().st_size > 1000 and png in text


def test_report_shows_a_manifests_fidelity_block(run_outputs, tmp_path):
    """A manifest that carries measured fidelity gets its table; one without gets none (control)."""
    from vlq.fidelity.metrics import FidelityMetrics
    from vlq.manifest.manifest import Manifest

    manifest_path, _ = run_outputs
    plain = Manifest.load(manifest_path)
    metrics = FidelityMetrics(tokens=100, kld_mean=0.0123, kld_median=0.01, kld_p99=0.05, kld_max=0.09, same_top_rate=0.9,
                              same_top_stderr=0.03, nll_base=2.0, nll_quant=2.01, ppl_ratio=1.01, mean_ln_ppl_ratio=0.00995,
                              mean_delta_p=-0.001, data_source="heldout:test", data_kind="text", measurement_point="fake_quant")
    measured = plain.with_fidelity(metrics).save(tmp_path / "measured" / "manifest.json")
    assert Manifest.load(measured).fidelity == (metrics,)  # the block round-trips through JSON
    text = write_report(tmp_path / "report", manifests=[measured]).read_text()
    assert "Fidelity to BF16" in text and "0.0123" in text and "heldout:test" in text
    control = write_report(tmp_path / "control", manifests=[manifest_path]).read_text()
    assert "Fidelity to BF16" not in control


# ---- plots of any benchmark run --------------------------------------------------------------------

PLAIN_BENCHMARK = "test_search_tiny_cpu and fp8+int8_sq-8b-gradient-extract"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """A real ``pytest benchmarks/... --benchmark-save`` on CPU (one tiny search), saved under tmp_path."""
    storage = tmp_path_factory.mktemp("benchmarks")
    # a plain run, also when this test runs in an xdist worker (pytest-benchmark saves nothing under xdist)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_search_benchmarks.py", "-k", PLAIN_BENCHMARK, "-q", "-p", "no:xdist",
         "-p", "no:cacheprovider", f"--benchmark-storage=file://{storage}", "--benchmark-save=plain"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = sorted(storage.rglob("*_plain.json"))
    assert len(saved) == 1, (saved, done.stdout[-2000:])
    return saved[0]


def _pngs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.glob("*.png")}


def _is_picture(path: Path) -> bool:
    """A PNG that PIL reads, of a real figure's size, not a blank canvas."""
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        return image.format == "PNG" and image.width >= 400 and image.height >= 150 and (colors is None or len(colors) > 8)


def _without(path: Path, dest: Path, keys) -> Path:
    data = json.loads(path.read_text())
    for bench in data["benchmarks"]:
        for key in keys:
            bench["extra_info"].pop(key, None)
    dest.write_text(json.dumps(data))
    return dest


def test_a_plain_benchmark_run_draws_phases_and_memory(plain_run, tmp_path):
    """`pytest benchmarks/ --benchmark-save` then `vlq report`: a phase-stacked search time and a peak-memory
    picture, and a table whose time column says it is a search's."""
    _, rows = load_benchmarks(plain_run)
    assert [r.measures for r in rows] == ["search"] and rows[0].settings["extension_phase"] == "none"
    assert rows[0].extension_build_s == 0 and rows[0].calibrate_s > 0 and rows[0].peak_rss_gib > 0
    md = write_report(tmp_path / "report", benchmarks=[plain_run])
    text, pngs = md.read_text(), _pngs(md.parent)
    assert set(pngs) == {f"phases_{plain_run.stem}.png", f"memory_{plain_run.stem}.png"}
    assert all(_is_picture(p) and name in text for name, p in pngs.items())
    assert "| search s" in text.replace("|   search s", "| search s") and "No phase plot" not in text


def test_a_baseline_draws_before_and_after(plain_run, tmp_path):
    """``--baseline``: a before/after picture beside the table, the regression marked.  Control: a baseline
    that shares no benchmark draws nothing and says so."""
    data = json.loads(plain_run.read_text())
    for bench in data["benchmarks"]:
        bench["stats"]["mean"] *= 1.5
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(data))
    md = write_report(tmp_path / "report", benchmarks=[slower], baseline=plain_run)
    text, pngs = md.read_text(), _pngs(md.parent)
    picture = pngs[f"before_after_{plain_run.stem}.png"]
    assert _is_picture(picture) and picture.name in text and "REGRESSION" in text

    for bench in data["benchmarks"]:
        bench["name"] += "-renamed"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    control = write_report(tmp_path / "control", benchmarks=[other], baseline=plain_run)
    assert not any(n.startswith("before_after") for n in _pngs(control.parent))
    assert "No benchmark appears in both runs" in control.read_text()


def test_a_run_without_phase_times_or_memory_draws_no_empty_picture(plain_run, tmp_path):
    """No phase times: no phase plot, and the report says why (the memory plot still drawn); no memory either:
    neither plot.  Control: the same run with its keys draws both (test above)."""
    bare = _without(plain_run, tmp_path / "no-phases.json", ("calibrate_s", "score_s", "solve_s", "extension_build_s"))
    md = write_report(tmp_path / "report", benchmarks=[bare])
    assert set(_pngs(md.parent)) == {"memory_no-phases.png"} and "No phase plot" in md.read_text()
    barer = _without(bare, tmp_path / "nothing.json", ("peak_rss_gib", "peak_gpu_gib", "peak_gpu_own_gib"))
    md = write_report(tmp_path / "bare", benchmarks=[barer])
    text = md.read_text()
    assert _pngs(md.parent) == {} and "No phase plot" in text and "No memory plot" in text


def test_time_columns_say_what_was_measured():
    """A saved run from before benchmarks named their measured action: its fidelity measurement, sweep and
    search each get their own time column.  Control: the same fidelity row marked as a search goes back under
    "search s", so the heading follows what the row says it measures."""
    _, rows = load_benchmarks(MIXED_OLD)
    assert [r.measures for r in rows] == ["fidelity", "sweep", "search"]
    table = benchmark_table(rows)
    assert "fidelity measurement s" in table and "sweep s" in table
    search_table = table[table.index("**search**"):]
    assert "search s" in search_table and "test_fidelity_3b_gpu" not in search_table
    relabeled = [dataclasses.replace(r, measures="search") if r.measures == "fidelity" else r for r in rows]
    table = benchmark_table(relabeled)
    assert "fidelity measurement s" not in table and "test_fidelity_3b_gpu" in table[table.index("**search**"):]


def test_report_keeps_working_on_every_committed_run(tmp_path):
    """Every ``reports/benchmarks/*.json`` (H200 saves; some are hand-written summaries, not pytest-benchmark
    files) in one report against a baseline: tables, phase, memory and before/after pictures, the summaries
    named as such."""
    saved = sorted((REPO / "reports" / "benchmarks").glob("*.json"))
    md = write_report(tmp_path / "report", benchmarks=saved, baseline=SAVED)
    text, pngs = md.read_text(), _pngs(md.parent)
    assert {"phases_h200-3b.png", "memory_h200-3b.png", "before_after_h200-3b.png", "phases_h200-sweep-scaling.png"} <= set(pngs)
    assert all(_is_picture(p) and name in text for name, p in pngs.items())
    assert "h200-2026-12-01e.json is not a pytest-benchmark save" in text and "fidelity measurement s" in text


def test_unreadable_benchmark_files_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(VlqError, match="no such file"):
        write_report(tmp_path / "missing", benchmarks=[tmp_path / "nope.json"])
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(VlqError, match="is not JSON"):
        write_report(tmp_path / "broken", benchmarks=[SAVED, broken])
    with pytest.raises(VlqError, match="--baseline .* is not a pytest-benchmark save"):
        write_report(tmp_path / "summary", benchmarks=[SAVED], baseline=REPO / "reports" / "benchmarks" / "h200-2026-12-01e.json")
    assert not any((tmp_path / name).exists() for name in ("missing", "broken", "summary"))
