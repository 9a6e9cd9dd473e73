#!/usr/bin/env bash
# On the GPU machine, in the repository root, after one call per part but the last copied
# .carry/te/p0.. into /tmp/te (`bash tools/device/stage_te.sh K`), carrying the last part folder
# (default: the highest .carry/te/pK): join the TE core wheel, install TE and pydantic
# into /tmp/site and build transformer-engine-torch there (MAX_JOBS=16, sm_90: ~110 s on an H100).
# A prebuilt extension in .carry/te/prebuilt/ (from an earlier build's $OUT) skips the build.
set -uo pipefail
source tools/device/versions.env
LAST=${1:-$(ls -d .carry/te/p* 2>/dev/null | sort -V | tail -n 1)}
[[ -f "$LAST/te_core.parts" ]] || { echo "build_te.sh: no te_core.parts in '$LAST': carry the last part folder (tools/device/prepare.sh)" >&2; exit 1; }
mkdir -p /tmp/te /tmp/site && cp "$LAST"/* /tmp/te/ || exit 1
cd /tmp/te || exit 1
for (( k = 0; k < $(cat te_core.parts); k++ )); do
    [[ -f te_core.part0$k ]] || { echo "build_te.sh: missing te_core.part0$k: run stage_te.sh $k first on this machine" >&2; exit 1; }
done
cat te_core.part0? > "transformer_engine_cu13-$TE_VERSION-py3-none-manylinux_2_28_x86_64.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    transformer_engine_cu13-*.whl transformer_engine-"$TE_VERSION"-*.whl pydantic*.whl \
    annotated_types*.whl typing_inspection*.whl || exit 1
cd - >/dev/null
if [[ -f .carry/te/prebuilt/NAME ]]; then
    cat .carry/te/prebuilt/*.part* > "/tmp/site/$(cat .carry/te/prebuilt/NAME)" || exit 1
    echo "transformer-engine-torch: prebuilt extension installed from .carry/te/prebuilt"
else
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(which nvcc)")")}
    t0=$(date +%s)
    (cd /tmp/te && PYTHONPATH=/tmp/site NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-16} \
        NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} python3 -m pip install -q --no-build-isolation \
        --no-deps --no-index --target /tmp/site_te transformer_engine_torch-*.tar.gz) || exit 1
    cp -r /tmp/site_te/* /tmp/site/
    echo "transformer-engine-torch built in $(( $(date +%s) - t0 )) s"
    if [[ -n "${OUT:-}" ]]; then  # bring the extension back: the next machine skips the build
        so=$(find /tmp/site_te -name 'transformer_engine_torch*.so' | head -n 1)
        if [[ -z "$so" ]]; then
            echo "build_te.sh: no transformer_engine_torch*.so under /tmp/site_te to bring back"
        elif (( $(stat -c %s "$so") > 75 * 1024 * 1024 )); then
            echo "build_te.sh: $(basename "$so") is over 75 MiB: not brought back through \$OUT"
        else
            mkdir -p "$OUT/te_prebuilt" && basename "$so" > "$OUT/te_prebuilt/NAME"
            split -b 15M -d "$so" "$OUT/te_prebuilt/$(basename "$so").part"
        fi
    fi
fi
PYTHONPATH=/tmp/site python3 -c "import transformer_engine, transformer_engine.pytorch; print('transformer_engine', transformer_engine.__version__, 'imports')"
