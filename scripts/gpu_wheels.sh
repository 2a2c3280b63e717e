#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA jax, flax, optax and orbax but no network (the lent H100/H200
# image): the packages meshpilot needs that such an image lacks, for its Python 3.12, into .whl/ (git-ignored).
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                     && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# grain (data loader) and its needs the image lacks; tensorboardX (event files); versions as tested here
for pkg in grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
ls -la .whl
