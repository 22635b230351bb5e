#!/usr/bin/env bash
# The GPU measurements in one run, on a machine whose python3 has CUDA torch but not pigment's other packages
# (the lent H200: Python 3.12, no package registry). Wheels for the missing packages travel in .whl/ (git-ignored
# via .git/info/exclude), fetched here with: pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 (and the older manylinux tags) -d .whl diffusers faiss-cpu grpcio protobuf
# celery sqlalchemy fastapi ... (the venv's packages the device lacks: 49 wheels, 47 MB); pigment itself goes on
# PYTHONPATH in pyproject's package-dir layout.
#   OUT=/some/dir bash bench/gpu.sh
# Writes $OUT/gpu.json (bench/gpu.py: UNet per backend, the worker's Renderer, a request end to end through
# gRPC + a worker on the GPU, exact top-10 at 1M on the GPU) and, in the background on the CPU cores,
# $OUT/retrieval-many-1m.json (bench/retrieval.py: the many-clusters catalog at 1M, HNSW, --threads).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
THREADS=${THREADS:-10}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
mkdir -p /tmp/pkg/pigment
for f in protos/pigment/*; do ln -sfn "$PWD/$f" /tmp/pkg/pigment/; done
for d in services models training migrations; do ln -sfn "$PWD/$d" /tmp/pkg/pigment/$d; done
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, faiss; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'faiss', faiss.__version__)" || exit 1

# CPU-side: the many-clusters catalog at 1M with an HNSW graph on $THREADS cores (issue 22's build-time question)
python3 bench/retrieval.py --data many-clusters --n 1000000 --kind hnsw --threads "$THREADS" \
  --out "$OUT/retrieval-many-1m.json" > "$OUT/retrieval.log" 2>&1 &
RETRIEVAL=$!

PRESET=${PRESET:-/tmp/sd15}
t=$(date +%s)
[ -f "$PRESET/manifest.json" ] || python3 -m pigment.services.cli models build --arch sd15 --dir "$PRESET" \
  --dtype fp16 2>&1 | grep -v Writing | tail -2
echo "preset built in $(( $(date +%s) - t )) s"
python3 bench/gpu.py --preset "$PRESET" --out "$OUT/gpu.json" ${GPU_ARGS:-}

# the suite's GPU tests (fp16 backends against torch fp32), here where CUDA is
timeout 180 python3 -m pytest -q -m gpu tests/test_backends.py -p no:cacheprovider -rs 2>&1 | tail -25 \
  | tee "$OUT/pytest-gpu.log"

echo "waiting for the retrieval run (pid $RETRIEVAL) ..."
wait $RETRIEVAL; echo "retrieval exit $?"
tail -20 "$OUT/retrieval.log"
