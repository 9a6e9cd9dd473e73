#!/bin/bash
# A DeepSeek-style MoE GPT with mHC (n = 4) through the patched Megatron-LM pretrain_gpt.py, on
# mock data: every layer MoE (8 experts, top-2, alltoall dispatcher, grouped GEMM where
# Transformer-Engine is there, load-balancing aux loss), multi-token prediction, and Megatron's
# expert-parallel overlap (combined 1F1B) when expert parallelism is > 1. The model and training
# flags are pretrain_gpt_mhc.sh's (12 layers x 768); this script adds the MoE ones.
#
#   megatron-mhc patch apply /path/to/Megatron-LM        # a checkout of tag core_v0.19.0
#   MEGATRON_LM=/path/to/Megatron-LM bash examples/pretrain_moe_mhc.sh [extra pretrain_gpt.py args]
#
# One GPU (EP = 1: Megatron-Core 0.19 allows the expert-parallel overlap only with EP > 1):
#   MEGATRON_LM=... bash examples/pretrain_moe_mhc.sh
# Eight GPUs, the layout of Megatron-LM's functional test for mHC with EP overlap (TP 2, PP 2 with
# VPP 2 = 3 layers per virtual stage, DP 2, EP 4, ETP 1, sequence parallel, EP overlap):
#   MEGATRON_LM=... IMPL=te TP=2 PP=2 SP=1 GPUS=8 EP=4 EP_OVERLAP=1 VPP_LAYERS=3 \
#       bash examples/pretrain_moe_mhc.sh
#
# Environment (besides pretrain_gpt_mhc.sh's: IMPL, TP, PP, SP, GPUS, ITERS, MHC_ARGS, ...):
#   EXPERTS     experts per MoE layer (default 8); TOPK (default 2)
#   EP          expert parallel size (default 1); must divide EXPERTS and GPUS / PP (set GPUS
#               when EP > 1: pretrain_gpt_mhc.sh's default is TP * PP * CP)
#   EP_OVERLAP=1  --overlap-moe-expert-parallel-comm (needs EP > 1; with PP > 1 also VPP_LAYERS)
#   VPP_LAYERS  --num-layers-per-virtual-pipeline-stage (interleaved pipeline; needs PP > 1)
#   MTP         --mtp-num-layers (default 1; 0 for none; EP overlap allows at most 1)
#   DELAY_WGRAD=1  --delay-wgrad-compute: Transformer-Engine's weight gradients deferred inside the
#               EP-overlap schedule (needs EP_OVERLAP=1 and IMPL=te; not with GRAPHS=transformer_engine,
#               which mHC refuses together with it)
# Transformer-Engine's per-layer CUDA graphs scoped to attention, as in that functional test:
# GRAPHS=transformer_engine GRAPH_MODULES=attn (pretrain_gpt_mhc.sh's variables; the default mHC
# flags then drop --mhc-recompute-block, which graphs refuse). On one GPU this script ran with them
# (20 iterations, EP = 1, examples/README.md).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EXPERTS=${EXPERTS:-8}
TOPK=${TOPK:-2}
EP=${EP:-1}
MTP=${MTP:-1}
PP=${PP:-1}
PYTHON=${PYTHON:-python}
fail() { echo "pretrain_moe_mhc.sh: $*" >&2; exit 2; }
[[ $EXPERTS =~ ^[1-9][0-9]*$ ]] || fail "EXPERTS=$EXPERTS: allowed a positive integer"
[[ $TOPK =~ ^[1-9][0-9]*$ && $TOPK -le $EXPERTS ]] || fail "TOPK=$TOPK: allowed 1 .. EXPERTS ($EXPERTS)"
[[ $EP =~ ^[1-9][0-9]*$ ]] || fail "EP=$EP: allowed a positive integer"
[[ $PP =~ ^[1-9][0-9]*$ ]] || fail "PP=$PP: allowed a positive integer"
(( EXPERTS % EP == 0 )) || fail "EP=$EP must divide EXPERTS=$EXPERTS"
if (( EP > 1 )); then
    [[ ${GPUS:-} =~ ^[1-9][0-9]*$ ]] || fail "EP=$EP needs GPUS set (the number of GPUs; EP must divide GPUS / PP)"
    (( GPUS % PP == 0 && (GPUS / PP) % EP == 0 )) || fail "EP=$EP must divide GPUS / PP = $GPUS / $PP"
fi
[[ $MTP =~ ^[0-9]+$ ]] || fail "MTP=$MTP: allowed 0 (none) or a positive integer"
MOE=(--num-experts "$EXPERTS" --moe-router-topk "$TOPK" --moe-token-dispatcher-type alltoall
     --moe-aux-loss-coeff 0.01 --moe-router-load-balancing-type aux_loss
     --expert-model-parallel-size "$EP" --expert-tensor-parallel-size 1)
if [[ ${IMPL:-auto} != local ]] && $PYTHON -c "import transformer_engine.pytorch" 2>/dev/null; then
    MOE+=(--moe-grouped-gemm)
fi
(( MTP > 0 )) && MOE+=(--mtp-num-layers "$MTP")
if [[ -n "${VPP_LAYERS:-}" ]]; then
    (( PP > 1 )) || fail "VPP_LAYERS=$VPP_LAYERS needs PP > 1 (got PP=$PP)"
    MOE+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
fi
case ${EP_OVERLAP:-0} in
    0) ;;
    1) (( EP > 1 )) || fail "EP_OVERLAP=1 (--overlap-moe-expert-parallel-comm) needs EP > 1: Megatron-Core 0.19 allows it only with expert parallelism (got EP=$EP)"
       (( MTP <= 1 )) || fail "EP_OVERLAP=1 allows at most one MTP layer (got MTP=$MTP)"
       (( PP == 1 )) || [[ -n "${VPP_LAYERS:-}" ]] || fail "EP_OVERLAP=1 with PP=$PP needs the interleaved pipeline (set VPP_LAYERS)"
       MOE+=(--overlap-moe-expert-parallel-comm) ;;
    *) fail "EP_OVERLAP=$EP_OVERLAP: allowed 0, 1" ;;
esac
case ${DELAY_WGRAD:-0} in
    0) ;;
    1) [[ ${EP_OVERLAP:-0} == 1 ]] || fail "DELAY_WGRAD=1 (--delay-wgrad-compute) needs EP_OVERLAP=1: Megatron defers the weight gradients inside the expert-parallel overlap schedule"
       [[ ${IMPL:-auto} == te ]] || fail "DELAY_WGRAD=1 (--delay-wgrad-compute) needs IMPL=te: Megatron defers Transformer-Engine's weight gradients only"
       [[ ${GRAPHS:-} != transformer_engine ]] || fail "DELAY_WGRAD=1 with GRAPHS=transformer_engine is refused with mHC (not run together); drop one of them"
       MOE+=(--delay-wgrad-compute) ;;
    *) fail "DELAY_WGRAD=$DELAY_WGRAD: allowed 0, 1" ;;
esac
PP=$PP PYTHON=$PYTHON exec bash "$HERE/pretrain_gpt_mhc.sh" "${MOE[@]}" "$@"
