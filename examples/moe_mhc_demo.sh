#!/bin/bash
# A small MoE GPT (4 layers x 128, 4 experts per MoE MLP, top-2 routing, load-balancing aux loss,
# Megatron-Core's alltoall token dispatcher) trained with the plain residual and with mHC n = 4 on
# the demo corpus (public-domain Gutenberg sample, byte-level). CPU or one GPU.
#   bash examples/moe_mhc_demo.sh [--steps N] [other python -m megatron_mhc.tools.demo flags]
set -euo pipefail
PYTHON=${PYTHON:-python}
exec $PYTHON -m megatron_mhc.tools.demo --num-experts 4 --variants residual,mhc --mhc-expansion-rate 4 "$@"
