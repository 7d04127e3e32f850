"""The torch-free runtime: read -> preprocess -> tile -> infer -> aggregate -> score -> write.

Imports only numpy, SimpleITK and onnxruntime (the latter lazily, inside the backend).
"""

from segsentry.runtime.batch import BatchResult, CaseOutcome, run_batch
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.io import CaseInput, LoadedCase, collect_cases, read_case
from segsentry.runtime.pipeline import CasePrediction, VolumeInference, infer_volume, predict_case
from segsentry.runtime.preprocess import Geometry, preprocess

__all__ = [
    "BatchResult",
    "Bundle",
    "CaseInput",
    "CaseOutcome",
    "CasePrediction",
    "Geometry",
    "LoadedCase",
    "VolumeInference",
    "collect_cases",
    "infer_volume",
    "load_bundle",
    "predict_case",
    "preprocess",
    "read_case",
    "run_batch",
]
