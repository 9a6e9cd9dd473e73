#!/bin/bash
# Train a small GPT with mHC (n = 4) through the patched Megatron-LM pretrain_gpt.py, on mock data.
#
#   megatron-mhc patch apply /path/to/Megatron-LM        # a checkout of tag core_v0.19.0
#   MEGATRON_LM=/path/to/Megatron-LM bash examples/pretrain_gpt_mhc.sh [extra pretrain_gpt.py args]
#
# Environment:
#   IMPL      te | local | auto (default): Transformer-Engine when it imports, else the local
#             implementation (the log says which and why)
#   TP, PP, CP  tensor / pipeline / context parallel sizes (default 1); GPUS defaults to TP*PP*CP
#             (more GPUs: data parallelism). TP or CP > 1 sets CUDA_DEVICE_MAX_CONNECTIONS=1.
#   SP=1      sequence parallelism (needs TP > 1 and TE norms: IMPL te)
#   FP8=1     FP8 GEMMs in the sublayers (--fp8-format hybrid, delayed scaling; needs TE); the mHC
#             mappings stay in bf16 / fp32
#   GRAPHS    local: Megatron's per-layer CUDA graphs (--cuda-graph-impl local);
#             transformer_engine: Transformer-Engine's per-layer graphs captured by Megatron's
#             TECudaGraphHelper (IMPL=te); the default mHC flags then drop --mhc-recompute-block
#             (host-side recompute cannot be replayed)
#   GRAPH_MODULES  --cuda-graph-modules for GRAPHS=transformer_engine, e.g. "attn" (default: the
#             whole layer)
#   DISTOPT=1 --use-distributed-optimizer
#   GRAD_FUSION=1  Megatron's --gradient-accumulation-fusion (weight grads, mHC's included, added
#             straight into the float32 main_grad); Megatron needs Apex's
#             fused_weight_gradient_mlp_cuda for its output layer (machines without Apex:
#             tools/device/apex_shim on PYTHONPATH, a PyTorch stand-in). Default: off
#   MASTER_PORT (default 29500; give concurrent runs different ports), ITERS (default 100), CKPT (a folder: save there every SAVE_INTERVAL=50 iterations), LOAD (a
#   folder to resume from), MHC_ARGS (replace the mHC flags, e.g. "--enable-mhc --mhc-variant
#   residual" for the ablation, or "" for plain Megatron), PYTHON (default python),
#   LAUNCH + SKIP_PATCH_CHECK=1 to run an unpatched tree through the runtime launcher:
#   LAUNCH="-m megatron_mhc.training.launch $MEGATRON_LM/pretrain_gpt.py" SKIP_PATCH_CHECK=1
set -euo pipefail

: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM core_v0.19.0 checkout}"
TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-1}
GPUS=${GPUS:-$((TP * PP * CP))}
ITERS=${ITERS:-100}
DEFAULT_MHC_ARGS="--enable-mhc --mhc-expansion-rate 4 --mhc-recompute-block auto --mhc-log-interval 10"
if [[ -n "${GRAPHS:-}" ]]; then
    DEFAULT_MHC_ARGS="--enable-mhc --mhc-expansion-rate 4 --mhc-log-interval 10"
fi
MHC_ARGS=${MHC_ARGS-$DEFAULT_MHC_ARGS}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-"$MEGATRON_LM/pretrain_gpt.py"}  # or "-m megatron_mhc.training.launch <tree>/pretrain_gpt.py"

fail() { echo "pretrain_gpt_mhc.sh: $*" >&2; exit 2; }
IMPL=${IMPL:-auto}
if [[ $IMPL == auto ]]; then
    if te_error=$($PYTHON -c "import transformer_engine.pytorch" 2>&1); then
        IMPL=te; echo "pretrain_gpt_mhc.sh: Transformer-Engine imports: --transformer-impl transformer_engine"
    else
        IMPL=local
        echo "pretrain_gpt_mhc.sh: Transformer-Engine does not import ($(echo "$te_error" | tail -n 1)): --transformer-impl local"
    fi
fi
case $IMPL in te|local) ;; *) fail "IMPL=$IMPL: allowed te, local, auto" ;; esac
if [[ "${SP:-0}" == 1 && ( $TP -lt 2 || $IMPL != te ) ]]; then
    fail "SP=1 needs TP > 1 and IMPL=te (Megatron's local norms refuse sequence parallelism); got TP=$TP IMPL=$IMPL"
fi
[[ "${FP8:-0}" == 1 && $IMPL != te ]] && fail "FP8=1 needs Transformer-Engine (IMPL=te); got IMPL=$IMPL"
[[ $CP -gt 1 && $IMPL != te ]] && fail "CP=$CP needs Transformer-Engine attention (IMPL=te); got IMPL=$IMPL"
case ${GRAPHS:-} in
    ""|local) ;;
    transformer_engine) [[ $IMPL == te ]] || fail "GRAPHS=transformer_engine needs Transformer-Engine (IMPL=te); got IMPL=$IMPL" ;;
    *) fail "GRAPHS=$GRAPHS: allowed local, transformer_engine (or unset)" ;;
esac
[[ -n "${GRAPH_MODULES:-}" && "${GRAPHS:-}" != transformer_engine ]] \
    && fail "GRAPH_MODULES=$GRAPH_MODULES needs GRAPHS=transformer_engine; got GRAPHS=${GRAPHS:-unset}"
case ${GRAD_FUSION:-0} in
    0) ;;
    1) $PYTHON -c "import fused_weight_gradient_mlp_cuda" 2>/dev/null \
           || fail "GRAD_FUSION=1 needs Apex's fused_weight_gradient_mlp_cuda (Megatron's output layer); without Apex put tools/device/apex_shim on PYTHONPATH" ;;
    *) fail "GRAD_FUSION=$GRAD_FUSION: allowed 0, 1" ;;
esac
if [[ $TP -gt 1 || $CP -gt 1 ]]; then
    # Megatron requires it for TP / CP overlap ordering (TP=2 fails without it).
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi

if [[ -z "${SKIP_PATCH_CHECK:-}" ]] && ! $PYTHON -m megatron_mhc.tools.cli patch check "$MEGATRON_LM" >/dev/null; then
    $PYTHON -m megatron_mhc.tools.cli patch check "$MEGATRON_LM" || true
    echo "Apply the patch set first: megatron-mhc patch apply $MEGATRON_LM" >&2
    exit 1
fi

MODEL_ARGS=(
    --num-layers 12 --hidden-size 768 --ffn-hidden-size 2048 --num-attention-heads 12
    --seq-length 1024 --max-position-embeddings 1024
    --normalization RMSNorm --swiglu --disable-bias-linear
    --position-embedding-type rope --no-rope-fusion --untie-embeddings-and-output-weights
    --no-persist-layer-norm
    --no-masked-softmax-fusion --hidden-dropout 0 --attention-dropout 0
)
if [[ $IMPL == te ]]; then
    MODEL_ARGS+=(--transformer-impl transformer_engine)
else
    MODEL_ARGS+=(--transformer-impl local)
fi
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size 32 --train-iters "$ITERS"
    --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 10
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --init-method-std 0.02 --bf16
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --context-parallel-size "$CP"
)
[[ "${SP:-0}" == 1 ]] && TRAIN_ARGS+=(--sequence-parallel)
[[ "${FP8:-0}" == 1 ]] && TRAIN_ARGS+=(--fp8-format hybrid --fp8-amax-history-len 1024
                                       --fp8-amax-compute-algo max)
[[ "${DISTOPT:-0}" == 1 ]] && TRAIN_ARGS+=(--use-distributed-optimizer)
[[ "${GRAD_FUSION:-0}" == 0 ]] && MODEL_ARGS+=(--no-gradient-accumulation-fusion)
if [[ -n "${GRAPHS:-}" ]]; then
    TRAIN_ARGS+=(--cuda-graph-impl "$GRAPHS")
    # shellcheck disable=SC2206
    [[ -n "${GRAPH_MODULES:-}" ]] && TRAIN_ARGS+=(--cuda-graph-modules $GRAPH_MODULES)
fi
DATA_ARGS=(
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --split 99,1,0
    --num-workers 1 --no-create-attention-mask-in-dataloader
)
LOG_ARGS=(--log-interval 10 --eval-interval 1000 --eval-iters 1 --log-throughput)
if [[ -n "${CKPT:-}" ]]; then
    LOG_ARGS+=(--save "$CKPT" --save-interval "${SAVE_INTERVAL:-50}" --ckpt-format torch_dist)
fi
if [[ -n "${LOAD:-}" ]]; then
    LOG_ARGS+=(--load "$LOAD" --ckpt-format torch_dist)
fi

# shellcheck disable=SC2086
$PYTHON -m torch.distributed.run --nproc-per-node "$GPUS" --master-port "${MASTER_PORT:-29500}" $LAUNCH \
    "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${LOG_ARGS[@]}" $MHC_ARGS "$@"
