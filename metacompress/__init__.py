"""metacompress: compress PyTorch networks with a meta-learned pruning + distillation policy.

Use from Python (``metacompress.api``)::

    import metacompress as mc
    small, report = mc.compress(model, x[:1], target=mc.Latency(0.5), train=train_set)
    mc.export_onnx(small, x[:1], "small.onnx")
    mc.verify("small.onnx", small, test_set)

The package is layered (imports point downwards only):
``api`` / ``pipeline`` -> ``policy`` -> ``compress`` / ``deploy`` -> ``zoo`` / ``data``; ``meta`` is a
stand-alone meta-learning core that knows nothing of pruning.
"""

from metacompress.api import CompressionReport, compress, export_onnx, load_compressed, save, verify
from metacompress.budget import Latency, MACs, Milliseconds, Params
from metacompress.compress.distill import RepairConfig
from metacompress.errors import UserError
from metacompress.policy.store import Policy, load_policy

__version__ = "0.1.0"
__all__ = ["CompressionReport", "Latency", "MACs", "Milliseconds", "Params", "Policy", "RepairConfig", "UserError",
           "__version__", "compress", "export_onnx", "load_compressed", "load_policy", "save", "verify"]
