"""kdray.dicom_results: the SR and the overlay Secondary Capture read back with pydicom and highdicom, refer to
their source, repeat their UIDs for the same source and model, and pass dciodvfy (dicom3tools) without errors."""

import logging
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from cluster.local.demo_data import dicom_bytes
from kdray.dicom_results import (NOT_FOR_DIAGNOSIS, Finding, ModelIdentity, NotADicomSource, overlay_capture,
                                 read_source, result_uids, structured_report, to_bytes)

MODEL = ModelIdentity("kdray-student", "0.1.0", "sha256:6c258a53bc54", "kdray-student:0.1.0@sha256:6c258a53bc54#int8")
FINDING = Finding(("covid", "normal", "pneumonia"), (0.7, 0.2, 0.1), True, 0.5)


@pytest.fixture(scope="module")
def source():
    pixels = (np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) % 4096)
    data = dicom_bytes(pixels, modality="DX", PatientName="Test^Patient", PatientID="P-1", PatientSex="F",
                       PatientBirthDate="19700101", StudyDate="20261201", StudyTime="101500", AccessionNumber="A1",
                       StudyID="S1", ReferringPhysicianName="", SeriesNumber=1, InstanceNumber=1)
    return data, read_source(data)


def _dciodvfy_errors(path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (Debian's dicom3tools) is not installed: scripts/setup.sh installs it")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_sr_refers_to_its_source_and_names_the_model(source, tmp_path):
    import highdicom as hd

    data, ds = source
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(structured_report(ds, FINDING, MODEL))))
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientID == "P-1"
    assert sr.SeriesInstanceUID != ds.SeriesInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.SeriesDescription == NOT_FOR_DIAGNOSIS
    assert sr.ContributingEquipmentSequence[0].Manufacturer == "kdray"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # highdicom reads it back
    values = [str(element.value) for element in sr.iterall() if element.keyword in (
        "CodeMeaning", "NumericValue", "TextValue", "ReferencedSOPInstanceUID")]
    assert "Probability of covid" in values and "0.7" in values and ds.SOPInstanceUID in values
    assert any(MODEL.digest in v for v in values) and "Present" in values  # covid at the operating point


def test_same_source_and_model_same_uids(source):
    _, ds = source
    first, again = structured_report(ds, FINDING, MODEL), structured_report(ds, FINDING, MODEL)
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    other = result_uids(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), "sha256:000000000000")
    assert other.sr_instance != first.SOPInstanceUID


def test_overlay_is_a_secondary_capture_of_the_study(source):
    _, ds = source
    rgb = np.zeros((224, 224, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    sc = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(overlay_capture(ds, rgb, MODEL))))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == ds.StudyInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (224, 224, 3)
    assert int(sc.pixel_array[..., 0].max()) == 200


@pytest.mark.parametrize("full", [True, False], ids=["full-source", "bare-source"])
def test_what_kdray_writes_passes_dciodvfy(source, tmp_path, full):
    """A full source, and a bare one (no patient or study attributes, no body part): no dciodvfy errors."""
    ds = source[1] if full else read_source(dicom_bytes(np.full((64, 64), 7, np.uint16), BodyPartExamined=None))
    finding = FINDING if full else Finding(("covid", "normal"), (0.4, 0.6), None, None)
    rgb = np.full((224, 224, 3), 90, dtype=np.uint8)
    for name, obj in (("sr.dcm", structured_report(ds, finding, MODEL)), ("sc.dcm", overlay_capture(ds, rgb, MODEL))):
        path = tmp_path / name
        path.write_bytes(to_bytes(obj))
        assert _dciodvfy_errors(path) == [], name


def test_a_header_with_bad_values_is_refused_without_them_in_the_message_or_the_log(caplog):
    """Security: pydicom warns and logs with the offending value (here a birth date); none of it may reach kdray's
    logs or messages, and the refusal has a reason code instead of an exception from highdicom."""
    from kdray.dicom_results import SourceHeaderRefused

    data = dicom_bytes(np.zeros((64, 64), np.uint16), PatientBirthDate="SECRET-19", StudyDate="2026")
    caplog.clear()  # (making the file warned too)
    with caplog.at_level(logging.DEBUG):
        bad = read_source(data)
        with pytest.raises(SourceHeaderRefused) as refused:
            structured_report(bad, FINDING, MODEL)
        with pytest.raises(SourceHeaderRefused):
            overlay_capture(bad, np.zeros((8, 8, 3), np.uint8), MODEL)
    assert refused.value.reason == "bad_dicom_header"
    assert "SECRET" not in str(refused.value) and "2026" not in str(refused.value)
    assert "SECRET" not in caplog.text and "'2026'" not in caplog.text
    assert not logging.getLogger("pydicom").filters  # the filter is there only while a result is built


def test_building_results_logs_no_identifier_of_the_source(source, caplog):
    """Security: highdicom logs the source's SOP Instance UID at INFO while it copies the header; kdray's logs
    (a job's log file takes INFO) must not hold it."""
    _, ds = source
    with caplog.at_level(logging.DEBUG):
        structured_report(ds, FINDING, MODEL)
        overlay_capture(ds, np.zeros((8, 8, 3), np.uint8), MODEL)
    assert str(ds.SOPInstanceUID) not in caplog.text and str(ds.StudyInstanceUID) not in caplog.text


def test_not_dicom_is_refused_with_a_reason():
    with pytest.raises(NotADicomSource) as refused:
        read_source(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert refused.value.reason == "not_dicom"
