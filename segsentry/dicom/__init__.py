"""DICOM in and out: SEG and SR writers, the ``ood-serve`` DICOM node and the drift-watch log.

This package sits beside ``segsentry.evaluation`` above the runtime: it calls ``segsentry.runtime`` (one
sliding-window core) and the runtime never imports it — ``run_batch`` takes per-case hooks, and the CLI or
``ood-serve`` passes this package's writers in. pydicom, highdicom and pynetdicom (the ``dicom`` extra) are
imported lazily by the modules that need them; ``segsentry.dicom.monitor`` needs none of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from segsentry.errors import MissingDependencyError

DICOM_EXTRA = "dicom"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (pydicom, highdicom, pynetdicom) or raise an error naming ``segsentry[dicom]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(module.split(".")[0], DICOM_EXTRA, purpose) from None
