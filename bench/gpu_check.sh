#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py, docs/performance.md): one table of full-resolution figures on one
# CUDA GPU within 8 minutes; partial results are printed (flushed) as they come.
#
# The device machine has python3.12 with torch, numpy, tensorboard, scipy, psutil, tqdm and pyyaml;
# every other package the check imports is a wheel in .whl/ (carry [".whl"]; it is git-ignored
# through .git/info/exclude). From the repository root there, one line:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
#
# Arguments go to bench/gpu_check.py, run as `python -m bench.gpu_check` (e.g. --budget-s 300,
# --sections masan,loader). On a machine without a GPU, `bash bench/gpu_check.sh --tiny` runs the
# same code paths at CPU-sized shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import masan, deepspeed, zarr, numcodecs, nibabel, sklearn" 2>/tmp/gpu_check_imports.txt; then
    echo "gpu_check: a package is missing ($(tail -1 /tmp/gpu_check_imports.txt)); install the wheels of .whl/" \
         "as in this script's header" >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
# the hard limit stays under 8 minutes even if a row ignores the budget's alarm
exec timeout --signal=INT --kill-after=10 470 "$PY" -u -m bench.gpu_check --budget-s 420 "$@"
