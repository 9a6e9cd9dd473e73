#!/bin/bash
# Parallel checks of the patched Megatron-LM on a 2-GPU machine (the run described in
# examples/README.md): PP=2 (fixed [s, b, n*C] shapes from the patched schedules), PP=2 with
# virtual stages, EP=2 MoE with mHC, plain baselines for step time; then on one GPU a short mHC
# run with a checkpoint and `gain-report --batch` on it, and the MoE demo.
# Needs a pristine Megatron-LM core_v0.19.0 tree at $MEGATRON_LM; logs go to $LOG_DIR.
set -uo pipefail
: "${MEGATRON_LM:?}" "${LOG_DIR:?}"
PYTHON=${PYTHON:-python}
export PYTHON MEGATRON_LM
mkdir -p "$LOG_DIR"
HERE=$(cd "$(dirname "$0")" && pwd)
run() { local name=$1; shift; echo "== $name"; "$@" > "$LOG_DIR/$name.log" 2>&1; local rc=$?;
        grep -h "iteration  *[0-9]*/ *[0-9]* |" "$LOG_DIR/$name.log" | tail -n 1 | cut -c 1-260
        grep -h "\[mhc\]" "$LOG_DIR/$name.log" | tail -n 1; echo "== $name rc=$rc"; }

$PYTHON -m megatron_mhc.tools.cli patch apply "$MEGATRON_LM" || exit 1
MOE=(--num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
     --moe-aux-loss-coeff 0.01 --expert-model-parallel-size 2)
GPUS=2 PP=2 run pp2_mhc bash "$HERE/pretrain_gpt_mhc.sh"
GPUS=2 PP=2 MHC_ARGS="" run pp2_plain bash "$HERE/pretrain_gpt_mhc.sh"
GPUS=2 PP=2 run pp2_vpp2_mhc bash "$HERE/pretrain_gpt_mhc.sh" --num-layers-per-virtual-pipeline-stage 3
GPUS=2 run ep2_moe_mhc bash "$HERE/pretrain_gpt_mhc.sh" "${MOE[@]}"
GPUS=2 MHC_ARGS="" run ep2_moe_plain bash "$HERE/pretrain_gpt_mhc.sh" "${MOE[@]}"
CUDA_VISIBLE_DEVICES=0 ITERS=20 SAVE_INTERVAL=20 CKPT=$LOG_DIR/ckpt run one_gpu_ckpt bash "$HERE/pretrain_gpt_mhc.sh"
$PYTHON -c "import torch; torch.save(torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(0)), '$LOG_DIR/batch.pt')"
CUDA_VISIBLE_DEVICES=0 $PYTHON -m megatron_mhc.tools.cli gain-report "$LOG_DIR/ckpt" --batch "$LOG_DIR/batch.pt" \
    --out "$LOG_DIR/gain_batch" > "$LOG_DIR/gain_batch.log" 2>&1; echo "gain_batch rc=$?"
grep -v "arn" "$LOG_DIR/gain_batch.log" | tail -n 6
CUDA_VISIBLE_DEVICES=0 bash "$HERE/moe_mhc_demo.sh" --steps 1500 > "$LOG_DIR/moe_demo.log" 2>&1; echo "moe_demo rc=$?"
tail -n 5 "$LOG_DIR/moe_demo.log"
rm -rf "$LOG_DIR/ckpt"
