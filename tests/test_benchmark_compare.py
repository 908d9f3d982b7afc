"""Night-over-night benchmark comparison (scripts/cpu_benchmarks.sh, what the nightly CPU workflow runs):
the first night only saves, a night as fast as the last passes, a night made slower on purpose fails.

The benchmark here is a stand-in whose duration is set from outside (a sleep), so the verdict depends on
the injected slowdown alone, not on how busy this machine is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cpu_benchmarks.sh"

STAND_IN = '''
import os
import time


def test_stand_in(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["STAND_IN_SECONDS"]),), rounds=5, iterations=1)
'''


@pytest.fixture
def night(tmp_path):
    """``night(seconds)``: one nightly benchmark run of the stand-in, saved into one storage folder."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "test_stand_in.py").write_text(STAND_IN)
    (tmp_path / "bench" / "pytest.ini").write_text("[pytest]\n")  # not the repository's ini or conftest
    storage = tmp_path / "storage"

    def run(seconds: float) -> subprocess.CompletedProcess:
        env = {**os.environ, "STAND_IN_SECONDS": str(seconds), "VLQ_BENCH_STORAGE": str(storage), "PYTHON": sys.executable}
        return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "bench" / "test_stand_in.py"), "-c",
                               str(tmp_path / "bench" / "pytest.ini")],
                              env=env, capture_output=True, text=True, timeout=300)

    run.saved = lambda: sorted(storage.glob("*/*.json"))
    return run


def _mean(path: Path) -> float:
    return json.loads(path.read_text())["benchmarks"][0]["stats"]["mean"]


def test_a_slower_night_fails_the_comparison(night):
    first = night(0.02)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "no earlier run" in first.stdout and len(night.saved()) == 1

    # negative control: as fast as the night before -> compared, within the threshold, passes
    same = night(0.02)
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "comparing with the latest saved run" in same.stdout and "Performance has regressed" not in same.stdout + same.stderr
    assert len(night.saved()) == 2

    # made slower on purpose (3x the mean, beyond mean:40%) -> the run fails, naming the benchmark and the field
    slower = night(0.06)
    output = slower.stdout + slower.stderr
    assert slower.returncode == 1, output[-3000:]
    assert "Performance has regressed" in output and "test_stand_in" in output and "Field 'mean' has failed" in output
    saved = night.saved()
    assert len(saved) == 3 and _mean(saved[-1]) > 2 * _mean(saved[-2]), "the slower run is saved too, for the next night"
