#!/usr/bin/env bash
# The Transformer-Engine stack runs of examples/README.md, on a GPU machine after the staging in
# benchmarks/device_setup.sh's header (TE built, /tmp/mlm patched). One stage per device call:
#
#   bash benchmarks/te_stack_runs.sh tests     GPU tests (TE incl. inference, CUDA graphs) on GPU 0 and
#                                              bench_layer.py --impl te,local on GPU 1 (if present)
#   bash benchmarks/te_stack_runs.sh parallel  2 GPUs: TP=2+SP, CP=2, PP=2 on TE, mHC then plain
#   bash benchmarks/te_stack_runs.sh precision 2 GPUs as two 1-GPU jobs at once (mHC on GPU 0,
#                                              plain on GPU 1): FP8 hybrid, then bf16, 100 its
#   bash benchmarks/te_stack_runs.sh graphs    the same pairs with --cuda-graph-impl local
#                                              (full_iteration is refused with --enable-mhc)
#   bash benchmarks/te_stack_runs.sh tegraphs  1 GPU: eager, --cuda-graph-impl local and
#                                              --cuda-graph-impl transformer_engine, plain and
#                                              mHC, one after the other in ROUNDS (default 1)
#                                              interleaved rounds of ITERS (default 40)
#   bash benchmarks/te_stack_runs.sh overhead  1 GPU: plain, mHC (linked kernels) and mHC with
#                                              MHC_CROSS_SUBLAYER_FUSION=1, one after the other,
#                                              in ROUNDS (default 2) interleaved rounds of ITERS
#                                              (default 50) iterations: the step-time overhead
#                                              (FIRST_ROUND=2: add a round to the same table)
#   bash benchmarks/te_stack_runs.sh losscurve 1 GPU: 200 iterations at global batch 8 with the
#                                              triton kernels (twice: the run-to-run noise), the
#                                              torch backend and cross-sublayer fusion; every
#                                              loss curve compared with the first triton run's
#                                              (RUNS="torch_b ...": other runs; torch* names run
#                                              the torch backend, *fused* names turn fusion on,
#                                              *dxonce* names MHC_BACKWARD_DX_ONCE=1)
#   bash benchmarks/te_stack_runs.sh profile   1 GPU: plain then mHC, ITERS (default 30) iterations
#                                              each, PyTorch profiler over iterations 20-22
#                                              (GRAPHS=local: with per-layer CUDA graphs); GPU
#                                              time per step by kind of kernel for both
#                                              (benchmarks/summarize_profile.py)
#   bash benchmarks/te_stack_runs.sh gradfusion 1 GPU: Megatron's --gradient-accumulation-fusion
#                                              (mHC grads added into main_grad by the kernel)
#                                              vs without, plain and mHC, in ROUNDS (default 1)
#                                              interleaved rounds of ITERS (default 40); loss
#                                              curves against the mHC run without the flag
#   bash benchmarks/te_stack_runs.sh resume    2 GPUs, DP=2 + --use-distributed-optimizer: an
#                                              uninterrupted run vs one stopped by --exit-interval
#                                              and resumed; checkpoints compared bit for bit
#
# The 12-layer C=768 model of examples/pretrain_gpt_mhc.sh on mock data. mHC flags: the example's
# defaults (recompute L_r auto) for `parallel` and `resume`; without mHC recompute for
# `precision` and `graphs` (graphs cannot replay the host-side recompute), so those four pairs
# compare like with like. Logs go to $OUT/<stage>.tar.xz; the table is printed last.
set -uo pipefail
STAGE=${1:?usage: te_stack_runs.sh tests|parallel|precision|graphs|tegraphs|overhead|losscurve|profile|gradfusion|resume}
source benchmarks/device_setup.sh || exit 1
export MEGATRON_LM=/tmp/mlm PYTHON=python3 IMPL=te
LOGS=/tmp/logs/$STAGE && mkdir -p "$LOGS" "${OUT:=/tmp/out}"
NO_RECOMPUTE="--enable-mhc --mhc-expansion-rate 4 --mhc-log-interval 10"
if [[ "${GRAD_FUSION:-0}" == 1 || $STAGE == gradfusion ]] \
        && ! python3 -c "import fused_weight_gradient_mlp_cuda" 2>/dev/null; then
    # No Apex here: Megatron's output layer gets the PyTorch stand-in (tools/device/apex_shim).
    export PYTHONPATH=$PWD/tools/device/apex_shim:$PYTHONPATH
    echo "te_stack_runs.sh: Apex absent, fused_weight_gradient_mlp_cuda from tools/device/apex_shim"
fi

run() {  # run NAME VAR=VALUE... : one example run, its log in $LOGS/NAME.log
    local name=$1; shift
    local t0=$SECONDS
    env "$@" timeout "${RUN_TIMEOUT:-240}" bash examples/pretrain_gpt_mhc.sh ${EXTRA_ARGS:-} > "$LOGS/$name.log" 2>&1
    echo "$name: rc=$? in $((SECONDS - t0)) s"
}
pair() {  # pair NAME VAR=VALUE... : mHC on GPU 0 and plain on GPU 1 at the same time
    local name=$1; shift
    run "${name}_mhc" CUDA_VISIBLE_DEVICES=0 MASTER_PORT=29510 "MHC_ARGS=$NO_RECOMPUTE" "$@" &
    run "${name}_plain" CUDA_VISIBLE_DEVICES=1 MASTER_PORT=29520 MHC_ARGS= "$@" &
    wait
}
table() {
    local args=()
    for log in "$LOGS"/*.log; do args+=("$(basename "$log" .log)=$log"); done
    python3 benchmarks/summarize_pretrain_logs.py "${args[@]}" "$@"
}

case $STAGE in
tests)
    if [[ $(python3 -c 'import torch; print(torch.cuda.device_count())') -ge 2 ]]; then
        CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_layer.py --impl te,local > "$LOGS/bench_layer.txt" 2>&1 &
    fi
    CUDA_VISIBLE_DEVICES=0 MHC_GPU_REPORT=$OUT/gpu_report.jsonl timeout 420 python3 -m pytest -q \
        -p no:cacheprovider tests/test_gpu_te.py tests/test_cuda_graphs.py \
        > "$LOGS/pytest.log" 2>&1
    echo "pytest rc=$?"; wait
    tail -n 25 "$LOGS/pytest.log"; cat "$OUT/gpu_report.jsonl" 2>/dev/null | cut -c1-300
    tail -n 8 "$LOGS/bench_layer.txt" 2>/dev/null
    ;;
parallel)
    export ITERS=${ITERS:-20} GPUS=2
    run tp2_sp_mhc TP=2 SP=1; run tp2_sp_plain TP=2 SP=1 MHC_ARGS=
    run cp2_mhc CP=2; run cp2_plain CP=2 MHC_ARGS=
    run pp2_mhc PP=2; run pp2_plain PP=2 MHC_ARGS=
    table ;;
precision)
    export ITERS=${ITERS:-100} GPUS=1
    pair fp8 FP8=1; pair bf16
    table ;;
graphs)
    export ITERS=${ITERS:-100} GPUS=1
    pair graphs_local GRAPHS=local
    table ;;
tegraphs)
    export ITERS=${ITERS:-40} GPUS=1
    for round in $(seq "${FIRST_ROUND:-1}" "${ROUNDS:-1}"); do
        for graphs in eager local transformer_engine; do
            g=$graphs; [[ $g == eager ]] && g=
            run "${graphs}_plain_r$round" MHC_ARGS= GRAPHS=$g
            run "${graphs}_mhc_r$round" "MHC_ARGS=$NO_RECOMPUTE" GRAPHS=$g
        done
    done
    table ;;
overhead)
    export ITERS=${ITERS:-50} GPUS=1
    for round in $(seq "${FIRST_ROUND:-1}" "${ROUNDS:-2}"); do
        run "plain_r$round" MHC_ARGS=
        run "mhc_r$round" "MHC_ARGS=$NO_RECOMPUTE"
        run "mhc_fused_r$round" "MHC_ARGS=$NO_RECOMPUTE" MHC_CROSS_SUBLAYER_FUSION=1
    done
    table ;;
losscurve)
    export ITERS=200 GPUS=1 EXTRA_ARGS="--global-batch-size 8"
    for name in ${RUNS:-triton_a torch triton_b triton_fused}; do  # the name picks the backend
        backend=triton; [[ $name == torch* ]] && backend=torch
        fusion=0; [[ $name == *fused* ]] && fusion=1
        dx_once=0; [[ $name == *dxonce* ]] && dx_once=1
        run "$name" "MHC_ARGS=$NO_RECOMPUTE --mhc-kernel-backend $backend" \
            MHC_CROSS_SUBLAYER_FUSION=$fusion MHC_BACKWARD_DX_ONCE=$dx_once
    done
    if [[ -f $LOGS/triton_a.log ]]; then table --reference triton_a; else table; fi ;;
profile)
    export ITERS=${ITERS:-30} GPUS=1
    traces=()
    for name in plain mhc; do
        mhc_args=$NO_RECOMPUTE; [[ $name == plain ]] && mhc_args=
        rm -rf "/tmp/prof_$name"
        EXTRA_ARGS="--profile --use-pytorch-profiler --profile-step-start 20 --profile-step-end 22 --tensorboard-dir /tmp/prof_$name/tb" \
            run "profile_$name" "MHC_ARGS=$mhc_args"
        traces+=("$name=/tmp/prof_$name/torch_profile/rank-0.json.gz")
    done
    table
    python3 benchmarks/summarize_profile.py --steps 2 --top 20 "${traces[@]}" | tee "$LOGS/profile_summary.txt" ;;
gradfusion)
    export ITERS=${ITERS:-40} GPUS=1
    for round in $(seq "${FIRST_ROUND:-1}" "${ROUNDS:-1}"); do
        run "mhc_r$round" "MHC_ARGS=$NO_RECOMPUTE" GRAD_FUSION=0
        run "mhc_gradfusion_r$round" "MHC_ARGS=$NO_RECOMPUTE" GRAD_FUSION=1
        run "plain_gradfusion_r$round" MHC_ARGS= GRAD_FUSION=1
        run "plain_r$round" MHC_ARGS= GRAD_FUSION=0
    done
    if [[ -f $LOGS/mhc_r1.log ]]; then table --reference mhc_r1; else table; fi ;;
resume)
    export ITERS=20 GPUS=2 DISTOPT=1 SAVE_INTERVAL=10 NVTE_ALLOW_NONDETERMINISTIC_ALGO=0
    export CUBLAS_WORKSPACE_CONFIG=:4096:8
    rm -rf /tmp/ck_full /tmp/ck_resumed
    run resume_full CKPT=/tmp/ck_full
    EXTRA_ARGS="--exit-interval 10" run resume_first_half CKPT=/tmp/ck_resumed
    run resume_second_half CKPT=/tmp/ck_resumed LOAD=/tmp/ck_resumed
    table
    for it in 0000010 0000020; do
        python3 examples/compare_checkpoints.py /tmp/ck_full/iter_$it /tmp/ck_resumed/iter_$it 2>&1 | tail -n 6
    done ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
tar -C /tmp/logs -cJf "$OUT/$STAGE.tar.xz" "$STAGE"
