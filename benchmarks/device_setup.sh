#!/usr/bin/env bash
# Source on a GPU machine without network access from the repository root. The sequence, staged from
# what `bash tools/device/prepare.sh <Megatron-LM clone>` put in .carry/ (versions pinned in
# tools/device/versions.env), one device call each, back to back on the same warm machine:
#
#   calls 1-5:  bash tools/device/stage_te.sh K                 carry [.carry/te/pK], K = 0..4
#   call 6:     bash tools/device/build_te.sh && source benchmarks/device_setup.sh && ...
#                                                              carry [.carry/te/p5, .carry/base]
#   (the part count is whatever prepare.sh made: the last folder holds te_core.parts)
#   later:      source benchmarks/device_setup.sh && ...        (nothing carried: /tmp persists)
#
# This script installs megatron-core and liger-kernel (.carry/base) and this checkout (built from the working tree,
# so megatron_mhc.kernels / .patches map in as in a wheel) into /tmp/site, copies the Megatron-LM
# tree to /tmp/mlm with the patch set applied, unpacks the optional TileLang site (.carry/tl), puts
# /tmp/site on PYTHONPATH and prints what imports (Transformer-Engine when build_te.sh ran).
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/site
if [[ ! -d /tmp/site/megatron/core ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/base/megatron_core-*.whl \
    || { echo "device_setup.sh: no megatron-core wheel in .carry/base (carry it once)" >&2; return 1 2>/dev/null || exit 1; }
fi
tree_hash=$(find setup.py pyproject.toml megatron_mhc kernels patches -type f ! -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 cat | sha1sum | cut -c1-16)
if [[ ! -d /tmp/site/liger_kernel ]] && compgen -G ".carry/base/liger_kernel-*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/base/liger_kernel-*.whl
fi
if [[ "$(cat /tmp/site/.megatron_mhc_tree 2>/dev/null)" != "$tree_hash" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
    || { echo "device_setup.sh: could not build megatron-mhc from the working tree" >&2; return 1 2>/dev/null || exit 1; }
  echo "$tree_hash" > /tmp/site/.megatron_mhc_tree
fi
if [[ ! -d /tmp/mlm && -d .carry/base/mlm ]]; then
  cp -r .carry/base/mlm /tmp/mlm && python3 -m megatron_mhc patch apply /tmp/mlm >/dev/null \
    && echo "device_setup.sh: /tmp/mlm = Megatron-LM $(grep -o 'core_v[0-9.]*' tools/device/versions.env) with the patch set"
fi
if [[ -f .carry/tl/tl_site.tar.xz && ! -d /tmp/site/tilelang ]]; then
  tar -C /tmp/site -xJf .carry/tl/tl_site.tar.xz
fi
python3 - <<'PY'
import torch, triton, megatron.core as mc, megatron_mhc
from megatron_mhc.core.backends import backend_report, transformer_engine_availability
te = transformer_engine_availability()
line = [f"torch {torch.__version__}", f"triton {triton.__version__}", f"megatron-core {mc.__version__}",
        f"megatron-mhc {megatron_mhc.__version__}", torch.cuda.get_device_name(),
        f"{torch.cuda.device_count()} GPU(s)"]
if te.available:
    import transformer_engine
    line.append(f"transformer-engine {transformer_engine.__version__}")
else:
    line.append(f"no transformer-engine ({te.reason})")
line += [f"{name}: {'yes' if a.available else 'no (' + a.reason + ')'}" for name, a in backend_report().items()
         if name != "torch"]
print(" | ".join(line))
PY
