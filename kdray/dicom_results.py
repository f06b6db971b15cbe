"""Results as DICOM objects a PACS keeps and a viewer shows, next to the study they are about.

Per scored instance (the IHE AI Results profile's shape):

* a **Comprehensive 3D SR** (TID 1500 Measurement Report, written with highdicom): one measurement group for the
  source image with the class probabilities, the finding at the model's operating point (COVID-19 suspected or
  not; absent when the model has no threshold), the algorithm (model name, version, export digest) and a
  reference to the source instance. Same patient and study as the source, a new series;
  ``VerificationFlag`` UNVERIFIED, "not for diagnostic use" in the series description, kdray in the
  Contributing Equipment Sequence;
* with an explanation, the Grad-CAM overlay as a **Secondary Capture** image (RGB) in another new series of the
  same study.

UIDs are derived from the source SOP Instance UID and the model digest (:func:`result_uids`): scoring the same
instance with the same model again makes the same objects, which a PACS stores once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from kdray import KdrayError, __version__
from kdray.pinning import digest_of

MANUFACTURER = "kdray"
NOT_FOR_DIAGNOSIS = "kdray AI result - not for diagnostic use"  # LO: at most 64 characters
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9701, 9702
KDRAY_SCHEME = "99KDRAY"  # a private coding scheme (PS3.16 8.2: "99" prefix) for what no standard code names
# SNOMED CT codes of the findings kdray's classes stand for; a class without one gets a 99KDRAY code.
CLASS_CODES = {
    "covid": ("840539006", "SCT", "Disease caused by SARS-CoV-2"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "normal": ("17621005", "SCT", "Normal"),
}
FINDING = ("121071", "DCM", "Finding")
PRESENT, ABSENT = ("52101004", "SCT", "Present"), ("2667000", "SCT", "Absent")
PROCEDURE = ("399208008", "SCT", "Plain chest X-ray")
# Type 2 patient and study attributes the results inherit from their source (empty if the source has none).
TYPE2_INHERITED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")
UID_NAMESPACE = uuid.UUID("5d0c7a52-94a4-4b8e-9d55-6b1f3f0c2e71")  # kdray's own, fixed forever


class NotADicomSource(KdrayError):
    """A DICOM result needs a DICOM source: its patient, study and instance to refer to."""

    reason = "not_dicom"


class SourceHeaderRefused(KdrayError):
    """The source's header holds a value its VR forbids (a date that is no date, an unknown character set, ...):
    no result object is made from it. The message names the exception type only, never a value (patient data)."""

    reason = "bad_dicom_header"


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_QUIET = _DropAll()
# highdicom logs each source's SOP Instance UID at INFO while it copies the header: an identifier, kept out of logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)
_quiet_users = 0
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def _no_header_values_in_logs():
    """pydicom warns, and logs, with the offending value (a birth date, a name): while kdray copies a source's
    header into its results, those records are dropped (the refusal says what went wrong, without the value)."""
    global _quiet_users
    logger = logging.getLogger("pydicom")
    with _quiet_lock:
        _quiet_users += 1
        if _quiet_users == 1:
            logger.addFilter(_QUIET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
        raise SourceHeaderRefused(f"the source's header cannot be copied into a DICOM result "
                                  f"({type(exc).__name__} while building it)") from None
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                logger.removeFilter(_QUIET)


@dataclass(frozen=True)
class ModelIdentity:
    """What answered: the export's name, version and digest (``sha256:<12 hex>``), and the full model id."""

    name: str
    version: str
    digest: str
    model_id: str

    @classmethod
    def of(cls, name: str, version: str, model_id: str) -> "ModelIdentity":
        return cls(name, version, digest_of(model_id), model_id)


@dataclass(frozen=True)
class Finding:
    """One image's result: class probabilities, and the covid finding at the model's operating point."""

    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    covid_suspect: bool | None  # None: the model has no threshold
    covid_threshold: float | None


@dataclass(frozen=True)
class ResultUids:
    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str


def result_uids(study_uid: str, sop_uid: str, model_digest: str) -> ResultUids:
    """Deterministic UIDs (``2.25.<hash>``): one SR and one overlay series per study and model, one instance of
    each per source instance and model."""
    def uid(*parts: str) -> str:
        return derived_uid(model_digest, *parts)

    return ResultUids(sr_series=uid("sr-series", study_uid), sr_instance=uid("sr", sop_uid),
                      sc_series=uid("sc-series", study_uid), sc_instance=uid("sc", sop_uid))


def derived_uid(*parts: str) -> str:
    """``2.25.<name-based UUID>`` (PS3.5 B.2) of ``parts``: the same parts always give the same UID."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(('kdray', *parts))).int}"


def read_source(data: bytes) -> Dataset:
    """The header of a DICOM source (no pixel data), for its patient, study and identifiers."""
    try:
        with _no_header_values_in_logs():
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for what is not DICOM
        raise NotADicomSource(f"the source is not DICOM ({type(exc).__name__}): a DICOM result needs a DICOM "
                              "image to refer to") from None
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not str(ds.get(keyword, "") or ""):
            raise NotADicomSource(f"the source has no {keyword}: a DICOM result must refer to its source")
    for keyword in TYPE2_INHERITED:  # what the results copy: present, empty when the source leaves it out
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def _code(triple: tuple[str, str, str]):
    from highdicom.sr import CodedConcept

    value, scheme, meaning = triple
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _class_code(name: str):
    return _code(CLASS_CODES.get(name, (name[:16], KDRAY_SCHEME, name[:64])))


def _probability_name(name: str):
    return _code((f"p-{name}"[:16], KDRAY_SCHEME, f"Probability of {name}"[:64]))


def _algorithm(model: ModelIdentity):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name=model.name[:64], version=f"{model.version} {model.digest}"[:64],
                                   manufacturer=MANUFACTURER)


def _equipment(model: ModelIdentity):
    from highdicom import ContributingEquipment

    return ContributingEquipment(manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
                                 manufacturer_model_name=model.name[:64],
                                 software_versions=[f"kdray {__version__}", model.digest][:2],
                                 contribution_description=f"classified by {model.model_id}"[:1024])


def structured_report(source: Dataset, finding: Finding, model: ModelIdentity) -> Dataset:
    """The SR of one scored instance (see the module doc); :class:`SourceHeaderRefused` when the source's header
    cannot be copied."""
    with _no_header_values_in_logs():
        return _structured_report(source, finding, model)


def _structured_report(source: Dataset, finding: Finding, model: ModelIdentity) -> Dataset:
    import highdicom as hd
    from highdicom.sr import (DeviceObserverIdentifyingAttributes, Measurement, MeasurementReport,
                              MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              QualitativeEvaluation, SourceImageForMeasurementGroup, TrackingIdentifier)

    uids = result_uids(str(source.StudyInstanceUID), str(source.SOPInstanceUID), model.digest)
    evaluations = [QualitativeEvaluation(_code(FINDING), _class_code(finding.classes[
        int(np.argmax(finding.probabilities))]))]
    if finding.covid_suspect is not None:
        evaluations.append(QualitativeEvaluation(_class_code("covid"),
                                                 _code(PRESENT if finding.covid_suspect else ABSENT)))
    measurements = [Measurement(name=_probability_name(name), value=float(p), unit=codes.UCUM.NoUnits,
                                algorithm_id=_algorithm(model))
                    for name, p in zip(finding.classes, finding.probabilities)]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(uids.sr_instance, "tracking"),
                                               identifier="kdray classification"),
        algorithm_id=_algorithm(model), measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID))])
    observer = ObserverContext(observer_type=codes.DCM.Device,
                               observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                   uid=derived_uid("device", model.digest),
                                   name=MANUFACTURER, manufacturer_name=MANUFACTURER,
                                   model_name=model.name[:64]))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=_code(PROCEDURE), imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=uids.sr_series, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description=NOT_FOR_DIAGNOSIS,
        contributing_equipment=[_equipment(model)])
    return sr


def overlay_capture(source: Dataset, pixels: np.ndarray, model: ModelIdentity) -> Dataset:
    """The Grad-CAM overlay (uint8 RGB [H, W, 3]) as a Secondary Capture image in a new series of the study;
    :class:`SourceHeaderRefused` when the source's header cannot be copied."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise KdrayError(f"an overlay must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    with _no_header_values_in_logs():
        return _overlay_capture(source, pixels, model)


def _overlay_capture(source: Dataset, pixels: np.ndarray, model: ModelIdentity) -> Dataset:
    import highdicom as hd

    uids = result_uids(str(source.StudyInstanceUID), str(source.SOPInstanceUID), model.digest)
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=uids.sc_series, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance, instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"), series_description=NOT_FOR_DIAGNOSIS,
        contributing_equipment=[_equipment(model)])
    if orientation is None:  # unknown: empty, as a Type 2 attribute may be (highdicom wants values)
        sc.PatientOrientation = None
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality") or not source.get("BodyPartExamined"):  # Type 2C: the source's, or empty
        sc.Laterality = source.get("Laterality") or None
    return sc


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation: the overlay keeps its rows and columns (cropped and scaled, never
    flipped)."""
    value = source.get("PatientOrientation")
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else []
    return (str(values[0]), str(values[1])) if len(values) == 2 and all(values) else None


def overlay_rgb(png: bytes) -> np.ndarray:
    """An overlay PNG (:func:`kdray.explain.overlay_png`, kdray's own) as uint8 RGB pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def to_bytes(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, meta header, explicit VR little endian)."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
