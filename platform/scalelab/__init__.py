"""scalelab: BASIC-style combined-scaling experiments on contrastive image-text dual encoders.

Subpackages are imported on demand (`scalelab.models`, `scalelab.losses`, `scalelab.gradcache`,
`scalelab.config`) so that importing the package pulls in no training framework.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scalelab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
