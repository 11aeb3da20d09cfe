"""What the mitigation methods add to biasamp: h-space attribute heads for distribution guidance (hspace, heads)."""

from omegaconf import OmegaConf

from biasamp.identity import safe_folder_part


def hspace_source_part(h_source: str, guidance: float) -> str:
    """The h source in a heads folder's default name: trajectory heads also name their guidance w."""
    return f"{h_source}-w{float(guidance):g}" if h_source == "trajectory" else str(h_source)


OmegaConf.register_new_resolver("biasamp_hspace_folder", safe_folder_part, replace=True)
OmegaConf.register_new_resolver("biasamp_hspace_source", hspace_source_part, replace=True)
