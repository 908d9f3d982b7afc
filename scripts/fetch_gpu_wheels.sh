#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that a bare GPU runner (python 3.12, torch and
# transformers preinstalled, no network) needs to run `pytest -m gpu`.  Install them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# modelopt core and what it imports without the [hf] extra (requests is imported but undeclared);
# pytest-benchmark for the benchmarks; tabulate/pyyaml for the CLI and schemes.
wheels=(
  nvidia-modelopt==0.47.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 "pulp<4" pydantic==2.14.4
  pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5 nvidia-ml-py==13.615.71
  tabulate==0.10.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-benchmark==5.3.1 py-cpuinfo==9.0.0
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -la "$dest"
