"""DICOM Structured Report (highdicom, TID 1500 Measurement Report) of a case's OOD verdict.

One measurement group (TID 1501, about the whole series) holds:
- the qualitative evaluation "Out-of-distribution input" = Yes / No (SNOMED CT codes), absent when the bundle
  is uncalibrated;
- the measurements U (normalised uncertainty in [0, 1]), the threshold on U, the raw score u, and the squared
  Mahalanobis distance of the most distant patch with its centre as an SCOORD3D point (LPS mm, the source's
  frame of reference);
- the algorithm identification: segsentry's version, with the bundle file's and the weights' sha256 as
  algorithm parameters.
Concept names that no standard code covers use the private coding scheme ``99SEGSENTRY``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segsentry.dicom import require
from segsentry.dicom.seg import PRIVATE_SCHEME, SR_SERIES_NUMBER, Producer
from segsentry.dicom.uids import derived_uid
from segsentry.runtime.report import CaseReport


def concept(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, PRIVATE_SCHEME, meaning)


OOD_FLAG = ("ood-flag", "Out-of-distribution input")
UNCERTAINTY = ("ood-u", "Normalised OOD uncertainty U")
THRESHOLD = ("ood-threshold", "OOD threshold on U")
RAW_SCORE = ("ood-score", "Mean squared Mahalanobis distance")
TOP_PATCH = ("ood-top-patch", "Most distant patch squared Mahalanobis distance")


def build_sr(report: CaseReport, datasets: Sequence, *, producer: Producer, seg=None):
    """A highdicom ``Comprehensive3DSR`` for ``report``; ``datasets`` are the source series (and ``seg`` the
    segmentation, when written: both are recorded as evidence)."""
    hd = require("highdicom", "Writing DICOM SR")
    from pydicom.sr.codedict import codes

    sr = hd.sr
    algorithm = sr.AlgorithmIdentification(
        name="segsentry", version=producer.version,
        parameters=[f"bundle {producer.bundle_name}", f"bundle sha256 {producer.bundle_sha256}",
                    f"weights sha256 {producer.weights_sha256}"])
    measurements = []
    unit = codes.UCUM.NoUnits
    for (code, value) in ((UNCERTAINTY, report.uncertainty), (THRESHOLD, report.threshold),
                          (RAW_SCORE, report.score)):
        if value is not None:
            measurements.append(sr.Measurement(name=concept(*code), value=float(value), unit=unit,
                                               algorithm_id=algorithm))
    if report.top_patches:
        top = report.top_patches[0]
        point = sr.CoordinatesForMeasurement3D(
            graphic_type=sr.GraphicTypeValues3D.POINT, graphic_data=np.array([top.centre_mm], dtype=np.float64),
            frame_of_reference_uid=datasets[0].FrameOfReferenceUID)
        measurements.append(sr.Measurement(name=concept(*TOP_PATCH), value=float(top.distance), unit=unit,
                                           algorithm_id=algorithm, referenced_coordinates=[point]))
    evaluations = []
    if report.ood is not None:
        evaluations.append(sr.QualitativeEvaluation(name=concept(*OOD_FLAG),
                                                    value=codes.SCT.Yes if report.ood else codes.SCT.No))
    series = datasets[0].SeriesInstanceUID
    group = sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(identifier="segsentry OOD verdict",
                                                  uid=derived_uid(series, producer.weights_sha256, "tracking")),
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=evaluations or None)
    observer = sr.ObservationContext(observer_device_context=sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(producer.weights_sha256, "device"), manufacturer_name="segsentry",
            model_name=producer.bundle_name[:64])))
    procedure = codes.LN.CTUnspecifiedBodyRegion if datasets[0].Modality == "CT" else concept(
        "mr-series", "MR series")
    content = sr.MeasurementReport(observation_context=observer, procedure_reported=procedure,
                                   imaging_measurements=[group])
    evidence = [*datasets, *([seg] if seg is not None else [])]
    document = sr.Comprehensive3DSR(
        evidence=evidence, content=content,
        series_instance_uid=derived_uid(series, producer.weights_sha256, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=derived_uid(series, producer.weights_sha256, "sr"),
        instance_number=1, manufacturer="segsentry", series_description="segsentry OOD report",
        is_complete=True)
    from pydicom.dataset import Dataset

    scheme = Dataset()  # declares the private coding scheme (PS3.3 C.12.1.1.2)
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "segsentry OOD concepts"
    scheme.CodingSchemeResponsibleOrganization = "segsentry"
    document.CodingSchemeIdentificationSequence = [scheme]
    return document


def read_verdict(dataset) -> dict:
    """The flag and numbers of an SR written by :func:`build_sr` (for tests and for reading one back)."""
    hd = require("highdicom", "Reading DICOM SR")
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    out: dict = {"ood": None}
    for item in _walk(report.ContentSequence):
        name = item.ConceptNameCodeSequence[0]
        if name.CodingSchemeDesignator != PRIVATE_SCHEME:
            continue
        if item.ValueType == "CODE":
            out["ood"] = item.ConceptCodeSequence[0].CodeValue == "373066001"
        elif item.ValueType == "NUM":
            out[name.CodeValue] = float(item.MeasuredValueSequence[0].NumericValue)
            for child in getattr(item, "ContentSequence", []):
                if child.ValueType == "SCOORD3D":
                    out[f"{name.CodeValue}-point"] = [float(v) for v in child.GraphicData]
    return out


def _walk(sequence):
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)
