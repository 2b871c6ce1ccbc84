#!/usr/bin/env bash
# The GPU checks, offline, in under 10 minutes: the wide (accelerator-regime)
# benchmark and the SmolLM2 benchmark on cuda, and the pipeline's overhead over
# the forward pass alone (SmolLM2's `efficiency` column: forward-only time / the
# arm's time; overhead = 1 / efficiency - 1). Every table is printed and kept as
# JSON under $GPU_CHECK_OUT (default ./gpu-check).
#
# Where no CUDA device is found it says so and runs the same steps on cpu at
# smoke sizes, so the script itself is checked anywhere (those numbers are not
# GPU numbers). Arguments: none. Environment: PYTHON (default python),
# GPU_CHECK_OUT, GPU_CHECK_WORKDIR (run folders: put them on the disk to measure).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$OUT"
WORKDIR=()
[ -n "${GPU_CHECK_WORKDIR:-}" ] && WORKDIR=(--workdir "$GPU_CHECK_WORKDIR")

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda
    WIDE=(--gb 1.074 --repeats 3)
    SMOLLM2=(--tokens 65536 --repeats 3)
    LIMITS=(330 200)
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
else
    DEVICE=cpu
    echo "gpu_check: NO CUDA DEVICE here: running the same checks on cpu at smoke"
    echo "gpu_check: sizes (these are not GPU numbers)."
    WIDE=(--quick --width 64 --arms forward-only,ours-plain,ours,dd)
    SMOLLM2=(--tokens 2048 --repeats 1)
    LIMITS=(480 480)
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
echo "gpu_check: device $DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

status=0
step() {  # step NAME LIMIT_S ARGS...: one benchmark, its table printed
    local name=$1 limit=$2
    shift 2
    echo
    echo "== gpu_check: $name (at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$PY" -m sae_cache_ext bench --device "$DEVICE" "${WORKDIR[@]}" \
        --json "$OUT/$name.json" "$@"
    local rc=$?
    echo "== gpu_check: $name took $((SECONDS - start)) s, exit status $rc"
    [ "$rc" -eq 0 ] || status=1
}

step wide "${LIMITS[0]}" --model wide "${WIDE[@]}"
step smollm2 "${LIMITS[1]}" --model smollm2 --arms forward-only,upstream,ours "${SMOLLM2[@]}"

"$PY" - "$OUT/smollm2.json" <<'PY' || status=1
import json, sys
report = json.load(open(sys.argv[1]))
for model, arms in report["efficiency"].items():
    for arm, eff in arms.items():
        if eff:
            print(f"pipeline overhead over the forward pass alone, {model} {arm}: "
                  f"{100 * (1 / eff - 1):.1f}% (efficiency {eff:.3f})")
PY
exit $status
