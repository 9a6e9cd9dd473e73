#!/bin/bash
# End-to-end check of the patch set, the flags and the checkpoint tools on one GPU (the device
# run quoted in the issue-5 closing note). Needs a pristine Megatron-LM core_v0.19.0 tree at
# $MEGATRON_LM (patched here) and writes logs to $LOG_DIR.
#   1. megatron-mhc patch check / apply / check
#   2. examples/pretrain_gpt_mhc.sh: mHC n=4 from scratch (mock data)
#   3. plain run to iteration 50 with a checkpoint -> convert plain-to-mhc -> one more iteration
#      from each (plain and converted mHC): the iteration-51 losses must agree (function-preserving)
#   4. gain-report of the converted checkpoint (static) and of a trained mHC checkpoint (batch)
#   5. the runtime launcher on a pristine copy (no patch)
set -uo pipefail
: "${MEGATRON_LM:?}" "${LOG_DIR:?}"
PYTHON=${PYTHON:-python}
export PYTHON
mkdir -p "$LOG_DIR"
HERE=$(cd "$(dirname "$0")" && pwd)
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$LOG_DIR/$name.log" 2>&1; local rc=$?;
        tail -n 4 "$LOG_DIR/$name.log"; echo "== $name rc=$rc"; return $rc; }

cp -r "$MEGATRON_LM" "$MEGATRON_LM.pristine"
$PYTHON -m megatron_mhc.tools.cli patch check "$MEGATRON_LM"; echo "check rc=$?"
$PYTHON -m megatron_mhc.tools.cli patch apply "$MEGATRON_LM" || exit 1
$PYTHON -m megatron_mhc.tools.cli patch check "$MEGATRON_LM"; echo "check rc=$?"

export MEGATRON_LM
SCRATCH_ITERS=${SCRATCH_ITERS:-100}
ITERS=$SCRATCH_ITERS CKPT=$LOG_DIR/ckpt_mhc run mhc_from_scratch bash "$HERE/pretrain_gpt_mhc.sh"
if [[ -z "${SKIP_PLAIN_SCRATCH:-}" ]]; then
    ITERS=$SCRATCH_ITERS MHC_ARGS="" run plain_from_scratch bash "$HERE/pretrain_gpt_mhc.sh"
fi
ITERS=50 MHC_ARGS="" CKPT=$LOG_DIR/ckpt_plain run plain_to_50 bash "$HERE/pretrain_gpt_mhc.sh"
run convert $PYTHON -m megatron_mhc.tools.cli convert plain-to-mhc "$LOG_DIR/ckpt_plain" "$LOG_DIR/ckpt_converted"
CONT=(--no-load-optim --no-load-rng --log-interval 1)
ITERS=51 MHC_ARGS="" run plain_continue bash "$HERE/pretrain_gpt_mhc.sh" --load "$LOG_DIR/ckpt_plain" "${CONT[@]}"
ITERS=51 MHC_ARGS="--enable-mhc --mhc-expansion-rate 4" run converted_continue \
    bash "$HERE/pretrain_gpt_mhc.sh" --load "$LOG_DIR/ckpt_converted" "${CONT[@]}"
$PYTHON - "$LOG_DIR" <<'PY'
import re, sys
def loss(name):
    text = open(f"{sys.argv[1]}/{name}.log").read()
    found = re.findall(r"iteration\s+51/\s*51 \|.*?lm loss: ([0-9.E+-]+)", text)
    return float(found[-1]) if found else None
plain, mhc = loss("plain_continue"), loss("converted_continue")
print(f"iteration-51 lm loss: plain {plain} | converted mHC {mhc}"
      + (f" | relative difference {abs(mhc - plain) / plain:.2e}" if plain and mhc else ""))
PY
run gain_static $PYTHON -m megatron_mhc.tools.cli gain-report "$LOG_DIR/ckpt_converted" --out "$LOG_DIR/gain_converted"
$PYTHON -c "import torch; torch.save(torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(0)), '$LOG_DIR/batch.pt')"
run gain_batch $PYTHON -m megatron_mhc.tools.cli gain-report "$LOG_DIR/ckpt_mhc" --batch "$LOG_DIR/batch.pt" --out "$LOG_DIR/gain_trained"
PRISTINE=$MEGATRON_LM.pristine
MEGATRON_LM=$PRISTINE ITERS=20 SKIP_PATCH_CHECK=1 \
    LAUNCH="-m megatron_mhc.training.launch $PRISTINE/pretrain_gpt.py" run launcher bash "$HERE/pretrain_gpt_mhc.sh"
grep -c "\[mhc\] iteration" "$LOG_DIR/launcher.log" | sed 's/^/launcher mHC gain lines: /'
grep "number of parameters on" "$LOG_DIR"/*.log
rm -rf "$LOG_DIR"/ckpt_* "$MEGATRON_LM.pristine"
