#!/bin/bash
# One stability run (issue 6): the same 12-layer, C=768 GPT on the prepared corpus, same seed, data
# order and token budget, as the plain residual, HC (n=4) or mHC (n=4).
#
#   python tools/prepare_corpus.py --out data/corpus                   # once
#   MEGATRON_LM=/path/to/patched/Megatron-LM bash examples/stability/train_variant.sh mhc
#
# VARIANT: residual (plain Megatron, no mHC code) | hc | mhc. Environment: SEED (1234; also the data
# order), LR (peak learning rate, 1e-3; cosine to LR/10), ITERS (600), DATA, RUN_DIR, PYTHON.
# Checkpoints every 200 iterations to runs/stability/<variant>/ckpt and resumes from there, so a
# run can be split across calls (EXIT_MINUTES, default 9, stops cleanly with a checkpoint). Logs: runs/stability/<variant>/
# (train.log with loss, grad norm and `[mhc]` gain lines every 25 iterations, gains.jsonl with the
# per-sublayer and by-depth composite gains, TensorBoard if installed).
set -euo pipefail
VARIANT=${1:?usage: train_variant.sh residual|hc|mhc}
: "${MEGATRON_LM:?set MEGATRON_LM to a patched Megatron-LM core_v0.19.0 checkout}"
DATA=${DATA:-data/corpus}
RUN=${RUN_DIR:-runs/stability}/$VARIANT
ITERS=${ITERS:-600}         # x 16 x 1024 tokens = 9.8M tokens (~1.3 epochs of the 7.7M-token corpus)
PYTHON=${PYTHON:-python}
mkdir -p "$RUN"
GAINS=(--mhc-log-interval 25 --mhc-gain-log "$RUN/gains.jsonl")
case $VARIANT in
    residual) MHC=() ;;
    hc) MHC=(--enable-mhc --mhc-variant hc --mhc-expansion-rate 4 "${GAINS[@]}") ;;
    mhc) MHC=(--enable-mhc --mhc-variant mhc --mhc-expansion-rate 4 "${GAINS[@]}") ;;
    *) echo "VARIANT $VARIANT: allowed residual, hc, mhc" >&2; exit 2 ;;
esac
# The corpus tokenizer folder loads as a HuggingFaceTokenizer (needs transformers). Without
# transformers the run only needs the vocabulary size (no flag here uses the end-of-document id), so
# NullTokenizer gives the same training.
if $PYTHON -c "import transformers" 2>/dev/null; then
    TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$DATA/tokenizer")
else
    TOKENIZER=(--tokenizer-type NullTokenizer --vocab-size 16000)
fi
$PYTHON -m torch.distributed.run --standalone --nproc-per-node 1 "$MEGATRON_LM/pretrain_gpt.py" \
    --num-layers 12 --hidden-size 768 --ffn-hidden-size 2048 --num-attention-heads 12 \
    --seq-length 1024 --max-position-embeddings 1024 --normalization RMSNorm --swiglu \
    --disable-bias-linear --position-embedding-type rope --no-rope-fusion \
    --untie-embeddings-and-output-weights --transformer-impl local \
    --no-gradient-accumulation-fusion --no-persist-layer-norm --no-masked-softmax-fusion \
    --hidden-dropout 0 --attention-dropout 0 --bf16 --seed "${SEED:-1234}" \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr "${LR:-1e-3}" --min-lr "$(awk "BEGIN { print ${LR:-1e-3} / 10 }")" --lr-decay-style cosine --lr-warmup-iters 50 \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --init-method-std 0.02 \
    --train-data-path "$DATA/corpus_train_text_document" \
    --valid-data-path "$DATA/corpus_valid_text_document" \
    "${TOKENIZER[@]}" --num-workers 1 --data-cache-path "$RUN/data_cache" \
    --log-interval 10 --log-params-norm --eval-interval 100 --eval-iters 10 \
    --tensorboard-dir "$RUN/tb" --save "$RUN/ckpt" --load "$RUN/ckpt" --save-interval 200 \
    --exit-duration-in-mins "${EXIT_MINUTES:-9}" --ckpt-format torch_dist \
    "${MHC[@]}" 2>&1 | tee -a "$RUN/train.log"
