"""metacompress: compress PyTorch networks with a meta-learned pruning + distillation policy.

The package is layered (imports point downwards only):
``pipeline`` -> ``policy`` -> ``compress`` / ``deploy`` -> ``zoo`` / ``data``; ``meta`` is a
stand-alone meta-learning core that knows nothing of pruning.
"""

from metacompress.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
