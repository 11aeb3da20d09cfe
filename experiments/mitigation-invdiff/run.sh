#!/usr/bin/env bash
# InvDiff (label-free invariant fine-tuning) on a biased quick-start model (make mitigation-invdiff):
#   1. the base: the quick-start recipe at rho 0.95 (2-class Biased MNIST, tiny network; trained if not there yet);
#   2. groups of its 800 training images: the label-free grouper (K = 8, losses at 8 fixed sigmas) and the true
#      (class, colour) groups (the upper-bound control); each prints its AUC against the true bias labels;
#   3. InvDiff fine-tuning of a side network beside the frozen base on each groups file (r 0.8, convex, lambda 1);
#   4. counts of the base (r = 0) and both mixed models at w 0 and 1 (18-step EDM), then the report: results with
#      the mitigation column, and the Bias table (InvDiff's metric per class beside rho).
# SMOKE=1: a tiny CPU version (2-step models, a 4-step sampler, 4 samples per class) that checks the pipeline.
source "$(dirname "$0")/../common.sh"
SWEEP=mitigation-invdiff
if [ "$SMOKE" = "1" ]; then
    RUN=invdiff_base_smoke
    TRAIN=(experiment=quickstart rho=0.95 trainer.max_steps=2 batch_size=16 name="$RUN")
    GROUPER=(steps=20 n_sigma=2); FINETUNE=(trainer.max_steps=2 batch_size=16); STEPS=4; N=4
else
    RUN=quickstart_rho0.95_seed0
    TRAIN=(experiment=quickstart rho=0.95)
    GROUPER=(); FINETUNE=(); STEPS=18; N=200
fi
BASE="$OUT/train/$RUN"

"$PY" -m biasamp.train "${TRAIN[@]}" resume=auto paths.output_dir="$OUT" trainer.enable_progress_bar=false
MODELS="$BASE"
for groups in grouper true_labels; do
    "$PY" -m biasamp.invdiff_groups checkpoint="$BASE" groups="$groups" name="$RUN-$groups" paths.output_dir="$OUT" \
        "${GROUPER[@]}"
    "$PY" -m biasamp.train experiment=invdiff invdiff.base="$BASE" invdiff.groups="$OUT/invdiff/$RUN-$groups/groups.pt" \
        name="invdiff_$groups" resume=auto paths.output_dir="$OUT" trainer.enable_progress_bar=false "${FINETUNE[@]}"
    MODELS+=",$OUT/train/invdiff_$groups"
done
"$PY" -m biasamp.count -m checkpoint="$MODELS" sweep_name="$SWEEP" sampler=edm sampler.num_steps="$STEPS" \
    n_per_class="$N" guidance=0,1 paths.output_dir="$OUT" progress=false "${COUNT_COMMON[@]}" "${COUNT_SMOKE[@]}"
"$PY" -m biasamp.report sweep="$OUT/count/$SWEEP" "${REPORT_SMOKE[@]}"
