#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, on a machine with one NVIDIA GPU, torch and JAX (CUDA).
#
#   bash benchmarks/gpu_run.sh [STEP ...]          (default steps: env tests bench)
#
# Where one command may run 10 minutes at most, give the steps over three commands:
# `env tests`, then `bench`, then `flags cli` (each fits in 10 minutes on an H100). Logs and JSON are written to a work
# folder and packed into $OUT/gpu_run.tar.gz after every step (so that a run cut short still
# returns what it finished), with the key lines in $OUT/summary.txt.
#   env      nvidia-smi, the versions of torch / JAX / flax / diffusers, the devices both see
#   tests    tests/test_cuda.py: torch on CUDA vs the port on the GPU, full-size configs
#            (each model float32, the whole pipeline 256 -> 512 px in float32 and bfloat16)
#   bench    batch 8, 64x64 -> 128x128 latents (512 -> 1024 px), 20 steps, CFG: the port in
#            bfloat16 against torch float16 eager (SDPA) and torch.compile, same inputs
#   flags    one UNet call of the port under several XLA GPU flag sets and attention choices
#   cli      the batch command on 16 pictures of 512 px (-> 1024 px), 20 steps: its defaults
#            (--dtype auto, one image per device) and --batch-size 8, with their reports
#
# Settings (environment): OUT (default ./out), PYTHON (default python3), FLAX_LATENTUP_REAL_MODEL
# (a diffusers-layout sd-x2-latent-upscaler folder: the tests also run on its weights and the
# benchmark uses it), TORCH_COMPILE_MODE (default max-autotune; "default" compiles faster),
# TORCH_COMPILE_TIMEOUT (seconds before the torch.compile variant is given up, default 330),
# BENCH_ARGS (more bench_pipeline.py arguments), BENCH_MODEL (where the random full-size model
# folder is built and kept, default /tmp/flax_latentup_bench_model), STEP_TIMEOUT (seconds per
# step, default 570).
#
# The GPU machine has no diffusers and no network: carry the wheels it lacks in .whl/ (pure
# Python). From the repository root, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata
#
# JAX runs on the GPU because this script sets JAX_PLATFORMS=cuda (tests/conftest.py only sets
# "cpu" when the variable is unset), without preallocating GPU memory, so torch and JAX share
# the device inside one pytest process.
set -uo pipefail

cd "$(dirname "$0")/.."
steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(env tests bench)
for step in "${steps[@]}"; do
    case "$step" in
        env | tests | bench | flags | cli) ;;
        *) echo "unknown step '$step' (expected env, tests, bench, flags or cli)"; exit 2 ;;
    esac
done
OUT="${OUT:-./out}"
LOGS="$(mktemp -d -t flax-latentup-gpu-XXXXXX)"
PYTHON="${PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-570}"
MODEL_DIR="${FLAX_LATENTUP_REAL_MODEL:-${BENCH_MODEL:-/tmp/flax_latentup_bench_model}}"
mkdir -p "$OUT"

export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$LOGS/pip.log" 2>&1 \
        || { echo "wheel install failed:"; tail -20 "$LOGS/pip.log"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# bench_pipeline.py with the benchmark's workload; $1: name of the JSON/log, then arguments
# shellcheck disable=SC2086
bench() {
    local name="$1"
    shift
    timeout "$STEP_TIMEOUT" "$PYTHON" benchmarks/bench_pipeline.py --device gpu \
        --model "$MODEL_DIR" --save-model "$MODEL_DIR" --batch 8 --latent 64 --steps 20 \
        --guidance 7.5 --json "$LOGS/$name.json" "$@" ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/$name.log"
    return "${PIPESTATUS[0]}"
}

step_env() {
    {
        nvidia-smi || true
        "$PYTHON" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "jax", "jaxlib", "flax", "diffusers", "transformers", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
import jax, torch
print("torch sees", torch.cuda.is_available() and torch.cuda.get_device_name())
print("jax sees", jax.devices())
EOF
    } 2>&1 | tee "$LOGS/env.log"
}

step_tests() {
    timeout "$STEP_TIMEOUT" "$PYTHON" -m pytest -m cuda -v -rs -s tests/test_cuda.py \
        --junitxml="$LOGS/cuda-tests.xml" 2>&1 | tee "$LOGS/cuda-tests.log"
    return "${PIPESTATUS[0]}"
}

step_bench() {
    bench bench_pipeline --dtype bfloat16 --torch-dtype float16 --torch eager compile \
        --torch-compile-mode "${TORCH_COMPILE_MODE:-max-autotune}" \
        --compile-timeout "${TORCH_COMPILE_TIMEOUT:-330}" --repeats 3 --unet-repeats 5
}

step_flags() {
    # the port's UNet alone (bf16, batch 8 under CFG = 16 rows at 128x128 latents) under each
    # setting; every run compiles anew, so the sets are few
    local status=0 i=0 flags
    local sets=(
        ""
        "--xla_gpu_enable_triton_gemm=false"
        "--xla_gpu_enable_command_buffer="
        "--xla_gpu_exhaustive_tiling_search=true"
    )
    for flags in "${sets[@]}"; do
        echo "=== XLA_FLAGS='$flags'" | tee -a "$LOGS/flags.log"
        XLA_FLAGS="$flags" bench "flags_$i" --sides jax --unet-only --dtype bfloat16 \
            --unet-repeats 10 | grep -E "^g=" | tee -a "$LOGS/flags.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        i=$((i + 1))
    done
    echo "=== attention: XLA everywhere (no cuDNN)" | tee -a "$LOGS/flags.log"
    bench flags_xla_attention --sides jax --unet-only --dtype bfloat16 --unet-repeats 10 \
        --attention xla | grep -E "^g=" | tee -a "$LOGS/flags.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    return "$status"
}

step_cli() {
    if [ ! -f "$MODEL_DIR/model_index.json" ]; then # the bench step builds it too
        "$PYTHON" -c "import sys; from benchmarks.bench_pipeline import build_model_folder as b
b(sys.argv[1])" "$MODEL_DIR" > "$LOGS/cli-model.log" 2>&1 \
            || { tail "$LOGS/cli-model.log"; return 1; }
    fi
    local pictures="$LOGS/cli-pictures" status=0 bs
    "$PYTHON" - "$pictures" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
os.makedirs(sys.argv[1], exist_ok=True)
y, x = np.mgrid[0:512, 0:512]
for i in range(16):
    rgb = np.stack([(x + 9 * i) % 256, (y * 2 + i) % 256, (x + y) // 4 % 256], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(os.path.join(sys.argv[1], f"p{i:02d}.png"))
EOF
    for bs in default 8; do
        local args=()
        [ "$bs" = default ] || args=(--batch-size "$bs")
        echo "=== cli batch $bs" | tee -a "$LOGS/cli.log"
        timeout "$STEP_TIMEOUT" "$PYTHON" -m flax_latentup.cli upscale -i "$pictures" \
            -o "$LOGS/cli-out-$bs" -n "$MODEL_DIR" --steps 20 --quiet --no-compile-cache \
            "${args[@]}" 2>&1 | tee -a "$LOGS/cli.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1]))
print('cli report:', r['settings'], r['timing'])" \
            "$LOGS/cli-out-$bs/flax-latentup-report.json" 2>&1 | tee -a "$LOGS/cli.log"
    done
    return "$status"
}

# pack the logs after each step: the files that come back are these two
pack() {
    tar czf "$OUT/gpu_run.tar.gz" -C "$LOGS" . 2> /dev/null
    (cd "$LOGS" && grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|max abs|mean abs|max \|err\||^g=|speed-up|port - |TFLOP|=== |^done |cli report" \
        ./*.log) > "$OUT/summary.txt" 2> /dev/null || true
}

status=0
for step in "${steps[@]}"; do
    echo "### $step"
    "step_$step" || { echo "### $step failed"; status=1; }
    pack
done
echo "results in $OUT/gpu_run.tar.gz and $OUT/summary.txt (exit status $status)"
exit "$status"
