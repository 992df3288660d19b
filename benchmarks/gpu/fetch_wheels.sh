#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/run_checks.sh installs on a bare GPU image (no network there) into .whl/.
#
#   bash benchmarks/gpu/fetch_wheels.sh            # idempotent: keeps wheels already there, removes stray ones
#
# The image (Python 3.12, torch 2.11, transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33, pyarrow, pandas,
# xxhash, cloudpickle, ...) lacks trl, datasets, gymnasium and their small deps. transformers 5.24.0 is carried too:
# benchmarks/memory_plan.py calls the model with `cache=` / reads `out.cache`, the API of transformers >= 5.2x
# (5.17 still has `past_key_values`), and the venv the benchmarks were written with has 5.24.0. peft and fsspec are
# carried at the venv's versions (peft's version in the image is unknown; datasets 5.2.0 pins fsspec<=2026.9.0).
# Versions = this repository's .venv (`.venv/bin/pip freeze`). .whl/ is git-ignored; pass it to the device tool's
# `run` with carry: [".whl"].
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(
  trl==1.16.0
  transformers==5.24.0
  peft==0.21.2
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  fsspec==2026.9.0
  gymnasium==1.4.0
  farama-notifications==0.0.6
)

PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p .whl

# Remove wheels that are not in the list (e.g. left over from an older version of this script).
norm() { tr '[:upper:]-.' '[:lower:]__' <<<"$1"; }
wanted=()
for spec in "${WHEELS[@]}"; do wanted+=("$(norm "${spec%%==*}")-${spec##*==}-"); done
for f in .whl/*.whl; do
  [[ -e $f ]] || continue
  base=$(basename "$f"); keep=0
  for w in "${wanted[@]}"; do [[ $(norm "$base") == "$(norm "$w")"* ]] && keep=1; done
  if (( ! keep )); then echo "removing stray $base"; rm -f "$f"; fi
done

# The GPU image: CPython 3.12 on x86_64 Linux.
TARGET_TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps "${TARGET_TAGS[@]}" -d .whl "$spec"
done

echo "== wheels and their non-extra Requires-Dist"
for f in .whl/*.whl; do
  echo "$(basename "$f")"
  unzip -p "$f" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /' || true
done

if [[ ${VERIFY:-1} == 1 ]]; then
  # Install (not import) into a throw-away target: proves the files are valid wheels.
  tmp=$(mktemp -d)
  # (--python-version etc.: this venv may not be Python 3.12, and multiprocess's wheel is tagged py312)
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    "${TARGET_TAGS[@]}" --target "$tmp" .whl/*.whl
  echo "== install check: ok ($(ls "$tmp" | grep -c '\.dist-info$') dist-infos in a temporary --target)"
  rm -rf "$tmp"
fi

count=$(ls .whl/*.whl | wc -l)
echo "== $count wheels, total $(du -ch .whl/*.whl | tail -1 | cut -f1) ($(du -cb .whl/*.whl | tail -1 | cut -f1) bytes)"
