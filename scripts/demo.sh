#!/usr/bin/env bash
# The main demo: a 3-D object from a text prompt on a CPU, with SteinDreamer (SSD) and with SDS,
# through the real threestudio (pinned commit, fetched by threestudio_ssd.checkout) and the models
# shipped in models/. Everything lands in ${1:-demo-output}/; run it again to resume.
#   bash scripts/demo.sh [OUT] [--prompt "a blue torus"] [--steps N] [--quick]
# See scripts/demo_3d.py for what each stage does. The LCSS training demo is scripts/demo_digits.sh.
set -euo pipefail
exec python "$(dirname "$0")/demo_3d.py" "$@"
