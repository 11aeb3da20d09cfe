"""What the mitigation methods add to biasamp: h-space attribute heads for distribution guidance (hspace, heads)."""

from omegaconf import OmegaConf

from biasamp.identity import safe_folder_part

OmegaConf.register_new_resolver("biasamp_hspace_folder", safe_folder_part, replace=True)
