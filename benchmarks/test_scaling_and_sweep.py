"""Scaling curves (one knob at a time) and the score-once sweep, recorded like the other benchmarks.

Grid runs are `slow` on CPU (tiny model) and `gpu` for the 3B architecture.  Each name carries
``scale-<knob>`` so `vlq report` can draw time and memory against that knob.
"""

from __future__ import annotations

import gc

import pytest

from vlq import pipeline
from vlq.data.calibration import synthetic_text_calibration
from vlq.inputs.requests import RunFolder
from vlq.pipeline import fresh_copy
from vlq.search.accounting import PeakRss
from vlq.search.scheme import Scheme

BASE_CPU = dict(formats=("fp8", "int4_awq"), target_bits=6.0, num_calib_steps=2, num_score_steps=2, seq_len=64, batch_size=1)
CPU_GRID = (
    [("num_score_steps", dict(num_score_steps=n)) for n in (1, 2, 4, 8)]
    + [("seq_len", dict(seq_len=n)) for n in (32, 64, 128, 256)]
    + [("batch_size", dict(batch_size=n)) for n in (1, 2, 4)]
    + [("num_formats", dict(formats=f, target_bits=8.0)) for f in (("fp8",), ("fp8", "int4_awq"), ("fp8", "int4_awq", "int8_sq"))]
)
BASE_GPU = dict(formats=("fp8", "nvfp4"), target_bits=6.0, num_calib_steps=8, num_score_steps=8, seq_len=512, batch_size=1)
GPU_GRID = (
    [("num_score_steps", dict(num_score_steps=n, num_calib_steps=n)) for n in (4, 16)]
    + [("seq_len", dict(seq_len=n)) for n in (256, 1024)]
    + [("batch_size", dict(batch_size=n)) for n in (2,)]
    + [("num_formats", dict(formats=f)) for f in (("nvfp4",),)]
)


def _grid_id(item):
    knob, change = item
    value = change.get(knob, "+".join(change.get("formats", ())))
    return f"scale-{knob}-{value}"


def _synthetic_for(loaded, scheme):
    """Seeded synthetic rows below the vision markers, as many as the scheme's steps need."""
    return synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, batch_size=scheme.batch_size,
                                      num_batches=max(scheme.num_calib_steps, scheme.num_score_steps), seq_len=scheme.seq_len)


def _run_one(benchmark, record_benchmark, pristine, scheme):
    cal = _synthetic_for(pristine, scheme)

    def setup():
        return (fresh_copy(pristine), scheme, cal), {}

    searched = benchmark.pedantic(pipeline.search, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
    assert searched.result.is_satisfied
    record_benchmark(searched.result)
    del searched
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("item", CPU_GRID, ids=_grid_id)
def test_scaling_tiny_cpu(benchmark, record_benchmark, pristine_vlm, item):
    _run_one(benchmark, record_benchmark, pristine_vlm, Scheme(**{**BASE_CPU, **item[1]}))


@pytest.mark.gpu
@pytest.mark.parametrize("item", GPU_GRID, ids=_grid_id)
def test_scaling_3b_gpu(benchmark, record_benchmark, gpu_pristine_vlm, item):
    import torch

    _run_one(benchmark, record_benchmark, gpu_pristine_vlm, Scheme(**{**BASE_GPU, **item[1]}))
    torch.cuda.empty_cache()


SWEEP_TARGETS = (8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.75)


def _sweep(benchmark, record_benchmark, pristine, scheme, cal, tmp_path, *, export_targets=True):
    """One full search, then 8 targets decided and measured (fidelity on held-out text and image+text);
    ``export_targets`` exported and verified.  Ratios to the one search in extra_info; the issue-11 goal
    (measured sweep <= 1.5x one search) recorded, never asserted."""

    peak_rss: list[int] = []

    def run():
        with PeakRss() as rss:
            sweep = pipeline.sweep(pristine, scheme, cal, SWEEP_TARGETS, RunFolder(tmp_path / "sweep"), overwrite=True,
                                   export_targets=export_targets)
        peak_rss.append(rss.peak)
        return sweep

    sweep = benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    assert [p.target_bits for p in sweep.points] == list(SWEEP_TARGETS)
    exported = [p for p in sweep.points if p.export_path is not None]
    assert all(p.verified for p in exported)
    assert all(m.kld_mean >= 0 for p in sweep.points for m in p.manifest.fidelity)
    text_kld = {p.target_bits: next(m.kld_mean for m in p.manifest.fidelity if m.data_kind == "text") for p in sweep.points}
    record_benchmark(
        measures="sweep",
        device=pristine.device,
        peak_rss_gib=round(peak_rss[0] / 2**30, 3),
        variant=f"sweep-{len(SWEEP_TARGETS)}-targets-" + "+".join(scheme.formats) + f"-{len(exported)}-exported",
        search_s=round(sweep.search_s, 3),
        reference_s=round(sweep.reference_s, 3),
        fidelity_rows=sweep.rows,
        measure_s_by_target={p.target_bits: round(p.measure_s, 3) for p in sweep.points},
        decisions_s=round(sweep.decisions_s, 3),
        measured_s=round(sweep.measured_s, 3),
        total_s=round(sweep.total_s, 3),
        decisions_over_one_search=round(sweep.decisions_s / sweep.search_s, 3),
        measured_over_one_search=round(sweep.measured_s / sweep.search_s, 3),
        total_over_one_search=round(sweep.total_s / sweep.search_s, 3),
        goal_measured_le=1.5,
        targets=list(SWEEP_TARGETS),
        exported=[p.target_bits for p in exported],
        text_kld_by_target=text_kld,
    )
    print("[sweep]", dict(search_s=round(sweep.search_s, 2), reference_s=round(sweep.reference_s, 2), measured_s=round(sweep.measured_s, 2),
                          total_s=round(sweep.total_s, 2), text_kld=text_kld), flush=True)


def test_sweep_tiny_cpu(benchmark, record_benchmark, pristine_vlm, calibration, tmp_path):
    scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=8.0, num_calib_steps=2, num_score_steps=2, seq_len=32)
    _sweep(benchmark, record_benchmark, pristine_vlm, scheme, calibration, tmp_path)


@pytest.mark.gpu
def test_measured_sweep_3b_gpu(benchmark, record_benchmark, gpu_pristine_vlm, tmp_path):
    """Issue 11's target: 8 targets measured (no exports: they are opt-in) in <= 1.5x one search, that search
    being 16+16 rows at batch 1 with checkpointing (vlq's default when the target was set; H200 2026-12-01e:
    1.46x of 24.7 s).  Against today's auto-batched default search the same measurement is 2.28x
    (``scripts/profile_sweep_targets.py --auto-batch``; reports/README.md)."""
    import torch

    scheme = Scheme(formats=("fp8", "nvfp4"), target_bits=8.0, num_calib_steps=16, num_score_steps=16, seq_len=512)
    _sweep(benchmark, record_benchmark, gpu_pristine_vlm, scheme, _synthetic_for(gpu_pristine_vlm, scheme), tmp_path,
           export_targets=())
    torch.cuda.empty_cache()
