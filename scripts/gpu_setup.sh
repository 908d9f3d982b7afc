# Source on a bare GPU runner (torch + transformers preinstalled, no network):  source scripts/gpu_setup.sh
# Installs the carried wheels (.whl/, from scripts/fetch_gpu_wheels.sh) into $VLQ_SITE only when that
# folder lacks modelopt: reinstalling makes ModelOpt's JIT-built CUDA extension cache stale (~50 s rebuild).
# With VLQ_EXTENSIONS_DIR (a folder kept between runs) a cache built for this ModelOpt and torch is kept:
# ninja's recorded output mtimes restored, the freshly installed sources dated back (vlq.runtime.hardware.keep_extension_cache).
site=${VLQ_SITE:-/tmp/site}
if ! PYTHONPATH=$site python3 -c "import modelopt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
# lm-eval and what it needs beyond the runner's own packages (.whl/eval, for `vlq eval` and the accuracy
# benchmark): only distributions the runner lacks, so its numpy/pyarrow/fsspec are never shadowed.
if [ -d .whl/eval ] && ! PYTHONPATH=$site python3 -c "import lm_eval" 2>/dev/null; then
  missing=$(python3 - <<'PY'
import glob, importlib.metadata as md, os, re
for wheel in sorted(glob.glob(".whl/eval/*.whl")):
    dist = os.path.basename(wheel).split("-")[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        try:
            md.version(re.sub(r"[-_.]+", "-", dist))
        except md.PackageNotFoundError:
            print(wheel)
PY
)
  [ -z "$missing" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $missing
fi
export PYTHONPATH=$site:$PWD
export PYTHONUNBUFFERED=1
if [ -n "${VLQ_EXTENSIONS_DIR:-}" ]; then
  # a carried cache outlives the install it was built against: keep it (mtimes) or clear it (other versions)
  export TORCH_EXTENSIONS_DIR=$VLQ_EXTENSIONS_DIR  # every process builds and finds them there, not only vlq's
  python3 -m vlq.runtime.hardware keep-extension-cache || echo "warning: could not keep the extension cache; torch will rebuild it" >&2
fi
