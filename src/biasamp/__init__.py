"""biasamp: measure how diffusion models amplify dataset bias, and how sampling choices move it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("biasamp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
