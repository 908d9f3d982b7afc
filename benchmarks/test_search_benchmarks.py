"""Search time and memory, one measured search per (formats, method, strategy).

CPU lane: the tiny model (CI-friendly, seconds).  `-m gpu`: the full-size 3B architecture.
Each benchmark runs one search (`pedantic`, one round, no warm-up) on a fresh copy and records
phase times, peak RSS / peak GPU memory, achieved bits and the settings in ``extra_info``.
Targets are compared across saved runs (`--benchmark-compare`), never asserted as timers.
"""

from __future__ import annotations

import copy
import gc

import pytest

from vlq.calibration import synthetic_batches
from vlq.schemes import Scheme
from vlq.search import search_lm_only

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


def _record(benchmark, result, calibration, device_name):
    import torch

    from importlib import metadata

    scheme = result.scheme
    benchmark.extra_info.update(
        variant=scheme.id,
        calibrate_s=round(result.times.calibrate_s, 3),
        score_s=round(result.times.score_s, 3),
        solve_s=round(result.times.solve_s, 3),
        peak_rss_gib=round(result.peak_rss_bytes / 2**30, 3),
        peak_gpu_gib=None if result.peak_gpu_bytes is None else round(result.peak_gpu_bytes / 2**30, 3),
        peak_gpu_own_gib=None if result.peak_gpu_own_bytes is None else round(result.peak_gpu_own_bytes / 2**30, 3),
        effective_bits=round(result.achieved_bits, 4),
        total_score=result.total_score,
        num_calib_steps=scheme.num_calib_steps,
        num_score_steps=scheme.num_score_steps,
        batch_size=calibration.batch_size,
        seq_len=calibration.seq_len,
        formats="+".join(scheme.formats),
        device=device_name,
        torch=torch.__version__,
        transformers=metadata.version("transformers"),
        modelopt=metadata.version("nvidia-modelopt"),
    )


def _bench(benchmark, pristine, scheme, calibration, device_name):
    holder = {}

    def setup():
        holder["loaded"] = copy.deepcopy(pristine)
        return (holder["loaded"], scheme, calibration), {}

    result = benchmark.pedantic(search_lm_only, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
    assert result.is_satisfied and result.achieved_bits <= scheme.target_bits + 1e-9
    _record(benchmark, result, calibration, device_name)
    holder.clear()
    gc.collect()
    return result


@pytest.mark.parametrize("scheme", CPU_VARIANTS, ids=lambda s: s.id)
def test_search_tiny_cpu(benchmark, pristine_vlm, calibration, scheme):
    from vlq.calibration import text_batches

    cal = text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=4, seq_len=64)
    _bench(benchmark, pristine_vlm, scheme, cal, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", GPU_VARIANTS, ids=lambda s: s.id)
def test_search_3b_gpu(benchmark, gpu_pristine_vlm, scheme):
    import torch

    loaded = gpu_pristine_vlm
    cal = synthetic_batches(vocab_size=loaded.vocab_size, num_batches=scheme.num_calib_steps, seq_len=scheme.seq_len,
                            max_token_id=min(loaded.config.vision_start_token_id, loaded.config.image_token_id) - 1)
    _bench(benchmark, loaded, scheme, cal, torch.cuda.get_device_name(0))
    torch.cuda.empty_cache()
