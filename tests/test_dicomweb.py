"""kdray.dicomweb: a PACS as a scoring input. Hostile answers are refused before they are used (unit); against
the local Orthanc, a QIDO-RS query is paged, every matching instance is scored once by SOP Instance UID, and the
credentials come from the environment, never from the URI or into a message (integration)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from cluster.local.demo_data import dicom_bytes
from kdray import KdrayError, dicomweb
from kdray.images import ImageLimits, ImageRefused
from kdray.score import score_archive


@pytest.mark.unit
@pytest.mark.parametrize("entry", ["1.2/3.4/../5", "1.2/3.4", "1.2/3.4/5.6/7", "1.2/3.4/5x", "1/2/" + "1." * 40])
def test_uids_are_checked_before_a_url_has_them(entry):
    with pytest.raises(ImageRefused):
        dicomweb.check_entry(entry)


@pytest.mark.unit
def test_a_uri_with_credentials_or_paging_is_refused():
    with pytest.raises(KdrayError, match="no credentials") as refused:
        dicomweb.parse("dicomweb+http://me:hunter2@pacs:8042/dicom-web")
    assert "hunter2" not in str(refused.value)
    with pytest.raises(KdrayError, match="pages"):
        dicomweb.parse("dicomweb+http://pacs:8042/dicom-web?limit=5")
    endpoint = dicomweb.parse("dicomweb+https://pacs:443/dicom-web/?Modality=DX&StudyDate=2026")
    assert endpoint.base == "https://pacs:443/dicom-web" and endpoint.query == (("Modality", "DX"), ("StudyDate", "2026"))


@pytest.mark.unit
def test_the_first_part_of_a_multipart_answer_and_nothing_else():
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\nDICM-BYTES\r\n--B\r\n\r\nSECOND\r\n--B--"
    assert dicomweb._first_part('multipart/related; type="application/dicom"; boundary=B', body) == b"DICM-BYTES"
    for content_type in ("text/html", "multipart/related"):  # not DICOM; no boundary
        with pytest.raises(ImageRefused):
            dicomweb._first_part(content_type, body)


@pytest.fixture(scope="module")
def pacs_with_studies(tmp_path_factory):
    from cluster.local.pacs import LocalPacs

    rng = np.random.default_rng(3)
    with LocalPacs(tmp_path_factory.mktemp("pacs")) as pacs:
        for study in range(3):
            study_uid = f"1.2.826.0.1.3680043.10.1{study}"
            for i in range(4 if study < 2 else 3):
                data = dicom_bytes(rng.integers(0, 4095, (64, 64)), modality="DX", StudyInstanceUID=study_uid,
                                   PatientID=f"P{study}")
                resp = requests.post(f"{pacs.url}/instances", data=data, auth=pacs.auth(), timeout=30)
                assert resp.status_code == 200, resp.text
        other = dicom_bytes(rng.integers(0, 4095, (64, 64)), modality="CR")  # not matched by Modality=DX
        requests.post(f"{pacs.url}/instances", data=other, auth=pacs.auth(), timeout=30).raise_for_status()
        yield pacs


@pytest.mark.integration
def test_scoring_from_the_pacs_scores_each_instance_once(pacs_with_studies, tiny_export, tmp_path, monkeypatch):
    pacs = pacs_with_studies
    monkeypatch.setenv(dicomweb.USER_ENV, pacs.auth()[0])
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, pacs.auth()[1])
    monkeypatch.setattr(dicomweb, "PAGE", 4)  # 11 instances: three pages and an empty one
    uri = f"dicomweb+{pacs.dicomweb_url}?Modality=DX"
    out = tmp_path / "out"
    summary = score_archive(tiny_export[0], uri, str(out), limits=ImageLimits(min_side=32), engine="local",
                            shard_size=4, dicom_results=True)
    rows = pq.ParquetDataset(str(out / "predictions")).read().to_pylist()
    assert summary.scored == len(rows) == 11 and summary.errors == 0
    assert len({r["sop_uid"] for r in rows}) == 11 and {r["study_uid"][-2:] for r in rows} == {"10", "11", "12"}
    assert all(r["path"].startswith(pacs.dicomweb_url + "/studies/") and r["dicom_sr"] for r in rows)
    assert pacs.password() not in (out / "summary.json").read_text()


@pytest.mark.integration
def test_wrong_credentials_are_one_clear_line_without_the_password(pacs_with_studies, tiny_export, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv(dicomweb.USER_ENV, "kdray")
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "wrong-secret")
    with pytest.raises(KdrayError, match="refused the query") as refused:
        score_archive(tiny_export[0], f"dicomweb+{pacs_with_studies.dicomweb_url}", str(tmp_path / "out"),
                      engine="local")
    assert "wrong-secret" not in str(refused.value) and dicomweb.PASSWORD_ENV in str(refused.value)
