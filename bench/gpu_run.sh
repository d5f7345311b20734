#!/usr/bin/env bash
# Runs bench/gpu_search.py on a lent GPU machine (no network, no pip install of fika), from the repository root:
#
#   bash bench/gpu_run.sh --length 512 --deadline-s 480        # device call with carry [".device"]
#
# Unpacks .device/site.tar.xz (made here by bench/gpu_carry.sh) into a temporary folder, lays out fika as pip would
# install it (fika/ is `fika`, search/ is `fika.search`, spaces/ is `fika.spaces`: pyproject's package-dir) as a
# tree of links to this checkout, puts both on PYTHONPATH (ahead of the image's own packages, inherited by Ray's
# workers), prints the GPU and the versions, and passes its arguments to gpu_search.py, whose rows go to
# $OUT/gpu_search.json. GPU_RUN_PYTHON picks the interpreter (default python3); GPU_RUN_CHECK_ONLY=1 stops after
# the import check; GPU_RUN_NO_SITE=1 (a local test under another Python) unpacks the bundle but leaves it off
# PYTHONPATH, since its cp312 binaries load only in Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${GPU_RUN_PYTHON:-python3}
[[ $PY == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # it runs from another folder below
OUT=$(realpath -m "${OUT:-$ROOT/outputs}")
mkdir -p "$OUT"
[[ -f .device/site.tar.xz ]] || { echo "no .device/site.tar.xz: run bench/gpu_carry.sh here, carry [\".device\"]" >&2; exit 1; }

T=$(mktemp -d "${TMPDIR:-/tmp}/fika-gpu.XXXXXX")
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/site" "$T/pkg/fika"
tar -C "$T/site" -xJf .device/site.tar.xz
for f in "$ROOT"/fika/*; do ln -s "$f" "$T/pkg/fika/"; done
ln -s "$ROOT/search" "$T/pkg/fika/search"
ln -s "$ROOT/spaces" "$T/pkg/fika/spaces"
P="$T/pkg"
[[ ${GPU_RUN_NO_SITE:-0} == 1 ]] || P="$P:$T/site"
export PYTHONPATH="$P${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Run from an empty folder: Ray puts the driver's working directory first on its workers' sys.path, where the
# checkout's own fika/ (without search/) would shadow the tree above.
mkdir "$T/run" && cd "$T/run"

nvidia-smi || echo "(no nvidia-smi)"
"$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
except ImportError as err:
    print("torch MISSING:", err)
for name in ["transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "ray", "optuna", "pydantic",
             "huggingface-hub", "pyarrow", "pandas", "fsspec", "sqlalchemy", "typing-extensions"]:
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import fika, fika.search, ray.tune, optuna, trl, datasets, bitsandbytes  # noqa: E401,F401
print("fika from", fika.__file__, "| fika.search from", fika.search.__file__)
EOF
[[ ${GPU_RUN_CHECK_ONLY:-0} == 1 ]] && exit 0
"$PY" "$ROOT/bench/gpu_search.py" "$@" --json "$OUT/gpu_search.json"
