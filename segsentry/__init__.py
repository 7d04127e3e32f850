"""segsentry: distance-based out-of-distribution detection for 3D segmentation networks, shipped as ONNX."""

from segsentry.errors import (
    BackendError,
    BundleError,
    CalibrationError,
    ExportError,
    InputError,
    MissingDependencyError,
    ModelFolderError,
    SegsentryError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BundleError",
    "CalibrationError",
    "ExportError",
    "InputError",
    "MissingDependencyError",
    "ModelFolderError",
    "SegsentryError",
    "__version__",
]
