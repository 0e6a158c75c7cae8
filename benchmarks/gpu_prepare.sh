#!/usr/bin/env bash
# Here, with the package registry at hand: what benchmarks/gpu_check.sh needs on a GPU machine that has no
# network (Python 3.12 with torch, transformers, numpy, tensorboard, grpcio, aiohttp and the like, but not
# nvflare nor cma). Writes .gpu/whl (wheels for CPython 3.12 on x86-64 Linux: nvflare, cma and those of
# their needs that such a machine lacks, at the versions this project is tested with) and .gpu/baseline
# (src/fedbpt at the throughput baseline, for a machine without the repository's history). .gpu/ is ignored
# by git; carry it to the machine with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
BASELINE=${BASELINE:-33d3fce}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/baseline
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 -d .gpu/whl \
  nvflare==2.9.0 cma==4.5.0 pyhocon==0.3.61 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 docker==7.2.0 Flask==3.1.3 \
  Flask-JWT-Extended==4.6.0 Flask-SQLAlchemy==3.1.1 SQLAlchemy==2.1.9 gunicorn==27.0.1 itsdangerous==2.2.0 \
  blinker==1.9.0 PyJWT==2.15.1
git archive "$BASELINE" src/fedbpt | tar -x -C .gpu/baseline
echo "wrote .gpu/whl ($(ls .gpu/whl | wc -l) wheels, $(du -sh .gpu/whl | cut -f1)) and .gpu/baseline/src/fedbpt at $BASELINE"
