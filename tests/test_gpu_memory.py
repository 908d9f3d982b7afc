"""`pytest -m gpu`: the tests that fill a GPU's memory — the bigger Qwen2.5-VL shapes (random weights)
search, export and verify; a deliberate CUDA OOM is caught and freed.  One file, so under
``pytest -n N`` (``--dist loadfile``, conftest.py) they never run beside each other on a shared GPU.

Each shape is built on the GPU, planned by ``vlq.search.plan`` (batch 1 with ModelOpt's gradient checkpointing: the
setting measured on every size; auto batching of the big shapes is benchmarked, not yet gated), searched through
:mod:`vlq.pipeline` (guards and manifest checks required), exported and checked on disk; then the model
is freed.  72B needs at least two H200-class GPUs (``vlq plan``): with fewer it skips with that reason, with
them it is split over the GPUs (``vlq.search.placement``; random weights built in host memory, then dispatched).
The measured peak is recorded beside the planned one (``record_property``), never asserted.
"""

from __future__ import annotations

import gc
import re
import shutil

import pytest

from vlq import pipeline
from vlq.data.calibration import synthetic_text_calibration
from vlq.runtime.hardware import visible_gpus
from vlq.inputs.requests import random_shape_config
from vlq.pipeline import fresh_copy
from vlq.search.plan import GIB, plan_search
from vlq.search.scheme import Scheme

pytestmark = pytest.mark.gpu

ROWS = Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, num_calib_steps=8, num_score_steps=8, seq_len=512)
SHAPES = [pytest.param(name, id=name.split("-")[2])
          for name in ("qwen2.5-vl-7b-random", "qwen2.5-vl-32b-random", "qwen2.5-vl-72b-random")]


@pytest.mark.parametrize("shape", SHAPES)
def test_family_shape_searches_exports_and_verifies(shape, tmp_path, record_property):
    import torch

    from vlq.data.models import load_vlm
    from vlq.search.placement import place

    plan = plan_search(random_shape_config(shape), ROWS, name=shape, gpus=visible_gpus())
    if not plan.fits:
        pytest.skip(f"{shape} needs {plan.devices_needed} GPUs of {plan.budget_bytes / GIB:.0f} GiB "
                    f"(planned peak {plan.memory.peak / GIB:.0f} GiB); {len(plan.devices)} visible")
    # several GPUs needed and visible: split (vlq.search.placement; 72B over two H200s); one GPU: all on it
    placement = place(plan.shape, [f"cuda:{i}" for i in range(plan.devices_needed)], budget_bytes=plan.budget_bytes)
    gc.collect()
    torch.cuda.empty_cache()
    loaded = load_vlm(shape, device="cuda", device_map=dict(placement.device_map) if placement.split else None)
    searched = exported = None
    try:
        scheme = plan.scheme
        calibration = synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, batch_size=scheme.batch_size,
                                                 num_batches=max(scheme.num_calib_steps, scheme.num_score_steps),
                                                 seq_len=scheme.seq_len)
        searched = pipeline.search(loaded, scheme, calibration)  # vision / lm_head guards and manifest checks required
        exported = pipeline.export(searched, tmp_path / "checkpoint")
        checks = searched.checks + exported.checks
        failed = [(c.name, c.problems[:3]) for c in checks if not c.ok]
        peak = searched.result.peak_gpu_own_bytes / GIB  # this model's search; other tests' residents excluded
        record_property("peak_gpu_gib", round(peak, 2))
        record_property("planned_peak_gib", round(plan.memory.peak / GIB, 2))
        record_property("search_s", round(searched.result.times.total_s, 2))
        record_property("peak_gib_per_gpu", [round(b / GIB, 2) for b in searched.result.peak_gpu_bytes_per_device])
        print(f"\n[family] {shape}: batch {scheme.batch_size}, checkpointing {scheme.gradient_checkpointing}, "
              f"{searched.result.times}, peak {peak:.1f} GiB (planned {plan.memory.peak / GIB:.1f}), "
              f"formats {searched.manifest.format_counts()}", flush=True)
        assert not failed, failed
        assert searched.result.is_satisfied and searched.result.achieved_bits <= scheme.target_bits + 1e-9
        assert len(searched.manifest.groups) > 0
    finally:
        del loaded, searched, exported
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(tmp_path / "checkpoint", ignore_errors=True)  # 32B: 26 GiB; the lane's disk is shared


def test_gpu_oom_names_the_setting_and_frees_the_memory(gpu_pristine_vlm):
    """A real CUDA OOM on the 3B model (64 rows x 32k tokens) -> ResourceError; memory comes back."""
    import torch

    from vlq.data.calibration import synthetic_text_calibration
    from vlq.runtime.errors import ResourceError
    from vlq.search.scheme import Scheme

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    calibration = synthetic_text_calibration(gpu_pristine_vlm.config, vocab_size=gpu_pristine_vlm.vocab_size, num_batches=1,
                                             batch_size=64, seq_len=32768)
    scheme = Scheme(formats=("fp8",), target_bits=12.0, num_calib_steps=1, num_score_steps=1, batch_size=64, seq_len=32768)
    loaded = fresh_copy(gpu_pristine_vlm)
    # catch it by hand: pytest's ExceptionInfo would keep the traceback, whose frames hold the model
    try:
        pipeline.search(loaded, scheme, calibration)
    except ResourceError as exc:
        message, pinned = str(exc), (exc.__cause__, exc.__context__)
    else:
        pytest.fail("a 64 x 32k-token search did not run out of GPU memory")
    assert re.search(r"GPU out of memory.*batch_size=64, seq_len=32768.*Lower batch_size or seq_len", message, re.S), message
    assert pinned == (None, None), "the error must not pin activations"
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    leaked = torch.cuda.memory_allocated() - before
    assert leaked < 256 * 2**20, f"{leaked / 2**30:.2f} GiB still allocated after the OOM"
