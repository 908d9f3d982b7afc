"""The Qwen2.5-VL family on one GPU: search memory against ``vlq plan``, and the faster default search.

* ``test_search_memory_grid_3b_gpu`` — measured peak of the 3B search over batch x gradient checkpointing,
  beside the plan's estimate (the points ``vlq.search.plan``'s two coefficients are fitted to).
* ``test_family_default_search_gpu[7b|32b]`` — the default search (``--batch-size auto``) of the bigger shapes:
  time, measured peak, planned peak.
* ``test_faster_default_3b_gpu`` — one run, one process: the 128+128-row reference, vlq's default
  (16+16 rows, batch and checkpointing from the plan), raw ``mtq.auto_quantize`` at 16+16 x batch 1 and
  in the hf_ptq example's style (1024 calibration + 128 scoring rows, batch 32); time, peak and decisions
  equal to the reference, and the reference's and the default's KLD to BF16 on 32 held-out rows.  Goals (issue 13:
  default <= 10 s, >= 95% equal, KLD within 5% of the reference's, <= 24 GiB) are recorded, never asserted.

Results: ``extra_info`` and ``$VLQ_REPORT_DIR/family.json`` when set.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import pytest

from vlq import pipeline
from vlq.runtime.hardware import visible_gpus
from vlq.inputs.requests import random_shape_config
from vlq.search.plan import GIB, plan_search
from vlq.search.scheme import Scheme

from .conftest import RowPool

DEFAULT_ROWS = Scheme(formats=("fp8", "nvfp4"), target_bits=6.0, method="gradient", strategy="extract",
                      num_calib_steps=16, num_score_steps=16, seq_len=512)
GRID = [(1, True), (4, True), (1, False), (4, False), (16, False)]  # (batch, gradient checkpointing)
_RESULTS: dict[str, object] = {}


def _save(key, value):
    _RESULTS[key] = value
    out = os.environ.get("VLQ_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "family.json").write_text(json.dumps(_RESULTS, indent=1, default=str))


def _free():
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _rows(loaded, n, seq_len=512, seed=0) -> RowPool:
    from vlq.data.calibration import synthetic_text_calibration

    return RowPool(synthetic_text_calibration(loaded.config, vocab_size=loaded.vocab_size, num_batches=n, seq_len=seq_len, seed=seed))


def _calibration(loaded, rows: RowPool, scheme):
    return rows.take(vocab_size=loaded.vocab_size, **scheme.to_dict())


def _vlq_search(pristine, scheme, rows, *, copy: bool = True, references=(), phases: list | None = None):
    """A search on a private copy (``copy=False``: on ``pristine`` itself, which it quantizes — the big
    shapes, whose second copy would not fit: 32B is 62 GiB); plain results only, so the copy is freed — also
    when it fails: the error is re-raised as its text alone, since a traceback's frames would keep the copy
    on the GPU for the rest of the session (the 2026-12-01 run lost three benchmarks to one 32B OOM that way).
    ``phases``, when given, gets the search's :class:`vlq.search.search.PhaseTimes` appended."""
    loaded, searched, error = (pipeline.fresh_copy(pristine) if copy else pristine), None, None
    try:
        searched = pipeline.search(loaded, scheme, _calibration(pristine, rows, scheme))
        r = searched.result
        manifest = searched.manifest
        if phases is not None:
            phases.append(r.times)
        if references:  # point a against BF16 logits captured before: the scheme's cost, not only its decisions
            manifest = manifest.with_fidelity(*pipeline.measure_fake_quant(loaded, references))
        return manifest, r.times.total_s, r.peak_gpu_own_bytes / GIB  # the pristine copy excluded
    except Exception as exc:  # re-raised below without its frames
        error = f"{scheme.id} batch {scheme.batch_size}: {type(exc).__name__}: {exc}"
    finally:
        del loaded, searched
        _free()
    raise RuntimeError(error)


def _raw_modelopt(pristine, scheme, rows):
    """``mtq.auto_quantize`` on the whole VLM as ModelOpt's example calls it (vision disabled and
    cost-excluded), none of vlq's wrapper; returns decisions by full module name."""
    import modelopt.torch.quantization as mtq
    import torch

    from vlq.search.losses import causal_lm_loss
    from vlq.search.decisions import decisions_from_state
    from vlq.search.forward import make_forward_step

    loaded = pipeline.fresh_copy(pristine)
    try:
        data = list(_calibration(pristine, rows, scheme).to("cuda").batches)
        forward = make_forward_step(loaded, "mask")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, state = mtq.auto_quantize(
            loaded.vlm, constraints={"effective_bits": scheme.target_bits,
                                     "cost": {"excluded_module_name_patterns": ["*visual*", "*lm_head*"]}},
            quantization_formats=scheme.modelopt_formats(), data_loader=data, forward_step=forward,
            loss_func=causal_lm_loss, disabled_layers=["*visual*", "*lm_head*"],
            num_calib_steps=scheme.num_calib_steps, num_score_steps=scheme.num_score_steps, method="gradient")
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / GIB
        decisions = {g.name: g.chosen for g in decisions_from_state(state, name_prefix="")}
        return decisions, seconds, peak
    finally:
        del loaded
        _free()


def _agreement(reference, decisions):
    ref = {g.name: g.chosen for g in reference.groups}
    shared = set(ref) & set(decisions)
    return (sum(ref[n] == decisions[n] for n in shared) / len(shared) if shared else float("nan")), len(shared), len(ref)


@pytest.mark.gpu
def test_search_memory_grid_3b_gpu(benchmark, record_benchmark, gpu_pristine_vlm):
    config = random_shape_config("qwen2.5-vl-3b-random")
    rows = _rows(gpu_pristine_vlm, 16)
    _vlq_search(gpu_pristine_vlm, DEFAULT_ROWS.with_(num_calib_steps=1, num_score_steps=1), rows)  # CUDA extensions, once
    table = []

    def grid():
        for batch, checkpointing in GRID:
            scheme = DEFAULT_ROWS.with_(batch_size=batch, gradient_checkpointing=checkpointing,
                                        num_calib_steps=-(-16 // batch), num_score_steps=-(-16 // batch))
            planned = plan_search(config, scheme, name="3b")
            _, seconds, peak = _vlq_search(gpu_pristine_vlm, scheme, rows)
            m = planned.memory
            table.append(dict(batch=batch, gradient_checkpointing=checkpointing, search_s=round(seconds, 2),
                              peak_gib=round(peak, 3), planned_gib=round(m.peak / GIB, 3), weights_gib=round(m.weights / GIB, 3),
                              state_gib=round(m.search_state / GIB, 3), per_row_gib=round(m.per_row / GIB, 3)))
            print("[grid]", table[-1], flush=True)

    benchmark.pedantic(grid, rounds=1, iterations=1)
    record_benchmark(measures="search grid", device="cuda", variant="memory-grid-3b", grid=table)
    _save("memory_grid_3b", table)
    assert len(table) == len(GRID) and all(r["peak_gib"] > r["weights_gib"] for r in table)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen2.5-vl-7b-random", "qwen2.5-vl-32b-random"], ids=["7b", "32b"])
def test_family_default_search_gpu(benchmark, record_benchmark, shape):
    import torch

    from vlq.data.models import build_random_shape

    _free()
    # searched in place: a private copy doubled the weights, which is what ran 32B out of memory on an H200
    # (2026-12-01: 67 GiB pristine + 67 GiB copy) and made 7B's earlier total peak look 20 GiB over plan
    planned = plan_search(random_shape_config(shape), DEFAULT_ROWS, name=shape, gpus=visible_gpus(), auto_batch=True)
    print("\n".join(planned.lines()), flush=True)
    start = time.perf_counter()
    pristine = build_random_shape(shape, device="cuda")
    build_s = time.perf_counter() - start
    rows = _rows(pristine, 16)
    try:
        phases: list = []
        result = benchmark.pedantic(_vlq_search, args=(pristine, planned.scheme, rows), kwargs=dict(copy=False, phases=phases),
                                    rounds=1, iterations=1)
        manifest, seconds, peak = result
        times = phases[0]  # the first search in this process: ModelOpt's CUDA extensions are its own phase
        row = dict(shape=shape, build_s=round(build_s, 1), search_s=round(seconds, 2), peak_gib=round(peak, 3),
                   extension_build_s=round(times.extension_build_s, 2), calibrate_s=round(times.calibrate_s, 2),
                   score_s=round(times.score_s, 2), solve_s=round(times.solve_s, 2),
                   planned_gib=round(planned.memory.peak / GIB, 3), batch=planned.scheme.batch_size,
                   gradient_checkpointing=planned.scheme.gradient_checkpointing,
                   steps=[planned.scheme.num_calib_steps, planned.scheme.num_score_steps],
                   formats=manifest.format_counts(), gpu=torch.cuda.get_device_name(0))
        print("[family]", row, flush=True)
        record_benchmark(measures="search", device="cuda", variant=f"default-search-{shape}", **row)
        _save(f"default_{shape}", row)
    finally:
        del pristine
        _free()
    assert row["peak_gib"] > 0


@pytest.mark.gpu
def test_faster_default_3b_gpu(benchmark, record_benchmark, gpu_pristine_vlm):
    pristine = gpu_pristine_vlm
    config = random_shape_config("qwen2.5-vl-3b-random")
    rows = _rows(pristine, 1024)
    _vlq_search(pristine, DEFAULT_ROWS.with_(num_calib_steps=1, num_score_steps=1), rows)  # CUDA extensions, once
    table = []

    def add(row):
        # each row printed and saved as it completes: a run cut short by its time limit keeps what it measured
        # (2026-12-01: the whole table was printed at the end, and a timeout lost the default's row)
        table.append(row)
        print("[faster default]", row, flush=True)
        _save("faster_default_3b", dict(table=table, complete=False))

    # the 128+128-row reference at batch 1 without checkpointing: the same decisions as with it
    # (tests/test_plan.py shows checkpointing changes no decision), in less time
    reference_scheme = DEFAULT_ROWS.with_(num_calib_steps=128, num_score_steps=128, gradient_checkpointing=False)
    heldout = pipeline.fidelity_references(pristine, DEFAULT_ROWS, kinds=("text",))  # 32 held-out rows
    reference, ref_s, ref_gib = _vlq_search(pristine, reference_scheme, rows, references=heldout)
    ref_kld = reference.fidelity[0].kld_mean
    add(dict(run="reference 128+128 rows x batch 1 (vlq, no checkpointing)", search_s=round(ref_s, 1),
             peak_gib=round(ref_gib, 2), agreement=1.0, kld=round(ref_kld, 5), kld_over_reference=1.0))

    planned = plan_search(config, DEFAULT_ROWS, name="3b", gpus=visible_gpus(), auto_batch=True)

    def default():
        return _vlq_search(pristine, planned.scheme, rows, references=heldout)

    manifest, seconds, peak = benchmark.pedantic(default, rounds=1, iterations=1)
    s = planned.scheme
    add(dict(run=f"vlq default 16+16 rows (batch {s.batch_size}, checkpointing {'on' if s.gradient_checkpointing else 'off'})",
             search_s=round(seconds, 1), peak_gib=round(peak, 2), planned_gib=round(planned.memory.peak / GIB, 2),
             agreement=round(_agreement(reference, {g.name: g.chosen for g in manifest.groups})[0], 4),
             kld=round(manifest.fidelity[0].kld_mean, 5), kld_over_reference=round(manifest.fidelity[0].kld_mean / ref_kld, 4)))
    default_row = table[-1]
    goal = dict(seconds=10.0, agreement=0.95, peak_gib=24.0, kld_over_reference=1.05)
    met = (default_row["search_s"] <= goal["seconds"] and default_row["agreement"] >= goal["agreement"]
           and default_row["peak_gib"] <= goal["peak_gib"] and default_row["kld_over_reference"] <= goal["kld_over_reference"])
    for label, raw in (("raw mtq.auto_quantize 16+16 x batch 1", DEFAULT_ROWS),
                       ("raw mtq.auto_quantize, hf_ptq style 1024 + 128 rows x batch 32",
                        DEFAULT_ROWS.with_(num_calib_steps=32, num_score_steps=4, batch_size=32))):
        decisions, raw_s, raw_gib = _raw_modelopt(pristine, raw, rows)
        agree, shared, total = _agreement(reference, decisions)
        add(dict(run=label, search_s=round(raw_s, 1), peak_gib=round(raw_gib, 2), agreement=round(agree, 4),
                 groups_compared=f"{shared}/{total}"))
    _, old_s, old_gib = _vlq_search(pristine, DEFAULT_ROWS, rows)
    add(dict(run="vlq previous default 16+16 x batch 1 (checkpointing on)", search_s=round(old_s, 1), peak_gib=round(old_gib, 2)))
    record_benchmark(measures="search and fidelity", device="cuda", variant="faster-default-3b", table=table, goal=goal, goal_met=met)
    _save("faster_default_3b", dict(table=table, goal=goal, goal_met=met, complete=True))
    print("[faster default]", json.dumps(table, indent=1), "goal met:", met, flush=True)
    assert 0.0 <= default_row["agreement"] <= 1.0
