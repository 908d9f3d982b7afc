"""`vlq report`: tables and plots from saved benchmark JSON, manifests and sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlq import pipeline
from vlq.inputs import RunFolder
from vlq.pipeline import fresh_copy
from vlq.report import compare_runs, load_benchmarks, write_report
from vlq.schemes import Scheme

SAVED = Path(__file__).resolve().parent.parent / "reports" / "benchmarks" / "h200-3b.json"


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
    assert not any(row[-1] for row in compare_runs(base, same))
    assert all(row[-1] for row in compare_runs(base, slow))


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
    from vlq.fidelity import FidelityMetrics
    from vlq.manifest import Manifest

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
