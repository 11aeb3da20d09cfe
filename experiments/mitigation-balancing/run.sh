#!/usr/bin/env bash
# Balancing Act's distribution guidance in h-space on the quick-start model (make mitigation-balancing):
#   1. the quick-start model (2-class Biased MNIST, rho 0.9, tiny network; trained here if it is not there yet);
#   2. h-space heads for 18-step EDM (Heun) sampling, from noised images (y + sigma n), from the deterministic ODE
#      inversion of each image (as the released code) and from the model's own w = 1 samples labelled by the
#      oracle (trajectory, with each class's prior); the three accuracy curves in one figure;
#   3. counts: the unsteered sampler and distribution guidance with the noised heads over
#      scale x target (uniform, data) x guidance w (0, 1), the inversion heads with the uniform target at w 0, and
#      the trajectory heads with the data target at w 1;
#   4. the report: results, the per-class steering table (FD to the target) and rho_model against the scale.
# SMOKE=1: a tiny CPU version (a 2-step model, 4-step sampler, 4 samples per class) that checks the pipeline.
source "$(dirname "$0")/../common.sh"
SWEEP=mitigation-balancing
if [ "$SMOKE" = "1" ]; then
    TRAIN=(experiment=quickstart trainer.max_steps=2 batch_size=16 name=balancing_smoke)
    RUN=balancing_smoke; STEPS=4; N=4; B=4; SCALES=1000; W=0,1; HEADS=(steps=30 max_per_group=20)
    # the 2-step model's samples are noise: accept every colour verdict so that both colours have samples
    TRAJ=(trajectory.n_per_class=16 oracle.max_distance=1000 oracle.min_confidence=0)
else
    TRAIN=(experiment=quickstart)
    RUN=quickstart_rho0.9_seed0; STEPS=18; N=200; B=100; SCALES=100,300,1000,3000,10000; W=0,1; HEADS=()
    TRAJ=(trajectory.n_per_class=700)  # about 15 conflicting samples per class at w = 1; 5 minutes on 2 cores
fi
CKPT="$OUT/train/$RUN"
COUNT=(checkpoint="$CKPT" sweep_name="$SWEEP" sampler=edm sampler.num_steps="$STEPS" n_per_class="$N"
       paths.output_dir="$OUT" progress=false "${COUNT_COMMON[@]}" "${COUNT_SMOKE[@]}")

"$PY" -m biasamp.train "${TRAIN[@]}" resume=auto paths.output_dir="$OUT" trainer.enable_progress_bar=false
for source in noised inversion; do
    "$PY" -m biasamp.hspace checkpoint="$CKPT" sampler=edm sampler.num_steps="$STEPS" h_source="$source" \
        name="$RUN-edm$STEPS-$source" paths.output_dir="$OUT" "${HEADS[@]}"
done
"$PY" -m biasamp.hspace checkpoint="$CKPT" sampler=edm sampler.num_steps="$STEPS" h_source=trajectory \
    trajectory.guidance=1 name="$RUN-edm$STEPS-trajectory-w1" paths.output_dir="$OUT" "${HEADS[@]}" "${TRAJ[@]}"
NOISED="$OUT/hspace/$RUN-edm$STEPS-noised/heads.pt"
INVERSION="$OUT/hspace/$RUN-edm$STEPS-inversion/heads.pt"
TRAJECTORY="$OUT/hspace/$RUN-edm$STEPS-trajectory-w1/heads.pt"
"$PY" -m biasamp.mitigation.hspace "$OUT/hspace/$RUN-edm$STEPS-accuracy.png" "$NOISED" "$INVERSION" "$TRAJECTORY"

"$PY" -m biasamp.count -m "${COUNT[@]}" guidance="$W"
"$PY" -m biasamp.count -m "${COUNT[@]}" guidance="$W" steer=distribution steer.heads="$NOISED" steer.batch="$B" \
    steer.target=uniform,data steer.scale="$SCALES"
"$PY" -m biasamp.count -m "${COUNT[@]}" guidance=0 steer=distribution steer.heads="$INVERSION" steer.batch="$B" \
    steer.target=uniform steer.scale="$SCALES"
"$PY" -m biasamp.count -m "${COUNT[@]}" guidance=1 steer=distribution steer.heads="$TRAJECTORY" steer.batch="$B" \
    steer.target=data steer.scale="$SCALES"
"$PY" -m biasamp.report sweep="$OUT/count/$SWEEP" "${REPORT_SMOKE[@]}"
