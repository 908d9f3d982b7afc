"""Shared fixtures: the tiny Qwen2.5-VL (CPU lane) and the full-size model (gpu lane).

The base model is session-scoped and read-only; a teardown guard fails the run if any test
mutated it.  Tests that quantize take ``fresh_vlm`` (``vlq.pipeline.fresh_copy``) instead.  Plain
helpers (the CLI subprocess, the variant matrix) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

# Tests never reach a hub: fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from vlq.runtime import compat as _compat
from vlq.runtime.hardware import pin_xdist_worker_to_gpu, visible_gpus

# `pytest -n N`: each xdist worker gets one GPU (round-robin), set before anything starts CUDA.
pin_xdist_worker_to_gpu()

_compat.apply_torchvision_schema_shim()  # before any test imports transformers' image code


def pytest_addoption(parser):
    group = parser.getgroup("vlq")
    group.addoption(
        "--vlq-model",
        default=os.environ.get("VLQ_MODEL"),
        help="local Qwen2.5-VL checkpoint folder for the gpu lane (env VLQ_MODEL); "
        "default: the published 3B architecture with random bf16 weights",
    )


def pytest_configure(config):
    """`pytest -n N` distributes whole files (``--dist loadfile``) unless ``--dist`` is given: a module-scoped
    search (one per variant) then runs once, not once per worker; and the files that fill a GPU's memory
    (tests/test_gpu_memory.py) never run beside each other.  (xdist's ``loadgroup`` does not group under
    pytest 9: it renames node ids through an attribute pytest 9 no longer reads.)"""
    explicit = any(a == "--dist" or a.startswith("--dist=") or a == "-d" for a in config.invocation_params.args)
    if getattr(config.option, "dist", "no") == "load" and not explicit:
        config.option.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_auto_num_workers(config):
    """`pytest -m gpu -n auto`: one worker per visible GPU (xdist's default, one per CPU core, would crowd them)."""
    markexpr = config.getoption("markexpr", "") or ""
    if "gpu" in markexpr and "not gpu" not in markexpr:
        return max(1, len(visible_gpus()))
    return None


def pytest_collection_modifyitems(config, items):
    """Skip at collection, before any fixture builds a model, with the product's own reasons."""
    from vlq.runtime.capabilities import cuda_skip_reason, fp8_kv_cache_skip_reason, vllm_skip_reason

    cuda_reason = cuda_skip_reason()
    for item in items:
        gpu = "gpu" in item.keywords
        reason = cuda_reason if gpu else None
        if reason is None and "vllm" in item.keywords:
            reason = vllm_skip_reason("cuda" if gpu else "cpu")
        if reason is None and item.get_closest_marker("fp8_kv_cache") is not None:
            reason = fp8_kv_cache_skip_reason("cuda" if gpu else "cpu")
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny Qwen2.5-VL, built deterministically and saved with ``save_pretrained``."""
    from vlq.data.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


def _read_only(loaded, label: str):
    """Yield a session's shared model, then fail the run if any test quantized it or changed its weights."""
    from vlq.data.models import fingerprint_parameters

    before = fingerprint_parameters(loaded.vlm)
    yield loaded
    quantized = [n for n, m in loaded.vlm.named_modules() if hasattr(m, "weight_quantizer")]
    assert not quantized, f"a test quantized the shared {label} model in place (first: {quantized[0]}); quantize a fresh_copy"
    assert fingerprint_parameters(loaded.vlm) == before, f"a test changed the shared {label} model's weights; quantize a fresh_copy"


@pytest.fixture(scope="session")
def pristine_vlm(tiny_checkpoint):
    """The tiny model loaded back through the local-checkpoint path. Read-only."""
    from vlq.data.models import load_vlm

    yield from _read_only(load_vlm(tiny_checkpoint), "tiny")


@pytest.fixture(scope="session")
def trained_vlm():
    """The tiny Qwen2.5-VL with learned weights (``tiny-trained``), BF16, read-only: fidelity tests
    quantize ``vlq.pipeline.fresh_copy`` of it.  The same teardown guard as ``pristine_vlm``."""
    from vlq.inputs.requests import TINY_TRAINED
    from vlq.data.models import load_vlm

    yield from _read_only(load_vlm(TINY_TRAINED), "tiny-trained")


@pytest.fixture
def fresh_vlm(pristine_vlm):
    """A private copy of the tiny model for tests that quantize (module-scoped fixtures call
    ``vlq.pipeline.fresh_copy(pristine_vlm)`` themselves)."""
    from vlq.pipeline import fresh_copy

    return fresh_copy(pristine_vlm)


@pytest.fixture(scope="session")
def vlm(pristine_vlm):
    return pristine_vlm.vlm


@pytest.fixture(scope="session")
def language_model(pristine_vlm):
    return pristine_vlm.language_model


@pytest.fixture(scope="session")
def vision_modules(pristine_vlm):
    return pristine_vlm.vision


@pytest.fixture(scope="session")
def calibration(pristine_vlm):
    """Packed text batches from the shipped corpus, read through ``datasets``."""
    from vlq.data.calibration import text_batches

    return text_batches(pristine_vlm.tokenizer, vocab_size=pristine_vlm.vocab_size, num_batches=4, seq_len=32)


# ---- gpu lane ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gpu_model_source(request):
    from vlq.data.models import QWEN25_VL_3B_RANDOM

    return request.config.getoption("--vlq-model") or QWEN25_VL_3B_RANDOM


@pytest.fixture(scope="session")
def gpu_pristine_vlm(gpu_model_source):
    """The full-size model on the GPU, built or loaded once per run. Searches work on copies."""
    import torch

    from vlq.data.models import load_vlm

    loaded = load_vlm(gpu_model_source, device="cuda")
    yield loaded
    del loaded
    torch.cuda.empty_cache()


# ---- vLLM serving ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_device(request):
    """The device vLLM tests serve on: ``cuda`` for tests marked ``gpu``, else ``cpu``.

    A test module may override it with a parametrized fixture to run the same tests on both lanes.
    """
    return "cuda" if request.node.get_closest_marker("gpu") else "cpu"


@pytest.fixture(scope="module")
def vllm_runner(vllm_device):
    """``VllmRunner`` bound to this lane's device, in the spirit of vLLM's own test fixture.

    Skips with one line when this machine's vLLM cannot serve that device.  Use as
    ``with vllm_runner(path) as runner: ...``; the engine is shut down when the block ends.
    """
    import functools

    from vlq.runtime.capabilities import vllm_skip_reason

    reason = vllm_skip_reason(vllm_device)
    if reason is not None:
        pytest.skip(reason)
    from vlq.serve.runner import VllmRunner

    return functools.partial(VllmRunner, device=vllm_device)
