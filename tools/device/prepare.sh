#!/usr/bin/env bash
# On a CPU machine with network, from the repository root: download and lay out everything the GPU
# machines lack into .carry/ (git-ignored), in parts that each travel with one device call
# (64 MiB per call, the project tree included). Versions: tools/device/versions.env.
#
#   bash tools/device/prepare.sh /path/to/Megatron-LM-checkout   # any clone with tag core_v0.19.0
#
# Writes
#   .carry/base/    megatron-core and liger-kernel wheels + the Megatron-LM files pretrain_gpt.py
#                   needs (mlm/)
#   .carry/te/p0..pK  the Transformer-Engine core wheel in 48 MiB parts (48 MiB + the project
#                   tree fits one call's 64 MiB)
#   .carry/te/pL    (L = K + 1) the last part, TE's meta wheel, the transformer-engine-torch sdist,
#                   pydantic, and te_core.parts (how many parts there are)
#   .carry/tl/      (TILELANG=1) tilelang, apache-tvm-ffi, tile-kernels and deps as one xz archive
# PYTHON: an interpreter with pip, setuptools and torch (the project's .venv after
# `bash tools/setup_env.sh --dev`); preparing the TE torch sdist's metadata imports torch.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$ROOT/tools/device/versions.env"
PY=${PYTHON:-$ROOT/.venv/bin/python}
MLM=${1:?usage: prepare.sh /path/to/Megatron-LM (a git clone that has tag $MEGATRON_LM_TAG)}
CARRY=$ROOT/.carry
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
download() { $PY -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$@"; }

rm -rf "$CARRY/base" && mkdir -p "$CARRY/base"
download "$CARRY/base" "megatron-core==$MEGATRON_CORE_VERSION" "liger-kernel==$LIGER_KERNEL_VERSION"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
git -C "$MLM" archive "$MEGATRON_LM_TAG" megatron pretrain_gpt.py pretrain_hybrid.py gpt_builders.py \
    hybrid_builders.py model_provider.py | tar -x -C "$tmp"
mkdir -p "$CARRY/base/mlm" && cp -r "$tmp"/* "$CARRY/base/mlm/"

rm -rf "$CARRY/te" && mkdir -p "$CARRY/te/dl"
download "$CARRY/te/dl" "transformer-engine-cu13==$TE_VERSION" "transformer-engine==$TE_VERSION" \
    "pydantic==$PYDANTIC_VERSION" "pydantic-core==$PYDANTIC_CORE_VERSION" \
    "annotated-types==$ANNOTATED_TYPES_VERSION" "typing-inspection==$TYPING_INSPECTION_VERSION"
$PY -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d "$CARRY/te/dl" \
    "transformer-engine-torch==$TE_VERSION"
split -b 48M -d "$CARRY"/te/dl/transformer_engine_cu13-*.whl "$CARRY/te/te_core.part"
parts=("$CARRY"/te/te_core.part*)
(( ${#parts[@]} <= 10 )) || { echo "expected at most 10 parts of the TE core wheel, got ${#parts[@]}" >&2; exit 1; }
for k in "${!parts[@]}"; do mkdir -p "$CARRY/te/p$k" && mv "${parts[$k]}" "$CARRY/te/p$k/"; done
last=$CARRY/te/p$(( ${#parts[@]} - 1 ))
echo "${#parts[@]}" > "$last/te_core.parts"
mv "$CARRY"/te/dl/transformer_engine-"$TE_VERSION"-*.whl "$CARRY"/te/dl/transformer_engine_torch-*.tar.gz \
   "$CARRY"/te/dl/pydantic*.whl "$CARRY"/te/dl/annotated_types*.whl "$CARRY"/te/dl/typing_inspection*.whl \
   "$last/"
rm -rf "$CARRY/te/dl"

if [[ "${TILELANG:-0}" == 1 ]]; then
    rm -rf "$CARRY/tl" && mkdir -p "$CARRY/tl/dl" "$tmp/tl_site"
    download "$CARRY/tl/dl" "tilelang==$TILELANG_VERSION" "apache-tvm-ffi==$APACHE_TVM_FFI_VERSION" \
        "tile-kernels==$TILE_KERNELS_VERSION" torch-c-dlpack-ext "z3-solver<4.15.5,>=4.13.0"
    for w in "$CARRY"/tl/dl/*.whl; do unzip -q -o "$w" -d "$tmp/tl_site"; done
    tar -C "$tmp/tl_site" -cJf "$CARRY/tl/tl_site.tar.xz" .
    rm -rf "$CARRY/tl/dl"
fi
du -sh "$CARRY"/base "$CARRY"/te/p* ${TILELANG:+"$CARRY/tl"}
