#!/usr/bin/env bash
# The CPU benchmarks, saved night after night and compared with the previous night:
#   bash scripts/cpu_benchmarks.sh [pytest args...]          (default: benchmarks/ -m "not gpu")
# Each run is saved into $VLQ_BENCH_STORAGE (default .benchmarks-cpu).  When that folder already holds a run
# for this machine id (pytest-benchmark's: OS, Python, bits), this one is compared with the latest of them and
# the command fails (exit 1, "Performance has regressed") when a benchmark's mean is more than
# $VLQ_BENCH_FAIL slower (default mean:40%: one round per search on shared CI machines is noisy, and a real
# 1.5x slowdown must still fail).  The first run only saves: nothing to compare yet.
# Keep one storage folder per CPU model: pytest-benchmark's machine id does not name the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
storage=${VLQ_BENCH_STORAGE:-.benchmarks-cpu}
fail=${VLQ_BENCH_FAIL:-mean:40%}
python=${PYTHON:-python}
if [ "$#" -eq 0 ]; then
  set -- benchmarks/ -m "not gpu"
fi
machine=$("$python" -c "from pytest_benchmark.utils import get_machine_id; print(get_machine_id())")
compare=()
if compgen -G "$storage/$machine/*.json" >/dev/null; then
  compare=(--benchmark-compare --benchmark-compare-fail="$fail")
  echo "comparing with the latest saved run in $storage/$machine (fail beyond $fail)"
else
  echo "no earlier run in $storage/$machine: this run is saved as the first to compare against"
fi
# pytest-benchmark measures nothing under xdist (it disables itself, also when a parent pytest's worker variables
# are inherited): one process, no xdist.  --benchmark-compare takes an optional value: it comes after the paths
# so it cannot swallow one.
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_XDIST_TESTRUNUID
exec "$python" -m pytest "$@" -p no:xdist -p no:cacheprovider --benchmark-storage="file://$storage" --benchmark-autosave \
  "${compare[@]}"
