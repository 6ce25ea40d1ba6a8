#!/usr/bin/env bash
# Every GPU check of this project in one go, for a short slot on one CUDA GPU: under 9 minutes in all.
#
#   bash benchmarks/gpu_check.sh [RESULTS]         RESULTS: default $OUT if set, else ./gpu_check_results
#
# Steps, each with its own timeout and log (RESULTS/<step>.log), so that one failing stops no other; the
# dependencies each needs (module names as pip knows them), and the expected time on an H200:
#   numerics        STA on CUDA ("cells" layout and the fused "triton" kernels) against a float64 reference
#                   (outputs, input gradients) in float32, float16 and bfloat16 autocast; YOLOv8n with the
#                   default STA at 640 px, eval, CUDA float32 against CPU float64
#                   (benchmarks/gpu_check/numerics.py).
#                   Needs torch.                                                                  ~30 s
#   export          ONNX export on CUDA (export_detector at 640 px, free batch) and onnxruntime parity with
#                   PyTorch (benchmarks/gpu_check/onnx_export.py). Needs torch, torchvision, numpy, onnx,
#                   onnxscript, onnxruntime.                                                      ~1 min
#   fit-16-mixed    python -m sta_lightning fit --config configs/demo.yaml --trainer.accelerator gpu
#   fit-bf16-mixed  --trainer.precision 16-mixed / bf16-mixed (20 epochs), with the final val/mAP and mAP50
#                   (benchmarks/gpu_check/demo_fit.py). Needs torch, torchvision, numpy, lightning,
#                   torchmetrics, jsonargparse with docstring-parser and typeshed-client (its [signatures]
#                   extra), albumentations, torchdata, faster-coco-eval, matplotlib, rich, pyyaml; wandb is
#                   optional (without it the fit runs configs/demo.yaml without its W&B logger);
#                   pycocotools is not used.                                        ~1.5-2 min each
#   resume          exact resume with deterministic kernels: a short 16-mixed fit killed with SIGKILL after
#                   a checkpoint and resumed ends bit for bit as an uninterrupted one (tests/test_resume.py's
#                   check, on the GPU; benchmarks/gpu_check/resume.py). Needs what the fits need. ~1 min
#   benchmark       python benchmarks/gpu.py --quick: each row printed as it is measured, a failing row
#                   printed as an error. Needs torch.                                            <= 5 min
# All steps but the benchmark run side by side (they check results, not speed: one GPU and 16 cores are
# plenty), at most GPU_CHECK_PARALLEL seconds; then the benchmark runs alone with what is left of the budget
# (--time-limit: the rows it cannot reach are printed as skipped). A step whose packages are missing is
# skipped with a "skipped: needs X" line; without CUDA every step is skipped ("needs a CUDA GPU"). The script
# installs nothing.
#
# Output: a line as each step starts and ends (with its results), the benchmark's rows as they come, then a
# summary. RESULTS holds gpu_check.txt (the console output), env.txt (versions, nvidia-smi) and the step
# logs: 8 files, what the device tool brings back. Fits, checkpoints and demo data go to a scratch folder
# (GPU_CHECK_WORK, default a new folder under /tmp). Exit status 1 when a step failed, timed out or was
# killed, else 0 (skipped steps included).
#
# Settings (environment):
#   GPU_CHECK_STEPS     steps to run, default "numerics export fit-16-mixed fit-bf16-mixed resume benchmark"
#   GPU_CHECK_BUDGET    seconds for the whole run, default 510
#   GPU_CHECK_PARALLEL  seconds for the side-by-side steps, default 240 (the benchmark gets the rest, <= 300)
#   GPU_CHECK_DRY_RUN=1 each step's CPU dry variant at tiny sizes (no GPU needed: checks the script)
#   GPU_CHECK_WORKERS   DataLoader workers of each demo fit, default 4
#   GPU_CHECK_BENCHMARK_ARGS  arguments of benchmarks/gpu.py, default --quick (--time-limit is added)
#   GPU_CHECK_WORK      the scratch folder
#   PYTHON              the interpreter, default python3
#
# On the device machine (torch 2.11, Lightning 2.6, torchmetrics, onnx, onnxruntime, matplotlib, pyyaml...
# there; no package registry): download the missing wheels here into .whl/ at the repository root (ignored
# by .gitignore), with their own missing dependencies, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl jsonargparse docstring-parser typeshed-client albumentations albucore stringzilla simsimd \
#     pydantic pydantic-core annotated-types typing-inspection torchdata faster-coco-eval
# (64 MiB at most travel with a call; wandb and its opentelemetry dependencies can stay behind), then run
# with carry [".whl"] and a timeout_s of 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh "$OUT"
# The script puts the repository first on PYTHONPATH (sta_lightning need not be installed).

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${1:-${OUT:-./gpu_check_results}}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
STEPS=${GPU_CHECK_STEPS:-numerics export fit-16-mixed fit-bf16-mixed resume benchmark}
BUDGET=${GPU_CHECK_BUDGET:-510}
PARALLEL=${GPU_CHECK_PARALLEL:-240}
DRY=${GPU_CHECK_DRY_RUN:-0}
WORKERS=${GPU_CHECK_WORKERS:-4}
read -r -a BENCHMARK_ARGS <<<"${GPU_CHECK_BENCHMARK_ARGS:---quick}"
PY=${PYTHON:-python3}
CONSOLE="$RESULTS/gpu_check.txt"
: >"$CONSOLE"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
export STA_LIGHTNING_CACHE_DIR=${STA_LIGHTNING_CACHE_DIR:-$WORK/cache} # the datasets' scan cache
START=$SECONDS

say() { echo "$*" | tee -a "$CONSOLE"; }
elapsed() { echo $((SECONDS - START)); }
stamp() { printf '[%3d s]' "$(elapsed)"; }

# Per-step timeouts (seconds) and commands.
declare -A TIMEOUT=(
    [numerics]=150 [export]=200 [fit-16-mixed]=240 [fit-bf16-mixed]=240 [resume]=240 [benchmark]=300
)
DRY_ARGS=()
[ "$DRY" = 1 ] && DRY_ARGS=(--dry-run)
set_command() { # NAME: CMD=(the step's command line)
    case $1 in
        numerics) CMD=("$PY" benchmarks/gpu_check/numerics.py) ;;
        export) CMD=("$PY" benchmarks/gpu_check/onnx_export.py --out "$WORK/export") ;;
        fit-16-mixed | fit-bf16-mixed)
            CMD=("$PY" benchmarks/gpu_check/demo_fit.py --precision "${1#fit-}" --work "$WORK")
            CMD+=(--workers "$WORKERS") ;;
        resume) CMD=("$PY" benchmarks/gpu_check/resume.py --work "$WORK" --precision 16-mixed) ;;
        benchmark) CMD=("$PY" benchmarks/gpu.py "${BENCHMARK_ARGS[@]}") ;;
    esac
    CMD+=("${DRY_ARGS[@]}")
}

declare -A STATUS=() SECS=() PID=() BEGIN=()
ORDER=()

finish_step() { # NAME RC
    local name=$1 rc=$2
    SECS[$name]=$(($(elapsed) - BEGIN[$name]))
    case $rc in
        0) STATUS[$name]="ok" ;;
        124) STATUS[$name]="TIMED OUT after ${TIMEOUT[$name]} s" ;;
        137) STATUS[$name]="KILLED (exit status 137: past its ${TIMEOUT[$name]} s, or out of memory)" ;;
        *) STATUS[$name]="FAILED (exit status $rc)" ;;
    esac
    say "$(stamp) $name: ${STATUS[$name]} in ${SECS[$name]} s (log: $RESULTS/$name.log)"
    grep '^RESULT ' "$RESULTS/$name.log" | sed 's/^RESULT /    /' | tee -a "$CONSOLE"
    if [ "$rc" != 0 ] && ! grep -q '^RESULT ' "$RESULTS/$name.log"; then
        tail -n 5 "$RESULTS/$name.log" | sed 's/^/    | /' | tee -a "$CONSOLE"
    fi
}

stop_running() {
    for name in "${!PID[@]}"; do
        kill -TERM -- "-${PID[$name]}" 2>/dev/null
    done
    say "$(stamp) interrupted: the running steps were stopped"
    exit 130
}
trap stop_running INT TERM

cd "$REPO" || exit 1
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
say "GPU check of $COMMIT on $(hostname), $(date -u '+%Y-%m-%d %H:%M UTC')"
say "results: $RESULTS; scratch: $WORK; budget ${BUDGET} s"
say "steps: $STEPS$([ "$DRY" = 1 ] && echo ' (DRY RUN: each step on the CPU at tiny sizes)')"
{
    echo "== python: $(command -v "$PY")"
    "$PY" - <<'EOF'
import importlib.metadata as metadata
import platform
print("python", platform.python_version())
names = "torch torchvision lightning torchmetrics jsonargparse docstring-parser typeshed-client"
names += " albumentations torchdata faster-coco-eval pycocotools wandb onnx onnxscript onnxruntime"
names += " numpy matplotlib pyyaml"
for name in names.split():
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
try:
    import torch
    print("cuda available", torch.cuda.is_available(), "| torch CUDA", torch.version.cuda)
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name())
except Exception as error:
    print("torch import failed:", error)
EOF
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "(no nvidia-smi)"; fi
} >"$RESULTS/env.txt" 2>&1
say "$(grep -E '^(torch |cuda available|device)' "$RESULTS/env.txt" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"

# Which steps can run here.
while IFS='=' read -r name reason; do
    [ -z "$name" ] && continue
    ORDER+=("$name")
    if [ -n "$reason" ]; then
        STATUS[$name]="skipped: $reason"
        SECS[$name]=0
        say "$(stamp) $name: skipped: $reason"
    fi
done < <("$PY" benchmarks/gpu_check/requirements.py "${DRY_ARGS[@]}" $STEPS 2>>"$RESULTS/env.txt")
if [ ${#ORDER[@]} -eq 0 ]; then
    say "could not run benchmarks/gpu_check/requirements.py (see $RESULTS/env.txt)"
    exit 1
fi

# Side by side: every step but the benchmark.
[ "$PARALLEL" -gt $((BUDGET - $(elapsed) - 10)) ] && PARALLEL=$((BUDGET - $(elapsed) - 10))
[ "$PARALLEL" -lt 10 ] && PARALLEL=10 # (timeout 0 would mean no limit)
for name in "${ORDER[@]}"; do
    [ "$name" = benchmark ] || [ -n "${STATUS[$name]:-}" ] && continue
    limit=${TIMEOUT[$name]}
    [ "$limit" -gt "$PARALLEL" ] && limit=$PARALLEL
    TIMEOUT[$name]=$limit
    BEGIN[$name]=$(elapsed)
    set_command "$name"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout -k 10 "$limit" "${CMD[@]}" >"$RESULTS/$name.log" 2>&1 &
    PID[$name]=$!
    say "$(stamp) $name: started (timeout $limit s): ${CMD[*]}"
done
last_beat=$SECONDS
while [ ${#PID[@]} -gt 0 ]; do
    sleep 2
    for name in "${!PID[@]}"; do
        if ! kill -0 "${PID[$name]}" 2>/dev/null; then
            wait "${PID[$name]}"
            rc=$?
            unset "PID[$name]"
            finish_step "$name" "$rc"
        fi
    done
    if [ $((SECONDS - last_beat)) -ge 30 ] && [ ${#PID[@]} -gt 0 ]; then
        last_beat=$SECONDS
        running=""
        for name in "${!PID[@]}"; do
            last=$(tail -n 1 "$RESULTS/$name.log" | cut -c1-50)
            running+=" $name ($(($(elapsed) - BEGIN[$name])) s: $last)"
        done
        say "$(stamp) running:$running"
    fi
done

# The benchmark, alone on the GPU, with the time that is left.
if [ -n "${STATUS[benchmark]+x}" ] || [[ " ${ORDER[*]} " != *" benchmark "* ]]; then
    :
else
    left=$((BUDGET - $(elapsed) - 5))
    limit=${TIMEOUT[benchmark]}
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 60 ]; then
        STATUS[benchmark]="skipped: only $left s of the ${BUDGET} s budget left"
        SECS[benchmark]=0
        say "$(stamp) benchmark: ${STATUS[benchmark]}"
    else
        TIMEOUT[benchmark]=$limit
        BEGIN[benchmark]=$(elapsed)
        set_command benchmark
        CMD+=(--time-limit $((limit - 30)))
        say "$(stamp) benchmark: started (timeout $limit s): ${CMD[*]}"
        timeout -k 10 "$limit" "${CMD[@]}" 2>&1 | tee "$RESULTS/benchmark.log" | tee -a "$CONSOLE"
        finish_step benchmark "${PIPESTATUS[0]}"
    fi
fi

# Summary.
say ""
say "== summary ($(elapsed) s in all)"
failed=0
for name in "${ORDER[@]}"; do
    took=$([ "${SECS[$name]:-0}" -gt 0 ] && echo " (${SECS[$name]} s)")
    say "$(printf '%-15s %s' "$name" "${STATUS[$name]:-not run}")$took"
    if [ -f "$RESULTS/$name.log" ] && [[ "${STATUS[$name]:-}" != skipped* ]]; then
        grep '^RESULT ' "$RESULTS/$name.log" | sed 's/^RESULT /    /' | tee -a "$CONSOLE"
    fi
    case ${STATUS[$name]:-} in FAILED* | TIMED* | KILLED*) failed=1 ;; esac
done
if [[ " ${ORDER[*]} " == *" benchmark "* ]] && [ -f "$RESULTS/benchmark.log" ]; then
    count=$(grep -E '^[0-9]+ rows measured' "$RESULTS/benchmark.log" || echo 'no final count (stopped early)')
    say "benchmark: $count"
    grep '^|' "$RESULTS/benchmark.log" | tee -a "$CONSOLE"
fi
rmdir "$WORK" 2>/dev/null # the scratch folder, when no step wrote to it
exit $failed
