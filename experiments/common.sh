# Shared by the paper recipes (sourced, not run). Environment:
#   PY     the Python of the project's venv (the Makefile passes .venv/bin/python)
#   SMOKE  1: a tiny CPU version of the recipe (minutes) that checks the whole pipeline
#   OUT    output folder (the Makefile passes runs, or runs/smoke with SMOKE=1)
set -euo pipefail
PY=${PY:-python}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = "1" ]; then
    OUT=${OUT:-runs/smoke}
    # tiny model on the embedded MNIST subset, a few CPU steps; counts of a handful of samples
    TRAIN_SMOKE=(model=tiny trainer=cpu dataset.source=embedded data.on_device=false batch_size=16
                 trainer.max_steps=2 trainer.enable_progress_bar=false)
    COUNT_SMOKE=(fabric.accelerator=cpu batch_size=16 save_grid=false)
    REPORT_SMOKE=(max_heatmaps=1)  # one count heatmap (about 2 s each on a CPU) shows the figure works
else
    OUT=${OUT:-runs}
    TRAIN_SMOKE=()
    COUNT_SMOKE=()
    REPORT_SMOKE=()
fi

# Every paper count runs in fp32, as the seed did: bf16 (the count app's `precision: auto` on CUDA) is used only
# where a committed agreement check (benchmarks/precision_check.py: the same model and seeds, bf16 vs fp32
# rho_model inside each other's intervals at the recipe's largest w) says it is safe, and none has run on a GPU yet.
COUNT_COMMON=(precision=fp32)
# The seed's churn window (EDM's ImageNet-64 setting, which the seed's counting used): churn only where
# 0.05 <= t_i <= 50, churn noise std 1.003; passed to every count that sweeps S_churn.
SEED_CHURN=(sampler.s_min=0.05 sampler.s_max=50 sampler.s_noise=1.003)

# run folders of a multirun as one comma-separated Hydra sweep value: runs_csv name1 name2 ...
runs_csv() {
    local out="" name
    for name in "$@"; do out+="${out:+,}$OUT/train/$name"; done
    echo "$out"
}
