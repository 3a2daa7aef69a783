#!/usr/bin/env bash
# Prepare the device check's luggage, on a machine where pip can download (run once; the result is
# git-ignored): .device/wheels/ holds the packages the GPU image lacks, built for its Python
# (3.12, manylinux x86-64), and .device/ the pinned threestudio snapshot, which does not travel
# with the repository otherwise. Then, on the device machine: bash scripts/gpu_check.sh
#   bash scripts/device_prepare.sh [PYTHON_VERSION]      (default 3.12)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYVER="${1:-3.12}"
DEST="$REPO/.device/wheels"
rm -rf "$DEST" && mkdir -p "$DEST"
# what the image lacks (its package list: diffusers, omegaconf, nerfacc, ...) plus the versions of
# transformers/huggingface_hub/tokenizers that diffusers 0.19 works with (the image's are newer);
# igl and wandb get placeholders instead (threestudio_ssd/threestudio/cpu.py); libigl, xatlas,
# wandb, kornia and open_clip are not needed by the check
PACKAGES=(
  diffusers==0.19.3 huggingface-hub==0.25.2 transformers==4.46.3 "tokenizers>=0.20,<0.21"
  omegaconf==2.3.0 nerfacc==0.5.3 typeguard==4.6.1 trimesh==5.2.0 PyMCubes==0.1.6
  # not imageio-ffmpeg (68 MB): without it steindreamer-system writes its test video as a GIF
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
# omegaconf's parser runtime is published as a source archive only: build its (pure-Python) wheel
python3 -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
cp "$REPO/../shared/vendor/"threestudio-*.tar.gz "$REPO/.device/" 2>/dev/null \
  || python3 - "$REPO/.device" <<'PY'
import shutil, sys
from threestudio_ssd.checkout import VENDOR_SNAPSHOT
shutil.copy(VENDOR_SNAPSHOT, sys.argv[1])
PY
du -sh "$REPO/.device"
ls "$DEST"
