#!/usr/bin/env bash
# The GPU lane on a bare runner (torch + transformers preinstalled, no network):
#   bash scripts/gpu_lane.sh [pytest args...]        e.g.  bash scripts/gpu_lane.sh tests/ -n 2
# (-n N: xdist workers, one GPU each round-robin, whole files per worker; -n 2 on one H200 overlaps two files.
#  Keep ModelOpt's CUDA extension builds with VLQ_EXTENSIONS_DIR=<folder kept between runs>.)
# Installs the carried wheels (.whl/, from scripts/fetch_gpu_wheels.sh) into $VLQ_SITE only when that
# folder lacks modelopt: reinstalling makes ModelOpt's JIT-built CUDA extension cache stale (~50 s rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
site=${VLQ_SITE:-/tmp/site}
if ! PYTHONPATH=$site python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH=$site:$PWD
export PYTHONUNBUFFERED=1
if [ -n "${VLQ_EXTENSIONS_DIR:-}" ]; then
  # a carried cache outlives the install it was built against: keep it (mtimes) or clear it (other versions)
  python3 -m vlq.hardware keep-extension-cache
fi
exec python3 -m pytest -m gpu -p no:cacheprovider "$@"
