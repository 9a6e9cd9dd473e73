#!/bin/bash
# The three stability variants side by side on one GPU (they share it; each resumes from its own
# checkpoint, so the same command continues a run that an EXIT_MINUTES limit stopped).
#
#   MEGATRON_LM=/path/to/patched/Megatron-LM bash examples/stability/run_all.sh
#
# Same environment as train_variant.sh (DATA, RUN_DIR, ITERS, EXIT_MINUTES, PYTHON). Prints each
# run's last log line when all three have stopped.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN_DIR=${RUN_DIR:-runs/stability}
mkdir -p "$RUN_DIR"
for variant in residual hc mhc; do
    RUN_DIR=$RUN_DIR bash "$HERE/train_variant.sh" "$variant" > "$RUN_DIR/$variant.stdout" 2>&1 &
done
wait
for variant in residual hc mhc; do
    echo "== $variant: $(grep -E ' iteration +[0-9]+/' "$RUN_DIR/$variant/train.log" | tail -1)"
done
