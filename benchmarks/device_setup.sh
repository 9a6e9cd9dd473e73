#!/usr/bin/env bash
# Source on a lent GPU machine (no network) from the repo root: installs what .carry/ holds and
# puts this checkout on PYTHONPATH.
#   .carry/megatron_core-0.19.0-*.whl   (pip download megatron-core==0.19.0 for cp312)
#   .carry/tl_site.tar.xz               (optional: tilelang, tile-kernels and their deps, unpacked
#                                        from their wheels and xz-compressed to fit one call)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/megatron_core-*.whl
if [[ -f .carry/tl_site.tar.xz && "${MHC_SKIP_TILELANG:-0}" != 1 ]]; then
  tar -C /tmp/site -xJf .carry/tl_site.tar.xz
fi
python3 -c 'import torch, triton, megatron.core as mc; print("torch", torch.__version__, "| triton", triton.__version__, "| megatron-core", mc.__version__, "|", torch.cuda.get_device_name())'
