"""`pytest -n N` on GPUs: which GPU each xdist worker gets, and that whole files go to one worker."""

from __future__ import annotations

import os
import time
import subprocess
import sys
from pathlib import Path

import pytest

from vlq.runtime import hardware
from vlq.runtime.hardware import GpuInfo

ROOT = Path(__file__).resolve().parents[1]
TWO_H200 = [GpuInfo(0, "NVIDIA H200", 140 * 2**30), GpuInfo(1, "NVIDIA H200", 140 * 2**30)]


@pytest.mark.parametrize("worker, visible, expected", [
    ("gw0", None, "0"), ("gw1", None, "1"), ("gw2", None, "0"),  # round-robin over the machine's GPUs
    ("gw0", "1", "1"), ("gw1", "1", "1"),                         # a user's CUDA_VISIBLE_DEVICES is respected
], ids=["gw0-all", "gw1-all", "gw2-wraps", "gw0-only-1", "gw1-only-1"])
def test_each_worker_sees_one_gpu(monkeypatch, worker, visible, expected):
    # the machine's GPU list stands in for NVML (this CPU machine has none); the selection is vlq's
    monkeypatch.setattr(hardware, "_all_gpus", lambda: list(TWO_H200))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert hardware.pin_xdist_worker_to_gpu() == expected
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_no_pinning_outside_a_worker_or_without_gpus(monkeypatch):
    """Negative controls: the controller process and a GPU-less machine keep CUDA_VISIBLE_DEVICES as it is."""
    monkeypatch.setattr(hardware, "_all_gpus", lambda: list(TWO_H200))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert hardware.pin_xdist_worker_to_gpu() is None
    monkeypatch.setattr(hardware, "_all_gpus", lambda: [])
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert hardware.pin_xdist_worker_to_gpu() is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def _workers_per_test(*args: str) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-v",
                           "tests/test_package.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line.split()[-1]: line.split()[0] for line in proc.stdout.splitlines() if line.startswith("[gw") and "PASSED" in line}


@pytest.mark.slow  # two pytest runs with two workers each
def test_under_n_workers_a_file_stays_on_one_worker():
    """conftest turns xdist's default `--dist load` into `loadfile`: a module-scoped search runs once.
    Negative control: an explicit `--dist load` spreads the same file over both workers."""
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests/test_package.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    n_tests = sum(1 for line in collected.stdout.splitlines() if line.startswith("tests/test_package.py::"))
    by_file = _workers_per_test()
    assert n_tests > 2 and len(by_file) == n_tests and len(set(by_file.values())) == 1, (n_tests, by_file)
    spread = _workers_per_test("--dist", "load")
    assert len(set(spread.values())) == 2, spread


def test_modelopt_extension_builds_go_where_vlq_says(monkeypatch, tmp_path):
    """torch builds ModelOpt's CUDA extensions into TORCH_EXTENSIONS_DIR: vlq sets it from VLQ_EXTENSIONS_DIR
    (else its cache), and a TORCH_EXTENSIONS_DIR the user set wins (the control: vlq does not overwrite it)."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("VLQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VLQ_EXTENSIONS_DIR", raising=False)
    assert hardware.use_extension_cache() == tmp_path / "cache" / "torch_extensions"
    monkeypatch.setenv("VLQ_EXTENSIONS_DIR", str(tmp_path / "kept"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert hardware.use_extension_cache() == tmp_path / "kept" and os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "kept")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "users"))
    assert hardware.use_extension_cache() == tmp_path / "users"


def _ninja(folder, *args) -> str:
    """ninja (the pip package ModelOpt and vLLM depend on, the builder torch's JIT extensions use) in ``folder``."""
    run = subprocess.run([sys.executable, "-m", "ninja", *args], cwd=folder, capture_output=True, text=True, check=True)
    return run.stdout


def test_a_carried_extension_cache_is_kept_only_for_what_it_was_built_against(tmp_path):
    """Real ninja, as torch drives it: an output with a dependency record.  Carried to a new machine the
    outputs' mtimes are re-dated (truncated to seconds) and a fresh install dates the sources to now, and ninja
    rebuilds (the control); kept, the outputs get ninja's recorded mtimes back and the sources an old date,
    and ninja has nothing to do.  A cache stamped for another ModelOpt is emptied, not trusted."""
    source = tmp_path / "site" / "tensor_quant_gpu_fp8.cu"
    source.parent.mkdir()
    source.write_text("// kernel")
    cache = tmp_path / "ext"
    built_for = "nvidia-modelopt==0.47.0 torch==2.11.0"
    assert hardware.keep_extension_cache(cache, built_for) == "stamped"
    build = cache / "modelopt_cuda_ext_fp8"
    build.mkdir()
    (build / "build.ninja").write_text(
        "rule compile\n  command = cp $in $out && printf '%s: %s\\n' $out $in > $out.d\n  depfile = $out.d\n  deps = gcc\n"
        f"build tensor_quant_gpu_fp8.cuda.o: compile {source}\n"
        "rule link\n  command = cp $in $out\n"
        "build modelopt_cuda_ext_fp8.so: link tensor_quant_gpu_fp8.cuda.o\n")
    _ninja(build)
    assert "no work to do" in _ninja(build, "-n")
    # the carry and the fresh install: outputs re-dated to a later whole second, the source to now
    later = int(time.time()) + 5
    for output in ("tensor_quant_gpu_fp8.cuda.o", "modelopt_cuda_ext_fp8.so"):
        os.utime(build / output, (later, later))
    os.utime(source, (later + 5, later + 5))
    assert "no work to do" not in _ninja(build, "-n")  # the control: ninja would rebuild
    assert hardware.keep_extension_cache(cache, built_for, [source]) == "kept"
    assert "no work to do" in _ninja(build, "-n")
    assert hardware.keep_extension_cache(cache, "nvidia-modelopt==0.48.0 torch==2.11.0", [source]) == "cleared"
    assert not build.exists() and (cache / hardware.EXTENSION_STAMP).read_text().strip() == "nvidia-modelopt==0.48.0 torch==2.11.0"
