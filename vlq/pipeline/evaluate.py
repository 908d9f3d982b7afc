"""Task accuracy of a finished run (``vlq eval``): lm-eval tasks on the BF16 model and on the quantized one at the
measurement points, recorded in the run's manifest beside the fidelity block.

* a (``fake_quant``): the saved search restored on the BF16 model (no scoring), fused scales unified as exported;
* b (``checkpoint``): the export rebuilt by the independent dequantizer (:mod:`vlq.export.dequant`);
* c (``vllm``): the export served by vLLM, through an lm-eval model that asks vlq's runner for prompt logprobs
  (:mod:`vlq.evaluation.served`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..data.models import LoadedVLM
from ..evaluation.results import TaskAccuracy, TaskScore
from ..evaluation.scoring import score_tasks
from ..evaluation.tasks import DEFAULT_TASKS, SHIPPED_TASKS, is_image_task
from ..export.export import unify_fused_scales
from ..fidelity.quantized_weights import weights_quantized_once
from ..inputs.requests import POINT_NAMES, RunFolder
from ..manifest.manifest import Manifest
from ..runtime.errors import CheckpointError, SchemeError, SearchStateError
from ..runtime.progress import SILENT, Progress
from ..runtime.runlock import writing
from .stages import calibrate, restore, saved_data_request


@dataclass(frozen=True)
class EvaluatedRun:
    """Task accuracy measured on a run folder and recorded in its manifest."""

    run: RunFolder
    manifest: Manifest  # as saved, its accuracy block included
    base: tuple[TaskScore, ...]
    accuracy: tuple[TaskAccuracy, ...]  # what this call measured, in the order of the points asked
    seconds: dict[str, float]  # per model scored: "bf16" and each point


def task_accuracy(base: Sequence[TaskScore], quantized: Sequence[TaskScore], point: str, *,
                  model_source: str = "") -> tuple[TaskAccuracy, ...]:
    """Each task and metric of ``quantized`` against the same in ``base``: recovery with both standard errors."""
    point = POINT_NAMES.get(point, point)
    by_key = {(s.task, s.metric): s for s in base}
    return tuple(TaskAccuracy.of(by_key[(q.task, q.metric)], q, point, model_source=model_source,
                                 chance=SHIPPED_TASKS[q.task].chance if q.task in SHIPPED_TASKS else None)
                 for q in quantized if (q.task, q.metric) in by_key)


def _points(points: Sequence[str]) -> list[str]:
    asked = []
    for point in points:
        if point not in POINT_NAMES:
            raise SchemeError(f"Unknown measurement point {point!r}; use fake, checkpoint or served.")
        if POINT_NAMES[point] not in asked:
            asked.append(POINT_NAMES[point])
    if not asked:
        raise SchemeError("Name at least one measurement point: fake, checkpoint or served.")
    return asked


def evaluate_run(folder: RunFolder, loaded: LoadedVLM, points: Sequence[str] = ("fake", "checkpoint"),
                 tasks: Sequence[str] = DEFAULT_TASKS, *, tasks_dir: str | Path | None = None, limit: int | None = None,
                 progress: Progress = SILENT) -> EvaluatedRun:
    """lm-eval ``tasks`` on ``loaded`` (the BF16 model the run searched; it ends up quantized when point a is asked)
    and on the quantized model at each of ``points``; recovery per task recorded in the run's manifest."""
    asked = _points(points)
    saved = Manifest.load(folder.manifest)
    if {"checkpoint", "vllm"} & set(asked) and not (folder.checkpoint / "config.json").exists():
        raise CheckpointError(f"{folder.root} has no exported checkpoint ({RunFolder.CHECKPOINT}/config.json); "
                              f"run `vlq export {folder.root}` first, or evaluate --point fake.")
    if "fake_quant" in asked and not folder.search_state.exists():
        raise SearchStateError(f"{folder.root} has no {RunFolder.SEARCH_STATE} to restore the fake-quantized model from; "
                               "evaluate --point checkpoint instead.")
    seconds: dict[str, float] = {}

    def scored(label: str, model, names=tasks, **kwargs) -> tuple[TaskScore, ...]:
        start = time.perf_counter()
        with progress.bar(f"lm-eval {', '.join(names)} ({label})"):
            result = score_tasks(model, loaded.tokenizer, names, tasks_dir=tasks_dir, limit=limit, processor=loaded.processor,
                                 **kwargs)
        seconds[label] = time.perf_counter() - start
        return result

    base = scored("bf16", loaded.vlm)
    measured: list[TaskAccuracy] = []
    # a quantizes `loaded` in place: the points from disk first
    for point in sorted(asked, key=lambda p: p == "fake_quant"):
        if point == "checkpoint":
            from ..export.dequant import dequantize_checkpoint

            built = dequantize_checkpoint(folder.checkpoint).build_model(device=loaded.device)
            try:
                quantized = scored(point, built.model)
            finally:
                built.remove_hooks()
            del built
        elif point == "vllm":
            from ..evaluation.served import served_lm

            served = [t for t in tasks if not is_image_task(t, tasks_dir)]
            if len(served) < len(tasks):
                progress.stage(f"note: point c scores text tasks only (vlq's vLLM model answers loglikelihood requests); "
                               f"{', '.join(t for t in tasks if t not in served)} not measured there")
            if not served:
                continue
            with served_lm(folder.checkpoint, loaded.tokenizer, loaded.vocab_size) as lm:
                quantized = scored(point, None, names=served, lm=lm)
        else:
            calibration = calibrate(loaded, saved.scheme, saved_data_request(saved), progress=progress)
            restore(folder, loaded, calibration=calibration, progress=progress)
            unify_fused_scales(loaded.language_model)  # as `vlq run` measures point a: fused scales as exported
            with weights_quantized_once(loaded.vlm):
                quantized = scored(point, loaded.vlm)
        measured += task_accuracy(base, quantized, point, model_source=saved.model_source)
    order = {p: i for i, p in enumerate(asked)}
    measured.sort(key=lambda a: order[a.measurement_point])
    with writing(folder) as staged:
        current = staged.manifest if staged.manifest.exists() else folder.manifest  # restore may have rewritten it
        manifest = Manifest.load(current).with_accuracy(*saved.accuracy).with_accuracy(*measured)
        manifest.save(staged.manifest)
    progress.stage(f"task accuracy recorded in {folder.manifest}")
    return EvaluatedRun(folder, manifest, base, tuple(measured), seconds)
