#!/usr/bin/env bash
# Number of sampling steps (6 ... 500), Heun vs Euler, churn 0 and 60, at fixed models (the rho 0.9 and
# 0.99 models of paper-bmnist; trained here if they are not there yet).
source "$(dirname "$0")/../common.sh"
if [ "$SMOKE" = "1" ]; then RHOS=(0.9); N=2; STEPS=3,6; else
    RHOS=(0.9 0.99); N=1000; STEPS=6,10,18,32,64,128,256,500; fi
rho_list=$(IFS=,; echo "${RHOS[*]}")

"$PY" -m biasamp.train -m experiment=paper_bmnist rho="$rho_list" resume=auto paths.output_dir="$OUT" \
    "${TRAIN_SMOKE[@]}"
runs=(); for r in "${RHOS[@]}"; do runs+=("paper_bmnist_rho${r}_seed0"); done
"$PY" -m biasamp.count -m checkpoint="$(runs_csv "${runs[@]}")" sweep_name=paper-steps \
    sampler.num_steps="$STEPS" sampler.solver=heun,euler sampler.s_churn=0,60 "${SEED_CHURN[@]}" n_per_class="$N" \
    paths.output_dir="$OUT" "${COUNT_COMMON[@]}" "${COUNT_SMOKE[@]}"
"$PY" -m biasamp.report sweep="$OUT/count/paper-steps" "${REPORT_SMOKE[@]}"
