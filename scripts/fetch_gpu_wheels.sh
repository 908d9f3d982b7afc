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
# lm-eval 0.4.13 and the distributions its import and a local-file task load (traced on CPU), for `vlq eval`
# on the runner; scripts/gpu_setup.sh installs only those the runner lacks.
eval_wheels=(
  lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
  pandas==3.1.1 python-dateutil==2.9.0.post0 pytz==2026.6 tzdata==2026.6 six==1.17.0 aiohttp==3.14.5
  aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1
  attrs==26.1.0 portalocker==4.4.2 lxml==6.2.0 colorama==0.4.6 chardet==6.0.0.post1 more-itertools==11.2.1
)
mkdir -p "$dest/eval"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest/eval" "${eval_wheels[@]}"
ls -la "$dest" "$dest/eval"
