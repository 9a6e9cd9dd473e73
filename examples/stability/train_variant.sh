#!/bin/bash
# One stability run (issue 6): the same 12-layer, C=768 GPT on the prepared corpus, same seed, data
# order and token budget, as the plain residual, HC (n=4) or mHC (n=4).
#
#   python tools/prepare_corpus.py --out data/corpus                   # once
#   MEGATRON_LM=/path/to/patched/Megatron-LM bash examples/stability/train_variant.sh mhc
#
# VARIANT: residual (plain Megatron, no mHC code) | hc | mhc. Checkpoints every 250 iterations to
# runs/stability/<variant>/ckpt and resumes from there, so a run can be split across calls
# (EXIT_MINUTES, default 9, stops cleanly with a checkpoint). Logs: runs/stability/<variant>/
# (stdout log with loss, grad norm and `[mhc]` gain lines every 50 iterations; TensorBoard).
set -euo pipefail
VARIANT=${1:?usage: train_variant.sh residual|hc|mhc}
: "${MEGATRON_LM:?set MEGATRON_LM to a patched Megatron-LM core_v0.19.0 checkout}"
DATA=${DATA:-data/corpus}
RUN=${RUN_DIR:-runs/stability}/$VARIANT
ITERS=${ITERS:-1000}        # x 16 x 1024 tokens = 16.4M tokens (~2 epochs of the 7.7M-token corpus)
PYTHON=${PYTHON:-python}
case $VARIANT in
    residual) MHC=() ;;
    hc) MHC=(--enable-mhc --mhc-variant hc --mhc-expansion-rate 4 --mhc-log-interval 50) ;;
    mhc) MHC=(--enable-mhc --mhc-variant mhc --mhc-expansion-rate 4 --mhc-log-interval 50) ;;
    *) echo "VARIANT $VARIANT: allowed residual, hc, mhc" >&2; exit 2 ;;
esac
mkdir -p "$RUN"
$PYTHON -m torch.distributed.run --nproc-per-node 1 "$MEGATRON_LM/pretrain_gpt.py" \
    --num-layers 12 --hidden-size 768 --ffn-hidden-size 2048 --num-attention-heads 12 \
    --seq-length 1024 --max-position-embeddings 1024 --normalization RMSNorm --swiglu \
    --disable-bias-linear --position-embedding-type rope --no-rope-fusion \
    --untie-embeddings-and-output-weights --transformer-impl local \
    --no-gradient-accumulation-fusion --no-persist-layer-norm --no-masked-softmax-fusion \
    --hidden-dropout 0 --attention-dropout 0 --bf16 --seed 1234 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 50 \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --init-method-std 0.02 \
    --train-data-path "$DATA/corpus_train_text_document" \
    --valid-data-path "$DATA/corpus_valid_text_document" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/tokenizer/vocab.json" \
    --merge-file "$DATA/tokenizer/merges.txt" --num-workers 1 \
    --log-interval 10 --log-params-norm --eval-interval 100 --eval-iters 10 \
    --tensorboard-dir "$RUN/tb" --save "$RUN/ckpt" --load "$RUN/ckpt" --save-interval 250 \
    --exit-duration-in-mins "${EXIT_MINUTES:-9}" --ckpt-format torch_dist \
    "${MHC[@]}" 2>&1 | tee -a "$RUN/train.log"
