"""flowvae: does a normalizing-flow posterior make a VAE generate events closer to its input?"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowvae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
