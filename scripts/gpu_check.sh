#!/usr/bin/env bash
# The project's device check on a one-GPU machine without network (scripts/gpu_check.py says what
# it runs; about ten minutes). Prepare where pip works, once: bash scripts/device_prepare.sh
# (wheels for what the GPU image lacks + the threestudio snapshot, into the git-ignored .device/);
# carry .device to the device machine, then:
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else runs/gpu_check)
#   bash scripts/gpu_check.sh OUT_DIR --dry-run  (CPU, tiny models: checks the script, not the GPU)
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-${OUT:-$REPO/runs/gpu_check}}"
shift || true
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
case " $* " in *" --dry-run "*) DRY=1 ;; *) DRY=0 ;; esac
# the wheels are built for the device's Python; a dry run uses this machine's packages
if [ "$DRY" = 0 ] && compgen -G "$REPO/.device/wheels/*.whl" > /dev/null; then
  SITE="${TMPDIR:-/tmp}/ssd-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.device/wheels/*.whl || { echo "gpu_check: installing .device/wheels failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${THREESTUDIO_SRC:-}" ] && compgen -G "$REPO/.device/threestudio-*.tar.gz" > /dev/null; then
  TS="${TMPDIR:-/tmp}/ssd-threestudio"
  mkdir -p "$TS" && tar xzf "$REPO"/.device/threestudio-*.tar.gz -C "$TS"
  export THREESTUDIO_SRC="$TS/threestudio"
fi
cd "$REPO" && "$PY" scripts/gpu_check.py --out "$DEST" "$@" 2>&1 | tee "$DEST/gpu_check.log"
exit "${PIPESTATUS[0]}"
