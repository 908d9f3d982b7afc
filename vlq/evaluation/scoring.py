"""Scores of lm-eval tasks on a model vlq holds, through lm-eval's own HF model wrapper (``HFLM`` given the model
instance) and ``simple_evaluate``: vlq picks the model and the task files, lm-eval does the rest.

Offline by construction: the hub and datasets' network access are switched off before lm-eval loads, and tasks
come from local YAMLs (:mod:`vlq.evaluation.tasks`); datasets' cache goes under vlq's cache folder unless
``HF_DATASETS_CACHE`` says otherwise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Sequence

from ..runtime.cache import default_cache_dir
from ..runtime.errors import VlqError
from .results import TaskScore
from .tasks import DEFAULT_TASKS, is_image_task, task_folder

#: lm-eval's batch for the tiny and full-size models alike (loglikelihood requests of a few dozen tokens).
BATCH_SIZE = 16
MAX_LENGTH = 512


def _offline() -> None:
    from ..runtime import compat

    compat.apply_hf_offline()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(default_cache_dir() / "datasets"))
    compat.apply_torchvision_schema_shim()


def score_tasks(model, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, *, tasks_dir: str | Path | None = None,
                limit: int | None = None, batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH,
                processor=None, lm=None) -> tuple[TaskScore, ...]:
    """lm-eval's score of every task in ``tasks`` on ``model`` (a transformers model, any quantization applied in
    memory), one :class:`TaskScore` per task and metric; ``limit`` takes the first N samples of each task.

    Text tasks run through lm-eval's ``HFLM``; image+text tasks (a ``doc_to_image``) through its multimodal
    ``HFMultimodalLM`` with ``processor`` and the chat template.  ``lm`` replaces the text model with another
    lm-eval ``LM`` (vLLM's, :mod:`vlq.evaluation.served`).
    """
    _offline()
    images = [t for t in tasks if is_image_task(t, tasks_dir)]
    texts = [t for t in tasks if t not in images]
    if images and processor is None:
        raise VlqError(f"Image+text task(s) {', '.join(images)} need the model's processor (images and chat template); "
                       "this model has none.")
    with _quiet():
        from lm_eval.models.huggingface import HFLM

        include = [str(task_folder(tasks))] + ([str(tasks_dir)] if tasks_dir is not None else [])
        device = str(next(model.parameters()).device) if model is not None else "cpu"
        scores: list[TaskScore] = []
        if texts:
            if lm is None:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
            scores += _evaluate(lm, texts, include, limit)
        if images:
            mm = _multimodal_class()(pretrained=model, tokenizer=processor, batch_size=IMAGE_BATCH_SIZE,
                                     max_length=max_length, device=device)
            scores += _evaluate(mm, images, include, limit, apply_chat_template=True)
    order = {t: i for i, t in enumerate(tasks)}
    return tuple(sorted(scores, key=lambda s: order[s.task]))


#: Generation requests per batch for image+text tasks (each row carries its image's pixels).
IMAGE_BATCH_SIZE = 8


def _evaluate(lm, tasks, include, limit, **kwargs) -> list[TaskScore]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False)  # indexing lm-eval's own ~10k YAMLs costs seconds
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                                      bootstrap_iters=1000, verbosity="ERROR", **kwargs)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise VlqError(f"lm-eval could not run tasks {', '.join(tasks)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return list(scores_from_results(out, tasks))


def _multimodal_class():
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class ProcessorMultimodalLM(HFMultimodalLM):
        """lm-eval's multimodal HF model given a processor instance: 0.4.13 returns a processor passed as
        ``tokenizer`` without setting ``self.processor`` / ``self.tokenizer`` (it loads one by name only)."""

        def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
            self.processor = tokenizer
            self.tokenizer = tokenizer.tokenizer

    return ProcessorMultimodalLM


def scores_from_results(out: dict, tasks: Sequence[str]) -> tuple[TaskScore, ...]:
    """The one place that reads lm-eval's result dict: ``results[task]["<metric>,<filter>"]`` and its ``_stderr``."""
    scores = []
    for task in tasks:
        results = out["results"].get(task)
        if results is None:
            raise VlqError(f"lm-eval returned no result for task {task!r} (a group? name its tasks).")
        samples = int(out.get("n-samples", {}).get(task, {}).get("effective", results.get("sample_len", 0)) or 0)
        for key, value in results.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",", 1)[0]
            stderr = results.get(key.replace(",", "_stderr,", 1))
            scores.append(TaskScore(task, metric, float(value), float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                                    samples))
    return tuple(scores)


@contextlib.contextmanager
def _quiet():
    """lm-eval's progress bars and INFO lines off the terminal (vlq prints its own table)."""
    previous = {name: logging.getLogger(name).level for name in ("lm-eval", "lm_eval", "datasets")}
    for name in previous:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
