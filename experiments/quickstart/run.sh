#!/usr/bin/env bash
# The quick start on the CPU: train -> count -> report on the embedded 2-class Biased MNIST (make quickstart).
#   SEEDS=1 (default): one model (seed 0) counted under 12 settings (edm and dpmpp x 6, 18 steps x w 0, 1, 3)
#   SEEDS=3: models of seeds 0, 1, 2 trained side by side (one thread each), each counted under 4 of those
#            settings (edm, 6 and 18 steps, w 0 and 3: the ones the README makes claims about; the rest is left
#            out to keep the whole under 12 minutes on 2 cores); the report adds seeds.{csv,md,tex} (mean over
#            seeds, between-seed SD, an interval with both the between-model and the sampling variation) and
#            draws each setting's mean over seeds
# Environment: PY (the venv's Python), OUT (output folder, default runs), SEEDS.
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs}
SEEDS=${SEEDS:-1}
if ! [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "make quickstart: SEEDS=$SEEDS is not allowed: a whole number >= 1 (training seeds 0..SEEDS-1)" >&2
    exit 2
fi
SWEEP=(sampler=edm,dpmpp sampler.num_steps=6,18 guidance=0,1,3 n_per_class=100)
SWEEP_SEEDS=(sampler=edm sampler.num_steps=6,18 guidance=0,3 n_per_class=100)

took() {  # took <step> <start seconds>: one line with the step's wall time
    local s=$((SECONDS - $2))
    echo "quickstart: $1 took $((s / 60)) min $((s % 60)) s"
}

if [ "$SEEDS" = 1 ]; then
    t=$SECONDS
    "$PY" -m biasamp.train experiment=quickstart resume=auto paths.output_dir="$OUT"
    took train $t; t=$SECONDS
    "$PY" -m biasamp.count -m checkpoint="$OUT/train/quickstart_rho0.9_seed0" sweep_name=quickstart \
        paths.output_dir="$OUT" "${SWEEP[@]}"
    took count $t; t=$SECONDS
    "$PY" -m biasamp.report sweep="$OUT/count/quickstart"
    took report $t
    took "the quick start" 0
    exit 0
fi

# Several seeds: one process per seed, one thread each (on 2 cores, two or three single-threaded runs side by
# side finish sooner than the same runs one after another with two threads each); logs in $OUT/logs/.
mkdir -p "$OUT/logs"
run_seeds() {  # run_seeds <what> <command ...>: the command once per seed (SEED in it), in parallel
    local what=$1 pids=() seed rc=0
    shift
    for seed in $(seq 0 $((SEEDS - 1))); do
        SEED=$seed OMP_NUM_THREADS=1 bash -c "$*" > "$OUT/logs/quickstart-$what-seed$seed.log" 2>&1 &
        pids+=($!)
    done
    for seed in $(seq 0 $((SEEDS - 1))); do
        if ! wait "${pids[$seed]}"; then
            rc=1
            echo "make quickstart: $what of seed $seed failed; its log ($OUT/logs/quickstart-$what-seed$seed.log):" >&2
            tail -n 20 "$OUT/logs/quickstart-$what-seed$seed.log" >&2
        fi
    done
    [ "$rc" = 0 ] && echo "quickstart: $what done for seeds 0..$((SEEDS - 1)) (logs in $OUT/logs/)"
    return $rc
}
t=$SECONDS
run_seeds train "\"$PY\" -m biasamp.train experiment=quickstart seed=\$SEED threads=1 resume=auto \
    paths.output_dir=\"$OUT\" trainer.enable_progress_bar=false"
took train $t; t=$SECONDS
run_seeds count "\"$PY\" -m biasamp.count -m checkpoint=\"$OUT/train/quickstart_rho0.9_seed\$SEED\" \
    sweep_name=quickstart-seeds paths.output_dir=\"$OUT\" progress=false ${SWEEP_SEEDS[*]}"
took count $t; t=$SECONDS
"$PY" -m biasamp.report sweep="$OUT/count/quickstart-seeds"
took report $t
took "the quick start over $SEEDS seeds" 0
