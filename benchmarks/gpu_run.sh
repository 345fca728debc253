#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, on a machine with one NVIDIA GPU, torch and JAX (CUDA).
#
#   bash benchmarks/gpu_run.sh [STEP ...]          (default steps: env tests bench)
#
# The steps run in order within one time budget (GPU_RUN_BUDGET seconds, default 585: a
# 10-minute call with room to pack): each step's time limit is what is left of it, and a step
# with under 30 s left is not started. Logs and JSON are written to a work folder and packed
# into $OUT/gpu_run.tar.gz, with the key lines in $OUT/summary.txt, every 20 s and after every
# step, so that a run cut short still returns what it had done.
#   env      nvidia-smi, the versions of torch / JAX / flax / diffusers, the devices both see
#   tests    tests/test_cuda.py: torch on CUDA vs the port on the GPU, full-size configs
#            (each model float32, the whole pipeline 256 -> 512 px in float32 and bfloat16)
#   bench    batch 8, 64x64 -> 128x128 latents (512 -> 1024 px), 20 steps, CFG: the port in
#            bfloat16 against torch float16 eager (SDPA) and torch.compile, same inputs
#   flags    one UNet call of the port under several XLA GPU flag sets and attention choices
#   cli      the batch command on 16 pictures of 512 px (-> 1024 px), 20 steps: its defaults
#            (--dtype auto, one image per device) and --batch-size 8, with their reports
#
# Settings (environment): OUT (default ./out), PYTHON (default python3), GPU_RUN_BUDGET (see
# above), STEP_TIMEOUT (seconds per step at most, default 570), FLAX_LATENTUP_REAL_MODEL (a
# diffusers-layout sd-x2-latent-upscaler folder: the tests also run on its weights and the
# benchmark uses it), TORCH_COMPILE_MODE (default "default"; "max-autotune" tunes kernels for
# minutes more), TORCH_COMPILE_TIMEOUT (seconds before the torch.compile variant is given up,
# default 300), BENCH_ARGS (more bench_pipeline.py arguments), BENCH_MODEL (where the random
# full-size model folder is built and kept, default /tmp/flax_latentup_bench_model),
# GPU_RUN_PLATFORM (cuda, or cpu to check this script on a machine without a GPU: JAX and
# torch on the CPU, the tests step skips the CUDA tests, the benchmark runs the tiny configs).
#
# The GPU machine has no diffusers and no network: carry the wheels it lacks in .whl/ (pure
# Python). From the repository root, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 flax==0.12.12
#
# (flax: the machine's own may be older than this project needs; 0.12.12 runs with jax 0.11.)
# JAX runs on the GPU because this script sets JAX_PLATFORMS=cuda (tests/conftest.py only sets
# "cpu" when the variable is unset), without preallocating GPU memory, so torch and JAX share
# the device inside one pytest process.
set -uo pipefail

cd "$(dirname "$0")/.."
START=$SECONDS
steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(env tests bench)
for step in "${steps[@]}"; do
    case "$step" in
        env | tests | bench | flags | cli) ;;
        *) echo "unknown step '$step' (expected env, tests, bench, flags or cli)"; exit 2 ;;
    esac
done
PLATFORM="${GPU_RUN_PLATFORM:-cuda}"
case "$PLATFORM" in
    cuda | cpu) ;;
    *) echo "GPU_RUN_PLATFORM must be cuda or cpu, got '$PLATFORM'"; exit 2 ;;
esac
BUDGET="${GPU_RUN_BUDGET:-585}"
STEP_TIMEOUT="${STEP_TIMEOUT:-570}"
for setting in "GPU_RUN_BUDGET=$BUDGET" "STEP_TIMEOUT=$STEP_TIMEOUT"; do
    if ! [[ "${setting#*=}" =~ ^[0-9]+$ ]]; then
        echo "${setting%%=*} must be a whole number of seconds, got '${setting#*=}'"
        exit 2
    fi
done
OUT="${OUT:-./out}"
PYTHON="${PYTHON:-python3}"
LOGS="$(mktemp -d -t flax-latentup-gpu-logs-XXXXXX)" # packed into $OUT
WORK="$(mktemp -d -t flax-latentup-gpu-work-XXXXXX)" # not packed: wheels, pictures, a model
if [ "$PLATFORM" = cpu ]; then
    # the script's own check: the test suite's tiny configs, float32, torch eager on the CPU
    WORKLOAD=(--device cpu --tiny --steps 2 --guidance 6 --repeats 1 --unet-repeats 1)
    BENCH_VARIANTS=(--dtype float32 --torch eager)
    MODEL_DIR="${BENCH_MODEL:-$WORK/model}"
else
    WORKLOAD=(--device gpu --batch 8 --latent 64 --steps 20 --guidance 7.5)
    BENCH_VARIANTS=(--dtype bfloat16 --torch-dtype float16 --torch eager compile
        --torch-compile-mode "${TORCH_COMPILE_MODE:-default}"
        --compile-timeout "${TORCH_COMPILE_TIMEOUT:-300}" --repeats 3 --unet-repeats 5)
    MODEL_DIR="${FLAX_LATENTUP_REAL_MODEL:-${BENCH_MODEL:-/tmp/flax_latentup_bench_model}}"
fi
mkdir -p "$OUT"

export JAX_PLATFORMS="$PLATFORM"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

# seconds a step may still take: what is left of the budget less 10 s to pack, at most
# STEP_TIMEOUT and at least 1 (for `timeout`, 0 is no limit at all)
left() {
    local rest=$((BUDGET - (SECONDS - START) - 10))
    rest=$((rest < STEP_TIMEOUT ? rest : STEP_TIMEOUT))
    echo $((rest < 1 ? 1 : rest))
}

# whether a run within a step may start (30 s left at least); otherwise says why it does not
room_for() {
    local rest
    rest="$(left)"
    [ "$rest" -ge 30 ] && return 0
    echo "=== $1 not started: $rest s left of GPU_RUN_BUDGET=$BUDGET" | tee -a "$LOGS/steps.log"
    return 1
}

# bench_pipeline.py with the run's workload; $1: name of the JSON/log, then arguments
# shellcheck disable=SC2086
bench() {
    local name="$1"
    shift
    timeout "$(left)" "$PYTHON" benchmarks/bench_pipeline.py "${WORKLOAD[@]}" \
        --model "$MODEL_DIR" --save-model "$MODEL_DIR" --json "$LOGS/$name.json" "$@" \
        ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/$name.log"
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
import flax, jax, torch
print("flax", flax.__version__, "imported from", flax.__file__)
print("torch sees", torch.cuda.is_available() and torch.cuda.get_device_name())
print("jax sees", jax.devices())
EOF
    } 2>&1 | tee "$LOGS/env.log"
    return "${PIPESTATUS[0]}"
}

step_tests() {
    # without a GPU (GPU_RUN_PLATFORM=cpu) every test is skipped, which pytest counts a success
    timeout "$(left)" "$PYTHON" -m pytest -m cuda -v -rs -s --durations=0 -p no:cacheprovider \
        tests/test_cuda.py --junitxml="$LOGS/cuda-tests.xml" 2>&1 | tee "$LOGS/cuda-tests.log"
    return "${PIPESTATUS[0]}"
}

step_bench() {
    bench bench_pipeline "${BENCH_VARIANTS[@]}"
}

step_flags() {
    # the port's UNet alone (bf16, batch 8 under CFG = 16 rows at 128x128 latents) under each
    # setting; every run compiles anew, so the sets are few
    local status=0 i=0 flags code
    local sets=(
        ""
        "--xla_gpu_enable_triton_gemm=false"
        "--xla_gpu_enable_command_buffer="
        "--xla_gpu_exhaustive_tiling_search=true"
    )
    for flags in "${sets[@]}"; do
        room_for "XLA_FLAGS='$flags'" || { status=124; break; }
        echo "=== XLA_FLAGS='$flags'" | tee -a "$LOGS/flags.log"
        XLA_FLAGS="$flags" bench "flags_$i" --sides jax --unet-only --dtype bfloat16 \
            --unet-repeats 10 | grep -E "^g=" | tee -a "$LOGS/flags.log"
        code="${PIPESTATUS[0]}"
        [ "$code" -eq 0 ] || status=$((code == 124 ? 124 : 1))
        [ "$status" -ne 124 ] || break
        i=$((i + 1))
    done
    [ "$status" -ne 124 ] && room_for "attention: XLA everywhere" || return 124
    echo "=== attention: XLA everywhere (no cuDNN)" | tee -a "$LOGS/flags.log"
    bench flags_xla_attention --sides jax --unet-only --dtype bfloat16 --unet-repeats 10 \
        --attention xla | grep -E "^g=" | tee -a "$LOGS/flags.log"
    code="${PIPESTATUS[0]}"
    [ "$code" -eq 0 ] || status=$((code == 124 ? 124 : 1))
    return "$status"
}

step_cli() {
    if [ ! -f "$MODEL_DIR/model_index.json" ]; then # the bench step builds it too
        "$PYTHON" -c "import sys; from benchmarks.bench_pipeline import build_model_folder as b
b(sys.argv[1], tiny=sys.argv[2] == 'cpu')" "$MODEL_DIR" "$PLATFORM" \
            > "$LOGS/cli-model.log" 2>&1 || { tail "$LOGS/cli-model.log"; return 1; }
    fi
    # the pictures and outputs stay out of the packed logs (random weights: megabytes of noise)
    local pictures="$WORK/cli-pictures" status=0 bs code
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
        room_for "cli batch $bs" || return 124
        local args=()
        [ "$bs" = default ] || args=(--batch-size "$bs")
        echo "=== cli batch $bs" | tee -a "$LOGS/cli.log"
        timeout "$(left)" "$PYTHON" -m flax_latentup.cli upscale -i "$pictures" \
            -o "$WORK/cli-out-$bs" -n "$MODEL_DIR" --steps 20 --quiet --no-compile-cache \
            "${args[@]}" 2>&1 | tee -a "$LOGS/cli.log"
        code="${PIPESTATUS[0]}"
        [ "$code" -eq 0 ] || status=1
        [ "$code" -ne 124 ] || return 124
        cp "$WORK/cli-out-$bs/flax-latentup-report.json" "$LOGS/cli-report-$bs.json" 2> /dev/null
        "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1]))
print('cli report:', r['settings'], r['timing'])" \
            "$LOGS/cli-report-$bs.json" 2>&1 | tee -a "$LOGS/cli.log"
    done
    return "$status"
}

# pack the logs into the two files that come back, each replaced whole (a pack cut short
# leaves the one before)
pack() {
    local tmp="$OUT/.pack$BASHPID"
    if tar czf "$tmp.tar.gz" -C "$LOGS" . 2> /dev/null; then
        mv -f "$tmp.tar.gz" "$OUT/gpu_run.tar.gz"
    fi
    (cd "$LOGS" && grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|skipped|max abs|mean abs|max \|err\||^g=|speed-up|port - |TFLOP|=== |^### |cli report|s call |: done in | not started" \
        ./*.log) > "$tmp.txt" 2> /dev/null
    mv -f "$tmp.txt" "$OUT/summary.txt"
    rm -f "$tmp.tar.gz"
}

# the wheels carried in .whl/ (the GPU machine has no diffusers)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl > "$LOGS/pip.log" 2>&1 \
        || { echo "wheel install failed:"; tail -20 "$LOGS/pip.log"; pack; exit 1; }
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

(while sleep 20; do pack; done) &
PACKER=$!
trap 'kill "$PACKER" 2> /dev/null; rm -rf "$LOGS" "$WORK"' EXIT

# a line of the steps' log, shown and kept
say() { echo "### $*" | tee -a "$LOGS/steps.log"; }

status=0
for step in "${steps[@]}"; do
    budget_left="$(left)"
    if [ "$budget_left" -lt 30 ]; then
        say "$step not started: $budget_left s left of GPU_RUN_BUDGET=$BUDGET"
        status=1
        continue
    fi
    say "$step (at $((SECONDS - START)) s, up to $budget_left s)"
    step_start=$SECONDS
    "step_$step"
    code=$?
    took=$((SECONDS - step_start))
    case "$code" in
        0) say "$step done in $took s" ;;
        124) say "$step timed out after $took s (its limit: what was left of the budget)" ;;
        *) say "$step failed (exit status $code) after $took s" ;;
    esac
    [ "$code" -eq 0 ] || status=1
    pack
done
kill "$PACKER" 2> /dev/null
wait "$PACKER" 2> /dev/null
pack
echo "results in $OUT/gpu_run.tar.gz and $OUT/summary.txt (exit status $status)"
exit "$status"
