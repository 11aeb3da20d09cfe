#!/usr/bin/env bash
# 10-class Biased MNIST: rho_model against rho_data for four (steps, churn) settings.
source "$(dirname "$0")/../common.sh"
if [ "$SMOKE" = "1" ]; then RHOS=(0.5 0.9); N=2; STEPS=6,10; else
    RHOS=(0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.95 0.99 0.995 0.999); N=1000; STEPS=6,160; fi
rho_list=$(IFS=,; echo "${RHOS[*]}")

# 1. one model per rho_data (resume=auto: a finished run is skipped, an interrupted one continues)
"$PY" -m biasamp.train -m experiment=paper_bmnist rho="$rho_list" resume=auto paths.output_dir="$OUT" \
    "${TRAIN_SMOKE[@]}"
# 2. count every model under (steps, churn) in {6, 160} x {0, 60}: N per class, 10 classes
runs=(); for r in "${RHOS[@]}"; do runs+=("paper_bmnist_rho${r}_seed0"); done
"$PY" -m biasamp.count -m checkpoint="$(runs_csv "${runs[@]}")" sweep_name=paper-bmnist \
    sampler.num_steps="$STEPS" sampler.s_churn=0,60 "${SEED_CHURN[@]}" n_per_class="$N" paths.output_dir="$OUT" \
    "${COUNT_COMMON[@]}" "${COUNT_SMOKE[@]}"
# 3. table and figure (rho_model vs rho_data, one line per setting)
"$PY" -m biasamp.report sweep="$OUT/count/paper-bmnist" "${REPORT_SMOKE[@]}"
