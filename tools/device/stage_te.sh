#!/usr/bin/env bash
# On the GPU machine: copy part K of the TE core wheel, carried as .carry/te/pK, to /tmp/te (one
# call per part but the last, which build_te.sh brings; tools/device/prepare.sh made the parts).
set -euo pipefail
K=${1:?usage: stage_te.sh K (each part folder .carry/te/pK but the last)}
mkdir -p /tmp/te && cp ".carry/te/p$K"/* /tmp/te/ && ls -la /tmp/te | tail -n +2
