#!/usr/bin/env bash
# The GPU lane on a bare runner (torch + transformers preinstalled, no network):
#   bash scripts/gpu_lane.sh [pytest args...]        e.g.  bash scripts/gpu_lane.sh tests/ -n 2
# (-n N: xdist workers, one GPU each round-robin, whole files per worker; -n 2 on one H200 overlaps two files.
#  Keep ModelOpt's CUDA extension builds with VLQ_EXTENSIONS_DIR=<folder kept between runs>.)
# Setup (wheels, extension cache): scripts/gpu_setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_setup.sh
exec python3 -m pytest -m gpu -p no:cacheprovider "$@"
