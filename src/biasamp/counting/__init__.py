"""Count jobs: sample a checkpoint under one setting, classify with an oracle, persist exact counts.

Importing the package registers the Hydra resolvers that name a count sweep folder (conf/count.yaml uses them):
``biasamp_sweep_name`` (the default sweep name of a checkpoint) and ``biasamp_count_folder`` (a sweep name made
harmless as one path component while Hydra makes the folder; the app then refuses a name that needed it).
The file-format modules (counts, meta, results, state) are torch-free: the report reads them.
"""

from omegaconf import OmegaConf

from biasamp.counting.names import sweep_name
from biasamp.identity import safe_folder_part

OmegaConf.register_new_resolver("biasamp_sweep_name", sweep_name, replace=True)
OmegaConf.register_new_resolver("biasamp_count_folder", safe_folder_part, replace=True)
