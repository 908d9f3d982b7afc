"""Scaling curves (one knob at a time) and the score-once sweep, recorded like the other benchmarks.

Grid runs are `slow` on CPU (tiny model) and `gpu` for the 3B architecture.  Each name carries
``scale-<knob>`` so `vlq report` can draw time and memory against that knob.
"""

from __future__ import annotations

import copy
import gc

import pytest

from vlq.calibration import synthetic_batches
from vlq.schemes import Scheme
from vlq.search import search_lm_only
from vlq import pipeline
from vlq.inputs import RunFolder

from .test_search_benchmarks import _record

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
    ceiling = min(loaded.config.vision_start_token_id, loaded.config.image_token_id, loaded.config.video_token_id) - 1
    return synthetic_batches(vocab_size=loaded.vocab_size, num_batches=max(scheme.num_calib_steps, scheme.num_score_steps),
                             batch_size=scheme.batch_size, seq_len=scheme.seq_len, max_token_id=ceiling)


def _run_one(benchmark, pristine, scheme, device_name):
    cal = _synthetic_for(pristine, scheme)
    holder = {}

    def setup():
        holder["loaded"] = copy.deepcopy(pristine)
        return (holder["loaded"], scheme, cal), {}

    result = benchmark.pedantic(search_lm_only, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
    assert result.is_satisfied
    _record(benchmark, result, cal, device_name)
    holder.clear()
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("item", CPU_GRID, ids=_grid_id)
def test_scaling_tiny_cpu(benchmark, pristine_vlm, item):
    _run_one(benchmark, pristine_vlm, Scheme(**{**BASE_CPU, **item[1]}), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("item", GPU_GRID, ids=_grid_id)
def test_scaling_3b_gpu(benchmark, gpu_pristine_vlm, item):
    import torch

    _run_one(benchmark, gpu_pristine_vlm, Scheme(**{**BASE_GPU, **item[1]}), torch.cuda.get_device_name(0))
    torch.cuda.empty_cache()


SWEEP_TARGETS = (8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.75)


def _sweep(benchmark, pristine, scheme, cal, tmp_path, device_name):
    """One full search, then 8 targets decided, exported and verified; ratios in extra_info."""
    holder = {}

    def run():
        holder["sweep"] = pipeline.sweep(pristine, scheme, cal, SWEEP_TARGETS, RunFolder(tmp_path / "sweep"), overwrite=True)
        return holder["sweep"]

    sweep = benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    assert all(p.verified for p in sweep.points)
    benchmark.extra_info.update(
        variant=f"sweep-{len(SWEEP_TARGETS)}-targets-" + "+".join(scheme.formats),
        device=device_name,
        search_s=round(sweep.search_s, 3),
        decisions_s=round(sweep.decisions_s, 3),
        total_s=round(sweep.total_s, 3),
        decisions_over_one_search=round(sweep.decisions_s / sweep.search_s, 3),
        total_over_one_search=round(sweep.total_s / sweep.search_s, 3),
        goal_decisions_le=1.2,
        goal_total_le=1.6,
        targets=list(SWEEP_TARGETS),
    )


def test_sweep_tiny_cpu(benchmark, pristine_vlm, calibration, tmp_path):
    scheme = Scheme(formats=("fp8", "int4_awq"), target_bits=8.0, num_calib_steps=2, num_score_steps=2, seq_len=32)
    _sweep(benchmark, pristine_vlm, scheme, calibration, tmp_path, "cpu")


@pytest.mark.gpu
def test_sweep_3b_gpu(benchmark, gpu_pristine_vlm, tmp_path):
    import torch

    scheme = Scheme(formats=("fp8", "nvfp4"), target_bits=8.0, num_calib_steps=32, num_score_steps=32, seq_len=512)
    _sweep(benchmark, gpu_pristine_vlm, scheme, _synthetic_for(gpu_pristine_vlm, scheme), tmp_path, torch.cuda.get_device_name(0))
    torch.cuda.empty_cache()
