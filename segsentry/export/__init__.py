"""torch -> ONNX: ``export_nnunet`` for nnU-Net v2 model folders, ``export_module`` for any 3D network.

Needs the ``export`` extra (torch, onnxscript, dynamic-network-architectures).
"""

from segsentry.errors import MissingDependencyError

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependencyError("torch", "export", "Exporting a PyTorch model") from exc

from segsentry.export.api import ExportResult, export_module, export_nnunet
from segsentry.export.nnunet import DEFAULT_LAYER

__all__ = ["DEFAULT_LAYER", "ExportResult", "export_module", "export_nnunet"]
