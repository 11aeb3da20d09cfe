#!/usr/bin/env bash
# Classifier-free guidance w in {0, 0.1, 0.5, 1, 2, 5, 10} (D = (1 + w) D_cond - w D_uncond), 18 Heun steps,
# at the rho 0.9 and 0.99 models of paper-bmnist (trained here if they are not there yet).
source "$(dirname "$0")/../common.sh"
if [ "$SMOKE" = "1" ]; then RHOS=(0.9); N=2; W=0,1,5; STEPS=4; else
    RHOS=(0.9 0.99); N=1000; W=0,0.1,0.5,1,2,5,10; STEPS=18; fi
rho_list=$(IFS=,; echo "${RHOS[*]}")

"$PY" -m biasamp.train -m experiment=paper_bmnist rho="$rho_list" resume=auto paths.output_dir="$OUT" \
    "${TRAIN_SMOKE[@]}"
runs=(); for r in "${RHOS[@]}"; do runs+=("paper_bmnist_rho${r}_seed0"); done
"$PY" -m biasamp.count -m checkpoint="$(runs_csv "${runs[@]}")" sweep_name=paper-guidance \
    guidance="$W" sampler.num_steps="$STEPS" n_per_class="$N" paths.output_dir="$OUT" "${COUNT_COMMON[@]}" \
    "${COUNT_SMOKE[@]}"
"$PY" -m biasamp.report sweep="$OUT/count/paper-guidance" "${REPORT_SMOKE[@]}"
