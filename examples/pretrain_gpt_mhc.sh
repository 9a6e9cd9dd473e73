#!/bin/bash
# Train a small GPT with mHC (n = 4) through the patched Megatron-LM pretrain_gpt.py, on mock data.
#
#   megatron-mhc patch apply /path/to/Megatron-LM        # a checkout of tag core_v0.19.0
#   MEGATRON_LM=/path/to/Megatron-LM bash examples/pretrain_gpt_mhc.sh [extra pretrain_gpt.py args]
#
# Environment: GPUS (default 1), TP / PP (default 1), ITERS (default 100), CKPT (a folder: save
# there every 50 iterations), MHC_ARGS (replace the mHC flags, e.g. "--enable-mhc
# --mhc-variant residual" for the ablation, or "" for plain Megatron), PYTHON (default python),
# LAUNCH + SKIP_PATCH_CHECK=1 to run an unpatched tree through the runtime launcher:
#   LAUNCH="-m megatron_mhc.training.launch $MEGATRON_LM/pretrain_gpt.py" SKIP_PATCH_CHECK=1 Needs no Transformer-Engine or Apex
# (--transformer-impl local and no CUDA fusions that need them).
set -euo pipefail

: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM core_v0.19.0 checkout}"
GPUS=${GPUS:-1}
TP=${TP:-1}
PP=${PP:-1}
ITERS=${ITERS:-100}
MHC_ARGS=${MHC_ARGS-"--enable-mhc --mhc-expansion-rate 4 --mhc-recompute-block auto --mhc-log-interval 10"}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-"$MEGATRON_LM/pretrain_gpt.py"}  # or "-m megatron_mhc.training.launch <tree>/pretrain_gpt.py"

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
    --transformer-impl local --no-gradient-accumulation-fusion --no-persist-layer-norm
    --no-masked-softmax-fusion --hidden-dropout 0 --attention-dropout 0
)
TRAIN_ARGS=(
    --micro-batch-size 4 --global-batch-size 32 --train-iters "$ITERS"
    --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 10
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --init-method-std 0.02 --bf16
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
)
DATA_ARGS=(
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --split 99,1,0
    --num-workers 1 --no-create-attention-mask-in-dataloader
)
LOG_ARGS=(--log-interval 10 --eval-interval 1000 --eval-iters 1 --log-throughput)
if [[ -n "${CKPT:-}" ]]; then
    LOG_ARGS+=(--save "$CKPT" --save-interval "${SAVE_INTERVAL:-50}" --ckpt-format torch_dist)
fi

# shellcheck disable=SC2086
$PYTHON -m torch.distributed.run --nproc-per-node "$GPUS" $LAUNCH \
    "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${LOG_ARGS[@]}" $MHC_ARGS "$@"
