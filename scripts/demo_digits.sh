#!/usr/bin/env bash
# The LCSS demo (the second README command), CPU, about 10 minutes on 2 idle cores. Everything lands
# in ${1:-digits-output}/.
#  1. trains a class-conditional LCSS prior on scikit-learn's digits (real 8x8 data),
#  2. samples a grid per caption and measures bits/dim, FID/KID and caption accuracy,
#  3. runs a short 2-D variance playground (SDS and SSD optimising an image under the SHIPPED shapes
#     prior, models/shapes-lcss-32, with the shipped depth model) and prints the gradient-variance
#     ratios to SDS.
set -euo pipefail
OUT=${1:-digits-output}
STEPS=${DEMO_STEPS:-800}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread beats two contended ones

if [ -e "$OUT/digits-lcss" ]; then
  echo "== 1/3 $OUT/digits-lcss exists: resuming it (delete it to start over)"
  lcss-prior train --data digits --method lcss --steps "$STEPS" --out "$OUT/digits-lcss" --resume
else
  echo "== 1/3 training an LCSS prior on digits ($STEPS steps)"
  lcss-prior train --data digits --method lcss --steps "$STEPS" --checkpoint-every 200 \
    --sample-every 400 --out "$OUT/digits-lcss"
fi

echo "== 2/3 sampling and measuring the prior"
for d in 0 3 7; do
  lcss-prior sample --prior "$OUT/digits-lcss/prior" --caption "digit $d" --n 16 --guidance-scale 2 \
    --method pc --steps 200 --seed 0 --out "$OUT/samples-digit-$d.png"
done
lcss-prior eval --prior "$OUT/digits-lcss/prior" --data digits --metrics bpd,fid,kid,accuracy \
  --n-samples 200 --bpd-samples 32 --method ode --steps 50 --train-features 300 \
  --features "$OUT/digits-classifier.pt" --out "$OUT/digits-eval.json"

echo "== 3/3 2-D variance playground on the shipped shapes prior (60 steps; the full run is in BENCHMARKS.md)"
python "$(dirname "$0")/../benchmarks/variance_2d.py" --steps 60 --eval-every 20 --n-draws 32 \
  --n-loss-draws 16 --arms sds,const-optimal-bins,ssd-optimal-bins --out "$OUT/variance_2d"

echo
echo "Outputs in $OUT/: samples-digit-*.png, digits-eval.json, digits-lcss/ (checkpoints, TensorBoard"
echo "in digits-lcss/tb, sample grids, exported prior in digits-lcss/prior), variance_2d/ (plots, JSON)."
echo "Next: README.md, 'Use it inside threestudio', and BENCHMARKS.md for the measured claims."
