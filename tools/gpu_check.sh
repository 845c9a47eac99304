#!/usr/bin/env bash
# The maintainer's ten-minute check on one GPU (issue 25):
#
#     tools/gpu_check.sh [OUT_DIR]          # on a machine with one GPU (default output/gpu_check)
#     tools/gpu_check.sh --cpu [OUT_DIR]    # the same steps on the CPU, one iteration each
#
# 1. every configs/kd_shapes distiller a few iterations on CUDA in fp32, with AMP (float16) and
#    with a half-precision teacher; s/iter and peak memory per run (tools/gpu_check.py);
# 2. an AMP run resumed from its checkpoint; two processes on one GPU refused with one line;
# 3. host-device synchronisations per iteration per distiller (tools/count_syncs.py);
# 4. what distillation costs per iteration on the GPU (tools/benchmark_kd.py --device cuda).
#
# Everything is written under OUT_DIR (runs.json, syncs.json, benchmark.json, check.log); the
# figures go into docs/cost.md ("GPU"). Needs the kd_shapes dataset in $DETECTRON2_DATASETS
# (default ./datasets); without it a small one is generated under OUT_DIR. Extra config
# overrides for every run: GPU_CHECK_OPTS="KEY VALUE ..." (values without spaces); other configs
# than every kd_shapes distiller: GPU_CHECK_CONFIGS="A.yaml B.yaml". Exits 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=cuda
ITERS=${GPU_CHECK_ITERS:-5}
if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu
    ITERS=${GPU_CHECK_ITERS:-1}
    shift
fi
OUT=${1:-output/gpu_check}
mkdir -p "$OUT"
read -r -a OPTS <<< "${GPU_CHECK_OPTS:-}"
read -r -a CONFIGS <<< "${GPU_CHECK_CONFIGS:-}"
if ((${#CONFIGS[@]})); then CONFIGS=(--configs "${CONFIGS[@]}"); fi
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-datasets}
failed=()

step() { echo; echo "== $*"; }
run() {  # run NAME COMMAND...: the command's output to the console and check.log
    local name=$1
    shift
    if "$@" 2>&1 | tee -a "$OUT/check.log"; then echo "-- ok: $name"; else failed+=("$name"); echo "-- FAILED: $name"; fi
}

step "environment"
"$PY" - "$DEVICE" <<'PY' || exit 2
import sys, torch
device = sys.argv[1]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("error: no CUDA device: run on a GPU machine, or tools/gpu_check.sh --cpu")
PY

if [[ ! -d "$DETECTRON2_DATASETS/kd_shapes" ]]; then
    step "kd_shapes dataset (not in $DETECTRON2_DATASETS): a small one in $OUT/datasets"
    export DETECTRON2_DATASETS=$OUT/datasets
    [[ -d "$DETECTRON2_DATASETS/kd_shapes" ]] || run "dataset" "$PY" datasets/prepare_synthetic.py \
        --root "$DETECTRON2_DATASETS" --name kd_shapes --seed 0 --num-train 32 --num-val 8
fi

step "1-2. every distiller in fp32, AMP and with a half-precision teacher; resume; refusals"
run "training" "$PY" tools/gpu_check.py "${CONFIGS[@]}" --device "$DEVICE" --iters "$ITERS" \
    --out "$OUT" --json "$OUT/runs.json" "${OPTS[@]}"

step "3. host-device synchronisations per iteration"
run "syncs" "$PY" tools/count_syncs.py "${CONFIGS[@]}" --device "$DEVICE" \
    --iters $((ITERS > 1 ? 2 : 1)) --json "$OUT/syncs.json" "${OPTS[@]}"

step "4. cost of distillation per iteration"
if [[ $DEVICE == cuda ]]; then BENCH=(--iters 4 --repeats 3); else BENCH=(--iters 1 --repeats 1); fi
run "benchmark_kd" "$PY" tools/benchmark_kd.py "${CONFIGS[@]}" --device "$DEVICE" "${BENCH[@]}" \
    --json "$OUT/benchmark.json" "${OPTS[@]}"

echo
if ((${#failed[@]})); then
    echo "gpu_check: FAILED: ${failed[*]} (details in $OUT/check.log)"
    exit 1
fi
echo "gpu_check: all steps passed; results in $OUT (runs.json, syncs.json, benchmark.json)"
