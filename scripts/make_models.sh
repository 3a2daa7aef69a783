#!/usr/bin/env bash
# Re-make the models shipped in models/ from scratch, with the commands their manifests record
# (CPU, about an hour on 2 cores: the prior ~40 min with one torch thread, its evaluation ~10 min,
# the depth model ~2 min). Work files go to ${1:-runs/make-models}; the results replace
# models/shapes-lcss-32 and models/depth-shapes-64 (commit them to ship them).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/make-models}
mkdir -p "$WORK"
commit=$(git rev-parse HEAD)
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
export OMP_NUM_THREADS=1

echo "== depth model (ssd-train-depth)"
cmd="ssd-train-depth --output $WORK/depth-shapes-64 --steps 400 --batch-size 8 --lr 1e-3 --train-size 768 --eval-size 128 --num-threads 1 --cache-dir $WORK/shapes-cache"
start=$(now)
$cmd
python scripts/ship_model.py depth-shapes-64 "$WORK/depth-shapes-64" --command "$cmd" --commit "$commit" \
  --started "$start" --finished "$(now)"

echo "== shapes prior (lcss-prior train, 1600 LCSS steps at 32 px)"
cmd="lcss-prior train --data shapes --method lcss --resolution 32 --preset tiny --batch 32 --steps 1600 --data-size 4000 --data-cache $WORK/shapes32-cache.pt --checkpoint-every 200 --sample-every 400 --out $WORK/shapes-lcss"
start=$(now)
if [ -e "$WORK/shapes-lcss/checkpoints/last.ckpt" ]; then $cmd --resume; else $cmd; fi
finished=$(now)
evalcmd="lcss-prior eval --prior $WORK/shapes-lcss/prior --data shapes --metrics accuracy,fid,kid,bpd --n-samples 200 --steps 100 --bpd-samples 32 --train-features 300 --features $WORK/shapes-classifier.pt --out $WORK/prior-eval.json"
$evalcmd
python scripts/ship_model.py shapes-lcss-32 "$WORK/shapes-lcss/prior" --command "$cmd" --commit "$commit" \
  --started "$start" --finished "$finished" --eval "$WORK/prior-eval.json" --eval-command "$evalcmd"
echo "models/ remade from commit $commit; run the tests, then commit models/."
