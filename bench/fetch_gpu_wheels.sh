#!/usr/bin/env bash
# Fetches, on this machine, the wheels that bench/gpu_check.sh installs on the GPU machine (which has
# no network; Python 3.12 there) into .whl/ (git-ignored; pass carry=[".whl"] to the device run).
# The image there already has torch, cmake, ninja, nvcc, pytest, safetensors and tokenizers; these
# add the CUTLASS headers and pin the build tools (and scikit-build-core's own requirements,
# packaging and pathspec, whose versions there are unknown) to the ones used here. All pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  nvidia-cutlass==4.2.0.0 scikit-build-core==1.1.2 pybind11==3.1.0 pathspec==1.1.1 packaging==26.4
ls -la .whl
du -sh .whl
