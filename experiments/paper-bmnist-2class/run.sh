#!/usr/bin/env bash
# 2-class Biased MNIST (digits 0/1, rho 0.9): rho_model against the training-set size, deterministic vs
# stochastic sampling (200 Heun steps, churn 0 vs 40).
source "$(dirname "$0")/../common.sh"
if [ "$SMOKE" = "1" ]; then SIZES=(50 100); N=4; STEPS=6; else
    SIZES=(500 1000 2000 4000 5923); N=5000; STEPS=200; fi
size_list=$(IFS=,; echo "${SIZES[*]}")

"$PY" -m biasamp.train -m experiment=paper_bmnist_2class dataset.class_size="$size_list" resume=auto \
    paths.output_dir="$OUT" "${TRAIN_SMOKE[@]}"
runs=(); for s in "${SIZES[@]}"; do runs+=("paper_bmnist2_n${s}_rho0.9_seed0"); done
"$PY" -m biasamp.count -m checkpoint="$(runs_csv "${runs[@]}")" sweep_name=paper-bmnist-2class \
    sampler.num_steps="$STEPS" sampler.s_churn=0,40 "${SEED_CHURN[@]}" \
    n_per_class="$N" paths.output_dir="$OUT" "${COUNT_COMMON[@]}" "${COUNT_SMOKE[@]}"
"$PY" -m biasamp.report sweep="$OUT/count/paper-bmnist-2class" "${REPORT_SMOKE[@]}"
