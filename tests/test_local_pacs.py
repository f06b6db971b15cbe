"""cluster/local/pacs.py: Orthanc with DICOMweb in its own network namespace, reachable from this host only over
its veth link, with a password; kdray's SR stored by STOW-RS shows up in QIDO under the source's study."""

import logging
import socket

import numpy as np
import pytest
import requests

from cluster.local.demo_data import dicom_bytes
from cluster.local.pacs import DICOM_PORT, HTTP_PORT, LocalPacs
from kdray.dicom_results import Finding, ModelIdentity, read_source, structured_report

pytestmark = pytest.mark.integration
MODEL = ModelIdentity("kdray-student", "0.1.0", "sha256:0123456789ab", "kdray-student:0.1.0@sha256:0123456789ab#fp32")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with LocalPacs(tmp_path_factory.mktemp("pacs")) as running:
        yield running


def _client(pacs):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    return DICOMwebClient(url=pacs.dicomweb_url, session=create_session_from_user_pass(*pacs.auth()))


def test_it_wants_the_password_and_is_not_on_this_hosts_loopback(pacs):
    assert requests.get(f"{pacs.url}/system", timeout=5).status_code == 401
    assert requests.get(f"{pacs.url}/system", auth=pacs.auth(), timeout=5).status_code == 200
    for port in (HTTP_PORT, DICOM_PORT):  # Orthanc listens on all interfaces, but of its namespace only
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_an_sr_stored_by_stow_is_found_by_qido_under_its_study(pacs):
    client = _client(pacs)
    source = read_source(dicom_bytes(np.full((64, 64), 900, np.uint16), modality="DX", PatientID="P-9"))
    client.store_instances([read_source(dicom_bytes(np.full((64, 64), 900, np.uint16)))])  # another study
    sr = structured_report(source, Finding(("covid", "normal"), (0.8, 0.2), True, 0.5), MODEL)
    client.store_instances([sr])
    client.store_instances([structured_report(source, Finding(("covid", "normal"), (0.8, 0.2), True, 0.5), MODEL)])
    # made again from the same source and model: the same UIDs, so the PACS holds one SR
    found = client.search_for_instances(str(source.StudyInstanceUID), search_filters={"Modality": "SR"})
    assert [f["00080018"]["Value"][0] for f in found] == [sr.SOPInstanceUID]
    back = client.retrieve_instance(str(source.StudyInstanceUID), sr.SeriesInstanceUID, sr.SOPInstanceUID)
    assert back.PatientID == "P-9" and back.VerificationFlag == "UNVERIFIED"


def test_the_password_never_reaches_the_log(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        with LocalPacs(tmp_path / "pacs") as pacs:
            password = pacs.password()
    assert password and password not in caplog.text
    assert "http://" in caplog.text  # it does say where it is
