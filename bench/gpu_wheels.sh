#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the packages the GPU machine lacks, for `carry [".whl"]`
# (docs/performance.md, bench/gpu_check.sh): cp312 manylinux x86_64 or pure wheels of the versions
# this environment holds, and DeepSpeed built here as a pure wheel (its ops compile at run time
# there). Nothing can be fetched on the GPU machine, so a wheel missing here fails its whole call:
# the script ends by checking that .whl/ holds one wheel per package, each for CPython 3.12 on
# x86_64 Linux (or pure); the GPU commands begin with an import guard of their own.
#
#   bash bench/gpu_wheels.sh            # needs pip's index (or its cache) on this machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
# what bench/ imports beyond the GPU machine's image (torch, numpy, scipy, tensorboard, psutil,
# tqdm, pyyaml, packaging, ninja, py-cpuinfo, msgpack, nvidia-ml-py, scikit-learn are there)
PACKAGES=(hjson pydantic pydantic-core annotated-types typing-inspection zarr donfig nibabel numcodecs google-crc32c)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf .whl.new && mkdir .whl.new
for name in "${PACKAGES[@]}"; do
    spec="$name==$(version "$name")"
    echo "  $spec"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl.new "$spec"
done
spec="deepspeed==$(version deepspeed)"
echo "  $spec (built here)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl.new "$spec"
rm -rf .whl && mv .whl.new .whl  # a run cut short leaves the previous .whl/ whole

# this Python may be another than the GPU machine's 3.12: the wheels are checked by name
count=$(ls .whl/*.whl | wc -l)
want=$(( ${#PACKAGES[@]} + 1 ))
if [ "$count" -ne "$want" ]; then
    echo "gpu_wheels: .whl/ holds $count wheels, $want expected: $(ls .whl)" >&2
    exit 1
fi
for whl in .whl/*.whl; do
    case "$whl" in *-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
        *) echo "gpu_wheels: $whl is not for the GPU machine's Python 3.12 on x86_64" >&2; exit 1 ;;
    esac
done
echo "gpu_wheels: $count wheels, $(du -sh .whl | cut -f1) in .whl/ (carry [\".whl\"], under the 64 MiB a call carries)"
