"""Search time and memory, one measured search per (formats, method, strategy).

CPU lane: the tiny model (CI-friendly, seconds).  `-m gpu`: the full-size 3B architecture.
Each benchmark runs one search through ``vlq.pipeline.search`` (guards and manifest checks
included; `pedantic`, one round, no warm-up) on a fresh copy and records phase times, peak RSS /
peak GPU memory, achieved bits and the settings with the ``record_benchmark`` fixture.
Targets are compared across saved runs (`--benchmark-compare`), never asserted as timers.
"""

from __future__ import annotations

import gc

import pytest

from vlq import pipeline
from vlq.data.calibration import synthetic_text_calibration
from vlq.pipeline import fresh_copy
from vlq.search.scheme import Scheme

CPU_VARIANTS = [
    Scheme(formats=f, target_bits=b, method=m, strategy=s, num_calib_steps=4, num_score_steps=4, seq_len=64)
    for f, b in ((("fp8", "int4_awq"), 6.0), (("fp8", "int8_sq"), 8.0))
    for m in ("gradient", "kl_div")
    for s in ("extract", "mask")
]
GPU_VARIANTS = [
    Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, method=m, strategy=s, num_calib_steps=n, num_score_steps=n, seq_len=512)
    for m, n in (("gradient", 32), ("kl_div", 2))
    for s in ("extract", "mask")
]


def _bench(benchmark, record_benchmark, pristine, scheme, calibration):
    """One measured ``pipeline.search`` on a fresh copy (made outside the measurement)."""

    def setup():
        return (fresh_copy(pristine), scheme, calibration), {}

    searched = benchmark.pedantic(pipeline.search, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
    result = searched.result
    assert result.is_satisfied and result.achieved_bits <= scheme.target_bits + 1e-9
    assert all(c.ok for c in searched.checks)
    record_benchmark(result)
    del searched, result
    gc.collect()


@pytest.mark.parametrize("scheme", CPU_VARIANTS, ids=lambda s: s.id)
def test_search_tiny_cpu(benchmark, record_benchmark, pristine_vlm, scheme):
    _bench(benchmark, record_benchmark, pristine_vlm, scheme, pipeline.calibrate(pristine_vlm, scheme))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", GPU_VARIANTS, ids=lambda s: s.id)
def test_search_3b_gpu(benchmark, record_benchmark, gpu_pristine_vlm, scheme):
    import torch

    loaded = gpu_pristine_vlm
    cal = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=scheme.num_calib_steps,
                                     seq_len=scheme.seq_len)
    _bench(benchmark, record_benchmark, loaded, scheme, cal)
    torch.cuda.empty_cache()
