#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with exactly the wheels benchmarks/gpu_check.sh needs on the lent GPU machine
# (`nvidia-h200`: Python 3.12, x86-64, torch 2.11 and timm installed, no network, no DeepSpeed, pydantic
# or Ray). Run it here, where the package index is reachable; gpu_check.sh then installs them there with
# `pip install --no-index --no-deps --target /tmp/site` and puts /tmp/site on PYTHONPATH (the machine's
# own torch is never touched). The device call carries the folder: carry=[".whl"].
#
#   bash benchmarks/gpu_wheels.sh      # ~1 min; prints the wheels and their total size
#
# Which wheels: scalelab's imports on gpu_check's path (config, models, losses, gradcache, verify,
# train.engine / step / memory / compute) need deepspeed and pydantic beyond that image. DeepSpeed
# 0.19.8's Requires-Dist is einops, hjson, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, pydantic,
# torch, tqdm: of those only hjson and pydantic are missing there (KINDS.md's package list). pydantic
# needs pydantic-core (compiled: the cp312 manylinux build), annotated-types and typing-inspection, and
# typing-extensions >= 4.16 (the image's version is unknown: carried, it is a superset of older ones).
# pyyaml, timm, tokenizers, einops, msgpack, ninja, py-cpuinfo, psutil, tqdm are on the image. Ray and
# MLflow are not needed (Ray's wheel alone is over the 64 MiB a device call can carry).
# Versions are constraints.txt's. DeepSpeed ships only an sdist: it is built here into a pure-Python
# wheel with no compiled ops (DS_BUILD_OPS=0), as `make venv` installs it; nothing in it depends on the
# torch version it was built against (the ops it would JIT-compile are never used: train/engine.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}  # builds the deepspeed wheel: needs torch, setuptools and wheel (make venv)
test -x "$PY" || { echo "needs .venv (make venv): it builds the deepspeed wheel" >&2; exit 1; }
pin() { grep -i -m1 "^$1==" constraints.txt | cut -d= -f3; }

# name as in constraints.txt -> fetched as a cp312 manylinux x86-64 (or pure-Python) wheel
BINARY=(pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson)
rm -rf .whl
mkdir -p .whl
specs=()
for name in "${BINARY[@]}"; do
  version=$(pin "$name")
  test -n "$version" || { echo "$name is not pinned in constraints.txt" >&2; exit 1; }
  specs+=("$name==$version")
done
echo "== downloading ${specs[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"

ds=$(pin deepspeed)
echo "== building deepspeed==$ds (pure Python, no compiled ops)"
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl \
  "deepspeed==$ds"

# One version of each: two of the same name stop the whole install on the GPU machine.
dupes=$(ls .whl | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
test -z "$dupes" || { echo "two versions of: $dupes" >&2; exit 1; }
ls -l .whl | awk 'NR > 1 { printf "%8.1f KiB  %s\n", $5 / 1024, $9 }'
total_kib=$(du -sk .whl | cut -f1)
echo "total: $((total_kib / 1024)) MiB ($total_kib KiB) of the 64 MiB a device call carries"
test "$total_kib" -lt 32768 || { echo ".whl/ is over 32 MiB: the working tree must fit 64 MiB" >&2; exit 1; }
