"""Task-accuracy evaluation time and memory: lm-eval on a fake-quantized model (point a), one measured action each.

CPU: the shipped ``vlq_sequences`` (300 items, 1200 loglikelihood requests) on tiny-trained searched FP8.  GPU: the
same kind of task with 600 items on the 3B shape (random weights: timing only; the score means nothing), the
tokenizer of ``--vlq-model`` or, for a random shape without one, tiny-trained's (its ids are valid 3B ids).
Times and peaks go to ``extra_info``; nothing is asserted about them.
"""

from __future__ import annotations

import gc
import json
import time

import pytest

from vlq import pipeline
from vlq.data.models import load_vlm
from vlq.evaluation.scoring import score_tasks
from vlq.evaluation.tasks import HELDOUT_SEED_BASE, SHIPPED_TASKS, sequence_rows
from vlq.fidelity.quantized_weights import weights_quantized_once
from vlq.inputs.requests import TINY_TRAINED
from vlq.search.accounting import PeakRss
from vlq.search.scheme import Scheme

CPU_SCHEME = Scheme(formats=("fp8",), target_bits=8.0)
GPU_SCHEME = Scheme(formats=("fp8",), target_bits=8.0, num_calib_steps=16, num_score_steps=16, seq_len=512)
GPU_ITEMS = 600


def _evaluate(benchmark, record_benchmark, loaded, scheme, tokenizer, tasks, *, tasks_dir=None, device="cpu", **extra):
    import torch

    pipeline.search(loaded, scheme, pipeline.calibrate(loaded, scheme))
    cuda = loaded.device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peaks: list[int] = []

    def evaluate():
        with PeakRss() as rss, weights_quantized_once(loaded.vlm):
            scores = score_tasks(loaded.vlm, tokenizer, tasks, tasks_dir=tasks_dir)
            if cuda:
                torch.cuda.synchronize()
        peaks.append(rss.peak)
        return scores

    start = time.perf_counter()
    (score,) = benchmark.pedantic(evaluate, rounds=1, warmup_rounds=0, iterations=1)
    seconds = time.perf_counter() - start
    assert score.samples > 0 and 0 <= score.value <= 1
    info = dict(variant=f"lm-eval-{tasks[0]}-{scheme.id}", task=score.task, metric=score.metric, value=score.value,
                stderr=score.stderr, samples=score.samples, requests=4 * score.samples,
                items_per_s=round(score.samples / seconds, 2), peak_rss_gib=round(peaks[0] / 2**30, 3), **extra)
    if cuda:
        info["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    record_benchmark(measures="task accuracy", device=device, **info)
    return score


def test_task_accuracy_tiny_trained_cpu(benchmark, record_benchmark):
    loaded = load_vlm(TINY_TRAINED)
    score = _evaluate(benchmark, record_benchmark, loaded, CPU_SCHEME, loaded.tokenizer, ["vlq_sequences"])
    assert score.samples == SHIPPED_TASKS["vlq_sequences"].items


@pytest.mark.gpu
def test_task_accuracy_3b_gpu(benchmark, record_benchmark, gpu_pristine_vlm, tmp_path):
    import torch

    rows = sequence_rows(GPU_ITEMS, HELDOUT_SEED_BASE + 7)
    (tmp_path / "seq600.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = SHIPPED_TASKS["vlq_sequences"].yaml.read_text().replace("task: vlq_sequences", "task: vlq_sequences_600")
    (tmp_path / "seq600.yaml").write_text(yaml.replace(": vlq_sequences.jsonl", f": {tmp_path / 'seq600.jsonl'}"))
    tokenizer = gpu_pristine_vlm.tokenizer or load_vlm(TINY_TRAINED).tokenizer
    loaded = pipeline.fresh_copy(gpu_pristine_vlm)
    try:
        score = _evaluate(benchmark, record_benchmark, loaded, GPU_SCHEME, tokenizer, ["vlq_sequences_600"], tasks_dir=tmp_path,
                          device="cuda", tokenizer_from="model" if gpu_pristine_vlm.tokenizer else TINY_TRAINED)
        assert score.samples == GPU_ITEMS
    finally:
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
