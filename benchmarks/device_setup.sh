#!/usr/bin/env bash
# Source on a lent GPU machine (no network) from the repo root: installs what .carry/ holds and
# this checkout (built from the working tree, so megatron_mhc.kernels / .patches map in as in a
# wheel) into /tmp/site, and puts /tmp/site on PYTHONPATH.
#   .carry/megatron_core-0.19.*-*.whl   (pip download megatron-core==0.19.0 for cp312)
#   .carry/tl_site.tar.xz               (optional: tilelang, tile-kernels and their deps, unpacked
#                                        from their wheels and xz-compressed to fit one call)
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/megatron_core-*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
    || { echo "device_setup.sh: could not build megatron-mhc from the working tree" >&2; return 1 2>/dev/null || exit 1; }
if [[ -f .carry/tl_site.tar.xz && "${MHC_SKIP_TILELANG:-0}" != 1 ]]; then
  tar -C /tmp/site -xJf .carry/tl_site.tar.xz
fi
python3 -c 'import torch, triton, megatron.core as mc, megatron_mhc, megatron_mhc.kernels.triton_ops; print("torch", torch.__version__, "| triton", triton.__version__, "| megatron-core", mc.__version__, "| megatron-mhc", megatron_mhc.__version__, "from", megatron_mhc.__file__, "|", torch.cuda.get_device_name())'
