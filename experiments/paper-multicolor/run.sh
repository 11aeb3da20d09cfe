#!/usr/bin/env bash
# Multi-Color MNIST: two colour biases of different strength in one model (left/right rho in {0.95, 0.99},
# all four pairs), counted per half at 18 Heun steps with guidance w in {0, 1, 3}.
source "$(dirname "$0")/../common.sh"
if [ "$SMOKE" = "1" ]; then LEFT=(0.9); RIGHT=(0.8); N=2; W=0,1; STEPS=4; else
    LEFT=(0.95 0.99); RIGHT=(0.95 0.99); N=1000; W=0,1,3; STEPS=18; fi
csv() { local IFS=,; echo "$*"; }

"$PY" -m biasamp.train -m experiment=paper_multicolor rho="$(csv "${LEFT[@]}")" \
    dataset.rho_right="$(csv "${RIGHT[@]}")" resume=auto paths.output_dir="$OUT" "${TRAIN_SMOKE[@]}"
runs=(); for l in "${LEFT[@]}"; do for r in "${RIGHT[@]}"; do runs+=("paper_multicolor_l${l}_r${r}_seed0"); done; done
"$PY" -m biasamp.count -m checkpoint="$(runs_csv "${runs[@]}")" sweep_name=paper-multicolor \
    guidance="$W" sampler.num_steps="$STEPS" n_per_class="$N" paths.output_dir="$OUT" "${COUNT_COMMON[@]}" \
    "${COUNT_SMOKE[@]}"
"$PY" -m biasamp.report sweep="$OUT/count/paper-multicolor" "${REPORT_SMOKE[@]}"
