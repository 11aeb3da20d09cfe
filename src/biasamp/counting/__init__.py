"""Count jobs: sample a checkpoint under one setting, classify with an oracle, persist exact counts."""
