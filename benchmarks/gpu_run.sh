#!/usr/bin/env bash
# One call on a CUDA GPU machine: the torch-vs-JAX CUDA tests, then the pipeline benchmark.
#
# The GPU machine has torch and JAX (CUDA) but no diffusers and no network, so carry the
# diffusers wheel in .whl/ (pure Python, any platform):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any \
#       -d .whl diffusers==0.42.1
#
# (`--platform manylinux2014_x86_64` also finds the py3-none-any wheel.) Add any other
# missing pure-Python dependency the same way. Then, from the repository root:
#
#   bash benchmarks/gpu_run.sh                 # logs and results under $OUT (default ./out)
#   FLAX_LATENTUP_REAL_MODEL=/path/to/sd-x2-latent-upscaler bash benchmarks/gpu_run.sh
#
# JAX runs on the GPU because this script sets JAX_PLATFORMS=cuda (tests/conftest.py only
# sets "cpu" when the variable is unset), without preallocating GPU memory, so torch and JAX
# share the device inside one pytest process.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"

export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl \
        > "$OUT/pip.log" 2>&1 || { echo "wheel install failed, see $OUT/pip.log"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    nvidia-smi || true
    python -c "import torch, jax; print('torch', torch.__version__, torch.cuda.is_available()); print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"

status=0
python -m pytest -m cuda -v -rs -s tests/test_cuda.py --junitxml="$OUT/cuda-tests.xml" 2>&1 \
    | tee "$OUT/cuda-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -f benchmarks/bench_pipeline.py ]; then
    # batch 8, 64x64 -> 128x128 latents, 20 steps, classifier-free guidance, bfloat16
    python benchmarks/bench_pipeline.py --device gpu --batch 8 --latent 64 --steps 20 \
        --guidance 6.0 --dtype bfloat16 --json "$OUT/bench_pipeline.json" 2>&1 \
        | tee "$OUT/bench_pipeline.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "benchmarks/bench_pipeline.py not present: benchmark skipped" | tee "$OUT/bench_pipeline.log"
fi

echo "results in $OUT (exit status $status)"
exit "$status"
