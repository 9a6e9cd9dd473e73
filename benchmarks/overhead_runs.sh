#!/usr/bin/env bash
# The mHC-overhead benchmarks of benchmarks/RESULTS.md (issue 14), on one GPU after the staging in
# benchmarks/device_setup.sh's header (TE built). One stage per device call; every table's
# before/after pairs come from the same process (interleaved rounds):
#
#   bash benchmarks/overhead_runs.sh tests    the Triton kernel tests on the GPU (float64 reference, 16-bit
#                                             tl.dot, autotuned tiles; errors to $OUT/gpu_report.jsonl)
#   bash benchmarks/overhead_runs.sh kernels  bench_kernels.py: every op vs its floor and TileKernels,
#                                             then one sublayer's whole mHC work vs TE (with and
#                                             without its grad buffer) and Liger, C = 4096 and 7168
#   bash benchmarks/overhead_runs.sh layer    bench_layer.py on TE and local: plain vs mHC with the
#                                             linked pair (bf16 / tf32 backward GEMMs) and unlinked;
#                                             C = 4096 (4 layers) and C = 7168 (2 layers)
#   bash benchmarks/overhead_runs.sh host     bench_host_overhead.py: host time and kernels per call,
#                                             linked vs unlinked sublayer ops
#   bash benchmarks/overhead_runs.sh dxonce   the opt-in "dx once" backward (MHC_BACKWARD_DX_ONCE):
#                                             its GPU tests, the dx-pass probe, one sublayer with
#                                             and without it (C = 4096, 7168), and the TE block
#                                             (C = 4096, 4 layers) when Transformer-Engine imports;
#                                             STEPS="tests probe" / "sublayer block" splits it
#                                             over two device calls (600 s each)
#
# Each stage's output goes to $OUT/<stage>.txt and is printed.
set -uo pipefail
STAGE=${1:?usage: overhead_runs.sh tests|kernels|layer|host|dxonce}
source benchmarks/device_setup.sh || exit 1
mkdir -p "${OUT:=/tmp/out}"
log=$OUT/$STAGE.txt
case $STAGE in
tests)
    MHC_GPU_REPORT=$OUT/gpu_report.jsonl timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q \
        -p no:cacheprovider tests/test_triton_kernels.py > "$log" 2>&1
    rc=$?; tail -n 6 "$log"; cat "$OUT/gpu_report.jsonl" 2>/dev/null; exit $rc ;;
kernels)
    python3 benchmarks/bench_kernels.py --hidden 4096 7168 > "$log" 2>&1 ;;
layer)
    for shape in "--hidden 4096 --layers 4" "--hidden 7168 --heads 56 --layers 2"; do
        # shellcheck disable=SC2086
        python3 benchmarks/bench_layer.py --impl te,local $shape \
            --backends triton,triton-unlinked,triton-tf32 >> "$log" 2>&1
    done ;;
host)
    python3 benchmarks/bench_host_overhead.py >> "$log" 2>&1 ;;
dxonce)
    steps=" ${STEPS:-tests probe sublayer block} "
    step() {  # step NAME COMMAND...: run it if NAME is in STEPS, output and rc= into the log
        [[ $steps == *" $1 "* ]] || return 0
        shift; echo "== $*" >> "$log"
        timeout "${STEP_TIMEOUT:-420}" "$@" >> "$log" 2>&1; echo "rc=$?" >> "$log"
    }
    step tests python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
        -k "dx_once or token_splits"
    step probe python3 benchmarks/probes/probe_dx_once.py --shapes 8192x4096 8192x7168
    step sublayer python3 benchmarks/bench_kernels.py --only sublayer --hidden 4096 7168 --rounds 3
    if python3 -c "import transformer_engine.pytorch" 2> /dev/null; then
        step block python3 benchmarks/bench_layer.py --impl te --hidden 4096 --layers 4 \
            --rounds 3 --backends triton,triton-dx-once
    elif [[ $steps == *" block "* ]]; then
        echo "== TE block not run: Transformer-Engine does not import (stage it first)" >> "$log"
    fi
    ! grep -q "^rc=[1-9]" "$log" ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
rc=$?
cat "$log"
exit $rc
