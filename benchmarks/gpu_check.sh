#!/usr/bin/env bash
# Issue 13, item 3: the GPU check, prepared here and run in ONE call of a lent GPU machine.
#
#   bash benchmarks/gpu_check.sh prepare   # here: needs ../shared and the package registry; fills .gpu/
#   bash benchmarks/gpu_check.sh run       # there: in the repository root, with .gpu/ carried along
#
# A lent machine has python3 with a CUDA torch (and numba, scipy, matplotlib, tqdm, pytest, hypothesis)
# but no registry and no ../shared, and the working tree that travels is limited to 64 MiB.  So
# `prepare` puts into .gpu/ (ignored by git through .git/info/exclude): SimpleITK's wheel (abi3, any
# CPython >= 3.11), the pure-Python packages slice2vol imports (nibabel, pydicom, pytorch-msssim) without
# their test data, and the three CRL atlases the benchmark's cases come from (STA23, STA29, STA35).
# `run` installs them into /tmp/site, then writes into $OUT (or gpu_out/): env.txt, the CUDA tests,
# the operator benchmark on CUDA, and bench_gpu.py's table (every method, 3 stacks, cuda; one case on
# the CPU too, for the PSNR agreement).  Each step has its own time limit so a hang cannot eat the lease.
# DEVICE=cpu bash benchmarks/gpu_check.sh run exercises the same steps without a GPU (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
PY=${PYTHON:-python3}

if [ "$mode" = prepare ]; then
  set -e
  mkdir -p .gpu .git/info
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  vers=$($PY -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('nibabel', 'pydicom', 'pytorch-msssim', 'SimpleITK')))")
  rm -rf .gpu/wheels .gpu/pkgs && mkdir -p .gpu/wheels .gpu/pkgs
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels $vers
  mv .gpu/wheels/simpleitk-*.whl .gpu/
  for w in .gpu/wheels/*.whl; do (cd .gpu/pkgs && unzip -q -o "../../$w"); done
  rm -rf .gpu/wheels .gpu/pkgs/*.dist-info .gpu/pkgs/nibabel/tests .gpu/pkgs/nibabel/*/tests .gpu/pkgs/nibabel/benchmarks \
         .gpu/pkgs/pydicom/data/test_files
  find .gpu/pkgs -name __pycache__ -prune -exec rm -rf {} +
  tar czf .gpu/pkgs.tar.gz -C .gpu/pkgs . && rm -rf .gpu/pkgs
  data=$($PY -c "from slice2vol.io import shared_data_dir; print(shared_data_dir())")
  for a in STA23 STA29 STA35; do
    mkdir -p .gpu/data/fetal_atlases/crl2017/$a
    cp "$data/fetal_atlases/crl2017/$a/t2.nii.gz" "$data/fetal_atlases/crl2017/$a/mask.nii.gz" .gpu/data/fetal_atlases/crl2017/$a/
  done
  echo "prepared .gpu/ ($(du -sh .gpu | cut -f1)); working tree + .gpu: $(( ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb .gpu | cut -f1)) / 1048576 )) MiB (limit 64)"
  exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ! $PY -c "import nibabel, pydicom, pytorch_msssim, SimpleITK" 2>/dev/null; then
  [ -d .gpu ] || { echo "gpu_check: .gpu/ missing: run 'bash benchmarks/gpu_check.sh prepare' here and carry .gpu" >&2; exit 2; }
  mkdir -p /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/simpleitk-*.whl || exit 2
  tar xzf .gpu/pkgs.tar.gz -C /tmp/site || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export SLICE2VOL_SHARED=${SLICE2VOL_SHARED:-$PWD/.gpu/data}

{
  date -u; uname -m; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  $PY -c "import sys, torch, numba, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'numba', numba.__version__, 'numpy', numpy.__version__)"
  $PY -c "import slice2vol, nibabel, SimpleITK; print('slice2vol', slice2vol.__version__, 'from', slice2vol.__file__)"
} 2>&1 | tee "$OUT/env.txt"

status=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.txt, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc"
  [ $rc -eq 0 ] || status=1
}
methods=${METHODS:-svr,gaussian,csvr,csvr-refine,auto}
step tests_cuda 90 $PY -m pytest -q -p no:cacheprovider -k cuda -rs tests/test_fused.py tests/test_acquisition.py tests/test_gaussian.py
step operators 100 $PY benchmarks/bench_operators.py --device "$DEVICE"
work=$(mktemp -d)  # cases and reconstructions stay out of $OUT: only the logs come back (at most 8 files)
step cases 40 $PY benchmarks/bench_gpu.py --make-cases "$work/cases" --data "$SLICE2VOL_SHARED"
step methods 320 $PY benchmarks/bench_gpu.py --cases "$work/cases" --device "$DEVICE" --methods "$methods" \
  --compare-cpu STA29_moderate_seed0 --output "$work/jobs" --json "$OUT/methods.json"
rm -rf "$work"
exit $status
