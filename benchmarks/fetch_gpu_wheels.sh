#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the packages the GPU machine's image lacks, for Python 3.12 x86-64,
# into .whl/ (git-ignored). The GPU check installs them there with --no-deps: the image already has torch,
# transformers, peft, accelerate, numpy, pandas, pyarrow, pillow, safetensors, tokenizers, huggingface_hub.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py=${PYTHON:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in "trl==1.16.0" "datasets==5.2.0" "dill" "multiprocess" "bitsandbytes==0.50.2" "liger-kernel" "pydicom" "hjson" "ninja" "py-cpuinfo" "msgpack"; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
"$py" -m pip download -q --no-deps --no-binary=:all: -d .whl "deepspeed==0.19.8"   # a source package
ls -la .whl
