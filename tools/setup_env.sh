#!/usr/bin/env bash
# Create .venv (Python >= 3.12) and install megatron-mhc into it (editable).
#   bash tools/setup_env.sh          # the package, its runtime needs (torch, megatron-core) and
#                                    # matplotlib for the demo's plots (extra `plots`)
#   bash tools/setup_env.sh --dev    # plus the test tools (extra `dev`, which includes matplotlib)
# Set MHC_PYTHON to choose the interpreter; otherwise python3.13/python3.12 on PATH or pyenv's 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[plots]"
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

find_python() {
  if [[ -n "${MHC_PYTHON:-}" ]]; then echo "$MHC_PYTHON"; return; fi
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      command -v "$candidate"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]\.' | head -n 1 || true)
    if [[ -n "$version" ]]; then echo "$(pyenv root)/versions/$version/bin/python3"; return; fi
  fi
  echo "setup_env.sh: no Python >= 3.12 found (megatron-core 0.19 needs it); set MHC_PYTHON" >&2
  exit 1
}

if [[ ! -x .venv/bin/python ]]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c 'import megatron_mhc, megatron.core, torch; print("megatron-mhc", megatron_mhc.__version__, "| megatron-core", megatron.core.__version__, "| torch", torch.__version__)'
