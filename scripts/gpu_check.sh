#!/usr/bin/env bash
# The first command to run on a GPU machine (README, "The GPU check"). Installs what it needs as
# .ci/run does, then: the test suite with the device-agnostic tests on CUDA; CIFAR-10-shaped
# training images/s and sampling time at DiT-S/2, batch 128, fp32 eager against bf16 + compile;
# the speed of `python d3pm_runner.py` with its defaults and the projected wall-clock of that
# whole run; with two or more GPUs, two steps of torchrun over NCCL and the weight-agreement
# check; `python bench.py --device cuda`. Generated data only: nothing is downloaded. Each stage
# has its own time limit and all of them together 470 s, so it ends within 8 minutes; it stops
# at the first failing stage with a non-zero exit status, and ends with a summary to paste into
# the README (also written to OUT/summary.md, with each stage's log beside it).
#
#   bash scripts/gpu_check.sh                # all stages (OUT = runs/gpu_check)
#   bash scripts/gpu_check.sh --dry-run      # the stages, their limits and commands; runs nothing
#   bash scripts/gpu_check.sh --keep-going   # every stage even after a failure; fails at the end
#   bash scripts/gpu_check.sh --out DIR
#
# Without a visible GPU it says so in one line and exits 0. PYTHON picks the interpreter
# (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=runs/gpu_check
DRY=0
KEEP=0
BUDGET=470                                   # seconds for all stages together
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --keep-going) KEEP=1 ;;
        --out) OUT=$2; shift ;;
        *) echo "usage: bash scripts/gpu_check.sh [--dry-run] [--keep-going] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

# GPUs this process may use: torch's count honours CUDA_VISIBLE_DEVICES; nvidia-smi answers
# where torch is not installed yet.
gpu_count() {
    "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null && return
    { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true
}
GPUS=$(gpu_count)
NPROC=$GPUS
[ "${GPUS:-0}" -lt 2 ] && NPROC="<GPUs>"    # the torchrun stage runs with 2+ GPUs only

# ---------------------------------------------------------------------------- the stages
NAMES=(); LIMITS=(); COMMANDS=()
stage() { NAMES+=("$1"); LIMITS+=("$2"); COMMANDS+=("$3"); }
stage "install" 120 \
    "$PY -m pip install -q -r requirements.txt pytest hypothesis numpy"
stage "tests on CUDA" 200 \
    "D3PM_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider"
stage "CIFAR-10 shape, DiT-S/2, batch 128" 180 \
    "$PY scripts/gpu_speed.py cifar --out $OUT/cifar"
stage "python d3pm_runner.py (defaults)" 120 \
    "$PY scripts/gpu_speed.py mnist --out $OUT/mnist"
stage "torchrun over NCCL" 120 \
    "$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC d3pm_runner_cifar.py --preset fake --device cuda --num-timesteps 5 --train-steps 2 --log-every 1 --eval-images 2 --num-samples 4 --out $OUT/ddp"
stage "bench.py --device cuda" 180 \
    "$PY bench.py --device cuda"
TORCHRUN=4                                   # the torchrun stage's index

if [ "$DRY" = 1 ]; then
    echo "gpu_check: the stages in order, each with its own limit, $BUDGET s for all (this machine: ${GPUS:-0} GPUs visible)"
    for i in "${!NAMES[@]}"; do
        note=""
        [ "$i" = "$TORCHRUN" ] && note="  [only with 2+ GPUs]"
        printf '  %d. %-36s %4d s  %s%s\n' "$((i + 1))" "${NAMES[$i]}" "${LIMITS[$i]}" "${COMMANDS[$i]}" "$note"
    done
    exit 0
fi
if [ "${GPUS:-0}" -lt 1 ]; then
    echo "gpu_check: no GPU is visible (torch and nvidia-smi see none); nothing run"
    exit 0
fi

# ---------------------------------------------------------------------------- running them
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
START=$SECONDS
FAILED=""
ROWS=""

result_of() {  # the table cell for stage $1 from its log $2
    case "$1" in
        install) echo "requirements installed" ;;
        "tests on CUDA") grep -E '(passed|failed|error)' "$2" | tail -n 1 ;;
        torchrun*) grep -o 'weights identical across [0-9]* ranks: [A-Za-z]*' "$2" | tail -n 1 ;;
        CIFAR*) tail -n 1 "$OUT/cifar/report.txt" ;;
        python*) tail -n 1 "$OUT/mnist/report.txt" ;;
        bench.py*) echo "table below" ;;
    esac
}

for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    if [ "$i" = "$TORCHRUN" ] && [ "$GPUS" -lt 2 ]; then
        ROWS+="| $name | skipped: one GPU |  |"$'\n'
        continue
    fi
    left=$((BUDGET - (SECONDS - START)))
    limit=$((LIMITS[i] < left ? LIMITS[i] : left))
    log=$OUT/$((i + 1))-$(echo "$name" | tr -c 'A-Za-z0-9\n' '_' | cut -c1-40).log
    echo "== $((i + 1)). $name (limit $limit s): ${COMMANDS[$i]}"
    t0=$SECONDS
    if [ "$limit" -le 0 ]; then
        status=124
    else
        timeout --kill-after=10 "$limit" bash -c "${COMMANDS[$i]}" >"$log" 2>&1
        status=$?
    fi
    if [ "$status" = 0 ] && [ "$i" = "$TORCHRUN" ] && ! grep -q "ranks: True" "$log"; then
        status=1                             # ran, but no "weights identical ...: True"
    fi
    took=$((SECONDS - t0))
    if [ "$status" = 0 ]; then
        cell=$(result_of "$name" "$log")
    else
        [ "$status" = 124 ] && cell="FAILED: time limit ($limit s)" || cell="FAILED (exit $status)"
        [ "$name" = "tests on CUDA" ] && cell+=": $(result_of "$name" "$log")"
        tail -n 30 "$log" 2>/dev/null
        FAILED=${FAILED:-$name}
    fi
    echo "   $cell ($took s)"
    ROWS+="| $name | $cell | $took s |"$'\n'
    if [ -n "$FAILED" ] && [ "$KEEP" = 0 ]; then
        break
    fi
done

# ---------------------------------------------------------------------------- the summary
{
    echo "GPU check (\`bash scripts/gpu_check.sh\`), $(date -u +%Y-%m-%d): $("$PY" -c 'import torch; print(f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>/dev/null), driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1), $(nproc --all) CPU cores, $((SECONDS - START)) s in all"
    echo
    echo "| stage | result | wall |"
    echo "| --- | --- | --- |"
    printf '%s' "$ROWS"
    for report in "$OUT"/cifar/report.txt "$OUT"/mnist/report.txt; do
        [ -s "$report" ] && { echo; echo '```'; cat "$report"; echo '```'; }
    done
    bench=$(ls "$OUT"/*bench_py*.log 2>/dev/null | head -n 1)
    if [ -n "$bench" ] && grep -q '^shape' "$bench"; then
        echo; echo '```'; sed -n '/^torch /p; /^shape /,$p' "$bench"; echo '```'
    fi
} >"$SUMMARY"
echo
cat "$SUMMARY"
if [ -n "$FAILED" ]; then
    echo "gpu_check: FAILED at \"$FAILED\"; logs in $OUT" >&2
    exit 1
fi
