#!/usr/bin/env bash
# On the GPU machine: copy part K (0..3) of the TE core wheel, carried as .carry/te/pK, to /tmp/te.
set -euo pipefail
K=${1:?usage: stage_te.sh K (0..3)}
mkdir -p /tmp/te && cp ".carry/te/p$K"/* /tmp/te/ && ls -la /tmp/te | tail -n +2
