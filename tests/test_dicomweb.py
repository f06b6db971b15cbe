"""kdray.dicomweb: a PACS as a scoring input and as where results go. Hostile answers are refused before they are
used (unit); against the local Orthanc, a QIDO-RS query is paged, every matching instance is scored once by SOP
Instance UID, its SR stored by STOW-RS once however often the run is repeated, and the credentials come from the
environment, never from the URI or into a message (integration); 500 instances in 50 studies, killed with -9 and
run again, give exactly 500 SRs and 500 overlays (e2e)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from cluster.local.demo_data import dicom_bytes
from kdray import KdrayError, dicomweb
from kdray.images import ImageLimits, ImageRefused
from kdray.score import score_archive
from kdray.shard_scorer import ScoringAborted
from tests.test_dicom_results import _dciodvfy_errors
from tests.test_score import _wait_for

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.unit
def test_a_store_is_a_root_and_results_go_in_bounded_requests(monkeypatch):
    assert dicomweb.parse_store("dicomweb+http://pacs:8042/dicom-web/").base == "http://pacs:8042/dicom-web"
    with pytest.raises(KdrayError, match="without a query"):
        dicomweb.parse_store("dicomweb+http://pacs:8042/dicom-web?Modality=DX")
    monkeypatch.setattr(dicomweb, "STORE_MAX_OBJECTS", 3)
    monkeypatch.setattr(dicomweb, "STORE_MAX_BYTES", 10)
    sizes = [[len(o) for o in chunk] for chunk in dicomweb._store_chunks([b"x" * n for n in (4, 4, 4, 1, 1, 1, 1, 30)])]
    assert sizes == [[4, 4], [4, 1, 1], [1, 1], [30]]  # (an object over the byte bound goes alone)


@pytest.mark.unit
@pytest.mark.parametrize("answer, failed", [
    (b'{"00081198": {"vr": "SQ", "Value": [{}, {}]}}', 2), (b'{"00081199": {"vr": "SQ", "Value": [{}]}}', 0),
    (b"", 0), (b"<not json", 0), (b"[1, 2]", 0), (b'{"00081198": {"Value": "x"}}', 0)])
def test_failed_objects_are_counted_from_the_stow_answer(answer, failed):
    assert dicomweb._failed_count(answer) == failed


@pytest.mark.unit
def test_a_pacs_is_no_output_folder(tmp_path):
    with pytest.raises(KdrayError, match="--dicom_store"):
        score_archive(str(tmp_path / "model"), str(tmp_path / "in"), "dicomweb+http://pacs:8042/dicom-web")


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


def _use_pacs_credentials(monkeypatch, pacs) -> None:
    monkeypatch.setenv(dicomweb.USER_ENV, pacs.auth()[0])
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, pacs.auth()[1])


def _stored_srs(pacs) -> list[str]:
    resp = requests.get(f"{pacs.dicomweb_url}/instances", params={"Modality": "SR", "limit": 10000},
                        auth=pacs.auth(), timeout=60)
    resp.raise_for_status()
    return [item["00080018"]["Value"][0] for item in (resp.json() if resp.content.strip() else [])]


@pytest.mark.integration
def test_results_stored_by_stow_once_however_often_the_run_is_repeated(pacs_with_studies, tiny_export, tmp_path,
                                                                       monkeypatch):
    pacs = pacs_with_studies
    _use_pacs_credentials(monkeypatch, pacs)
    uri, store = f"dicomweb+{pacs.dicomweb_url}?Modality=DX", f"dicomweb+{pacs.dicomweb_url}"
    for attempt in range(2):  # the second from scratch: every SR stored again, under the same UIDs
        score_archive(tiny_export[0], uri, str(tmp_path / "out"), limits=ImageLimits(min_side=32), engine="local",
                      shard_size=4, dicom_store=store, overwrite=attempt > 0)
    rows = pq.ParquetDataset(str(tmp_path / "out" / "predictions")).read().to_pylist()
    srs = _stored_srs(pacs)
    assert len(srs) == len(set(srs)) == 11
    assert sorted(srs) == sorted(Path(r["dicom_sr"]).stem for r in rows)
    one = next(r for r in rows)
    back = requests.get(f"{one['path'].rsplit('/series/', 1)[0]}/series", auth=pacs.auth(), timeout=30).json()
    assert any(s["00080060"]["Value"] == ["SR"] for s in back)  # next to the source, in its study


@pytest.mark.integration
def test_a_pacs_refusing_the_results_stops_the_job_and_leaves_the_shard_undone(pacs_with_studies, tiny_export,
                                                                              tmp_path, monkeypatch):
    pacs = pacs_with_studies
    _use_pacs_credentials(monkeypatch, pacs)
    store = f"dicomweb+{pacs.url}/not-dicom-web"  # Orthanc answers 404 there
    with pytest.raises(ScoringAborted, match="cannot store DICOM results in the PACS.*HTTP 404") as stopped:
        score_archive(tiny_export[0], f"dicomweb+{pacs.dicomweb_url}?Modality=DX", str(tmp_path / "out"),
                      limits=ImageLimits(min_side=32), engine="local", shard_size=4, dicom_store=store)
    assert pacs.password() not in str(stopped.value)
    assert not (tmp_path / "out" / "_done").exists() or not list((tmp_path / "out" / "_done").glob("part-*"))
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.integration
def test_a_rerun_finishes_what_the_first_run_listed_though_the_pacs_has_more_now(pacs_with_studies, tiny_export,
                                                                                 tmp_path, monkeypatch):
    pacs, out = pacs_with_studies, tmp_path / "out"
    _use_pacs_credentials(monkeypatch, pacs)
    uri = f"dicomweb+{pacs.dicomweb_url}?Modality=DX"
    run = dict(limits=ImageLimits(min_side=32), engine="local", shard_size=4)
    score_archive(tiny_export[0], uri, str(out), **run)
    (out / "summary.json").unlink()  # as if killed before its last shard was marked
    (out / "_done" / "part-00002.json").unlink()
    arrived = requests.post(f"{pacs.url}/instances", data=dicom_bytes(np.full((64, 64), 7, np.uint16), modality="DX"),
                            auth=pacs.auth(), timeout=30).json()["ID"]
    try:
        summary = score_archive(tiny_export[0], uri, str(out), **run)
    finally:
        requests.delete(f"{pacs.url}/instances/{arrived}", auth=pacs.auth(), timeout=30).raise_for_status()
    assert summary.images == 11 and summary.shards_resumed == 2  # the new instance waits for a new run


# ----------------------------------------------------------------------------- 500 instances, kill -9


@pytest.fixture
def pacs_of_500(tmp_path):
    from cluster.local.pacs import LocalPacs

    rng = np.random.default_rng(5)
    with LocalPacs(tmp_path / "pacs") as pacs:
        with requests.Session() as s:
            s.auth = pacs.auth()
            for study in range(50):
                for i in range(10):
                    data = dicom_bytes(rng.integers(0, 4095, (64, 64)), modality="DX", PatientID=f"P{study:02d}",
                                       StudyInstanceUID=f"1.2.826.0.1.3680043.10.5.{study}")
                    s.post(f"{pacs.url}/instances", data=data, timeout=30).raise_for_status()
        yield pacs


@pytest.mark.e2e
def test_500_instances_killed_and_run_again_give_exactly_500_srs_and_overlays(pacs_of_500, tiny_export, tmp_path):
    from kdray.dicom_results import result_uids
    from kdray.pinning import digest_of

    pacs, out = pacs_of_500, tmp_path / "out"
    root = f"dicomweb+{pacs.dicomweb_url}"
    cmd = [sys.executable, "-m", "jobs.score", "--model", tiny_export[0], "--input", f"{root}?Modality=DX",
           "--output", str(out), "--shard_size", "25", "--min_side", "32", "--explain", "all",
           "--dicom_store", root]
    env = {**os.environ, "KDRAY_LOG_DIR": str(tmp_path / "logs"), dicomweb.USER_ENV: pacs.auth()[0],
           dicomweb.PASSWORD_ENV: pacs.auth()[1]}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    done = out / "_done"
    assert _wait_for(lambda: done.exists() and len(list(done.glob("part-*.json"))) >= 2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "summary.json").exists()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == summary["scored"] == 500 and 0 < summary["images_this_run"] < 500
    rows = pq.ParquetDataset(str(out / "predictions")).read().to_pylist()
    assert len(rows) == len({r["sop_uid"] for r in rows}) == 500
    srs = _stored_srs(pacs)
    assert len(srs) == 500  # killed mid-shard, stored again on the re-run: replaced, never added
    digest = digest_of(rows[0]["model_id"])  # a result's UIDs come from its source's and the model's digest
    assert set(srs) == {result_uids(r["study_uid"], r["sop_uid"], digest).sr_instance for r in rows}
    for r in rows[::100]:  # and its evidence names that source; what was stored passes dciodvfy
        assert _dciodvfy_errors(out / r["dicom_sr"]) == [] and _dciodvfy_errors(out / r["dicom_overlay"]) == []
        uids = result_uids(r["study_uid"], r["sop_uid"], digest)
        sr = requests.get(f"{pacs.dicomweb_url}/studies/{r['study_uid']}/series/{uids.sr_series}/instances/"
                          f"{uids.sr_instance}/metadata", auth=pacs.auth(), timeout=30).json()[0]
        evidence = sr["0040A375"]["Value"][0]["00081115"]["Value"][0]["00081199"]["Value"][0]
        assert evidence["00081155"]["Value"] == [r["sop_uid"]]
    overlays = {r["dicom_overlay"].rsplit("/", 1)[1][:-4] for r in rows}
    found = requests.get(f"{pacs.dicomweb_url}/instances", params={"SeriesNumber": "9702", "limit": 10000},
                         auth=pacs.auth(), timeout=60).json()
    assert len(overlays) == 500 and {f["00080018"]["Value"][0] for f in found} == overlays
