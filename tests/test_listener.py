"""kdray.listener and jobs.listen: the C-STORE SCP "AI node".

Unit (loopback pynetdicom peers, a stub predictor): the config refuses what would make a useless or open node;
associations from unknown calling AEs, or past max_associations, are rejected; instances that are not CR/DX, of
another Modality or too large are refused with a status and nothing is queued; an acknowledged instance is on disk
(and a failed write is no acknowledgement); duplicates collapse; the worker stores one SR per instance at the
destination, sends the undecodable to refused/ with a reason, keeps the queue while the destination is away, and
scores first what a previous run left. No log line carries patient data.

Integration (the local Orthanc as sender and destination, the listener as a subprocess): 100 pushed DX instances,
the listener killed -9 mid-stream and restarted, give exactly 100 SRs in Orthanc, one per source.
"""

from __future__ import annotations

import io
import logging
import os
import queue as queues
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cluster.local.demo_data import dicom_bytes
from kdray import KdrayError
from kdray.config import ImageLimits, ListenJobConfig, load_config
from kdray.dicom_results import ModelIdentity
from kdray.listener import InstanceQueue, Listener, Receiver

ROOT = Path(__file__).resolve().parents[1]
SENDER = "SENDER"
SECRET_NAME = "DOE^SECRETNAME"  # must never reach a log line
MODEL = ModelIdentity("kdray-student", "0.1.0", "sha256:0123456789ab", "kdray-student:0.1.0@sha256:0123456789ab#fp32")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


class StubPredictor:
    """What Listener needs of a Predictor, without a model."""

    classes, image_size, covid_threshold, backend = ["covid", "normal", "pneumonia"], 32, 0.5, "stub"
    model_id = MODEL.model_id

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32)
        return np.tile(np.float32([0.7, 0.2, 0.1]), (len(images), 1))

    def covid_suspect(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, 0] >= self.covid_threshold


def _config(tmp_path, **overrides) -> ListenJobConfig:
    values = dict(model="stub", port=0, queue_dir=str(tmp_path / "node"), accepted_calling_aes=[SENDER],
                  destination="DEST@127.0.0.1:9", batch_size=4, max_wait_s=0.2, network_timeout_s=5.0)
    return ListenJobConfig(**{**values, **overrides})


def _dataset(side: int = 64, sop_class: str = CR_STORAGE, **attrs) -> pydicom.Dataset:
    rng = np.random.default_rng(side)
    data = dicom_bytes(rng.integers(0, 4095, (side, side)), **{"modality": "DX", "PatientName": SECRET_NAME, **attrs})
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def _scu(calling: str = SENDER, contexts=(CR_STORAGE, CT_STORAGE)):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _send(address, *datasets, calling: str = SENDER) -> list[int | None]:
    assoc = _scu(calling).associate(*address, ae_title="KDRAY")
    assert assoc.is_established, "the association was not accepted"
    try:
        statuses = []
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            statuses.append(int(answer.Status) if "Status" in answer else None)
        return statuses
    finally:
        if assoc.is_established:
            assoc.release()


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _queued(cfg) -> list[str]:
    return sorted(p.name for p in (Path(cfg.queue_dir) / "queue").glob("*.dcm"))


@pytest.fixture
def receiver(tmp_path):
    """A Receiver alone (no worker): what it acknowledges stays in queue/."""
    started = []

    def start(**overrides):
        cfg = _config(tmp_path, **overrides)
        scp = Receiver(cfg, InstanceQueue(cfg.queue_dir))
        scp.start()
        started.append(scp)
        return cfg, scp

    yield start
    for scp in started:
        scp.stop(grace_s=1)


class Destination:
    """A loopback C-STORE SCP standing in for the PACS: keeps every SR it is sent."""

    def __init__(self, port: int = 0, status: int = 0x0000) -> None:
        from pynetdicom import AE, evt

        self.received: dict[str, pydicom.Dataset] = {}
        self.callers: set[str] = set()
        self.status = status
        ae = AE(ae_title="DEST")
        ae.add_supported_context(SR_STORAGE)
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.callers.add(str(event.assoc.requestor.ae_title).strip())
        if self.status == 0x0000:
            ds = event.dataset
            self.received[str(ds.SOPInstanceUID)] = ds
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


def _source_of(sr: pydicom.Dataset) -> str:
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return str(evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


# ----------------------------------------------------------------------------- the config


@pytest.mark.unit
def test_the_config_refuses_a_node_that_would_be_open_or_useless(tmp_path):
    base = ["--model", "m", "--destination", "KDRAYPACS@10.213.0.2:4242"]
    with pytest.raises(KdrayError, match="--accepted_calling_aes is required"):
        load_config(ListenJobConfig, base)
    for bad in ("KDRAYPACS@10.213.0.2", "10.213.0.2:4242", "KDRAYPACS@host:0", "WAY-TOO-LONG-AE-TITLE@h:1"):
        with pytest.raises(KdrayError, match="destination"):
            load_config(ListenJobConfig, [*base[:2], "--accepted_calling_aes", "A", "--destination", bad])
    with pytest.raises(KdrayError, match="AE title"):
        load_config(ListenJobConfig, [*base, "--accepted_calling_aes", "A\\B"])
    cfg = load_config(ListenJobConfig, [*base, "--accepted_calling_aes", "KDRAYPACS,OTHER", "--max_bytes", "1000"])
    assert cfg.accepted_calling_aes == ["KDRAYPACS", "OTHER"] and cfg.limits.max_bytes == 1000
    assert ListenJobConfig.destination_of(cfg.destination) == ("KDRAYPACS", "10.213.0.2", 4242)
    with pytest.raises(KdrayError, match="accepted_calling_aes"):  # built in code, not from flags: still refused
        Listener(_config(tmp_path, accepted_calling_aes=[]), StubPredictor(), MODEL)


@pytest.mark.unit
def test_the_job_refuses_to_start_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.listen", "--model", "m", "--destination", "nowhere",
                           "--accepted_calling_aes", "A"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KDRAY_LOG_DIR": str(tmp_path)})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: config key destination: the destination is AET@host:port, e.g. KDRAYPACS@10.213.0.2:4242, "
        "got 'nowhere'"]


# ----------------------------------------------------------------------------- receiving


@pytest.mark.unit
def test_an_unknown_calling_ae_is_rejected_and_logged_without_data(receiver, caplog):
    cfg, scp = receiver()
    with caplog.at_level(logging.INFO):
        assoc = _scu("INTRUDER").associate(*scp.address, ae_title="KDRAY")
        assert assoc.is_rejected and not assoc.is_established
        _wait(lambda: scp.refusals.get("calling_ae_not_accepted"), 5, "the refusal")
    assert "refused an association from INTRUDER" in caplog.text and "calling_ae_not_accepted" in caplog.text
    assert _queued(cfg) == []


@pytest.mark.unit
def test_associations_past_the_limit_are_rejected(receiver):
    cfg, scp = receiver(max_associations=1)
    first = _scu().associate(*scp.address, ae_title="KDRAY")
    try:
        assert first.is_established
        second = _scu().associate(*scp.address, ae_title="KDRAY")
        assert second.is_rejected
        assert scp.refusals.get("too_many_associations") == 1
    finally:
        first.release()


@pytest.mark.unit
def test_what_is_not_a_cr_or_dx_radiograph_is_refused_with_a_status_and_not_queued(receiver, caplog):
    cfg, scp = receiver()
    ct = _dataset(sop_class=CT_STORAGE)
    ct_modality = _dataset(Modality="CT")  # a CR SOP class whose Modality is not allowed
    with caplog.at_level(logging.DEBUG):
        assert _send(scp.address, ct, ct_modality) == [0x0122, 0xA900]
    assert _queued(cfg) == [] and scp.refusals == {"unsupported_sop_class": 1, "wrong_modality": 1}
    assert "unsupported_sop_class" in caplog.text and "wrong_modality" in caplog.text
    for secret in (SECRET_NAME, str(ct.SOPInstanceUID), str(ct_modality.StudyInstanceUID)):
        assert secret not in caplog.text  # neither kdray's lines nor pynetdicom's (even at DEBUG)


@pytest.mark.unit
def test_an_acknowledged_instance_is_on_disk_and_duplicates_collapse(receiver):
    cfg, scp = receiver()
    ds = _dataset()
    assert _send(scp.address, ds) == [0x0000]
    # No worker runs: the file is there because it was written before the success status went back.
    path = Path(cfg.queue_dir) / "queue" / f"{ds.SOPInstanceUID}.dcm"
    assert _queued(cfg) == [path.name]
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PatientName == SECRET_NAME
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    assert _send(scp.address, ds, ds) == [0x0000, 0x0000]  # sent again (a sender's retry): still one file
    assert _queued(cfg) == [path.name] and list((Path(cfg.queue_dir) / "incoming").iterdir()) == []


@pytest.mark.unit
def test_no_acknowledgement_without_a_durable_copy(receiver, monkeypatch):
    cfg, scp = receiver()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert _send(scp.address, _dataset()) == [0xA700]
    assert _queued(cfg) == [] and list((Path(cfg.queue_dir) / "incoming").iterdir()) == []
    assert scp.refusals == {"io_error": 1}


@pytest.mark.unit
def test_too_large_instances_are_refused_and_a_huge_stream_is_cut(receiver):
    cfg, scp = receiver(limits=ImageLimits(max_bytes=6000), max_pdu=4096)
    assert _send(scp.address, _dataset(side=56)) == [0xA700]  # 6.3 kB of pixels: over 6000 bytes
    assert _send(scp.address, _dataset(side=256)) == [None]  # 128 kB: aborted while it arrives
    assert _queued(cfg) == [] and scp.refusals == {"file_too_large": 2}


@pytest.mark.unit
def test_the_queue_name_is_a_checked_uid(tmp_path):
    q = InstanceQueue(tmp_path)
    for bad in ("../1.2", "1.2/3", "1..2", "1.2.x", "1." * 33 + "1"):
        with pytest.raises(ValueError):
            q.put(bad, b"data")
    assert list(tmp_path.rglob("*.dcm")) == [] and list((tmp_path / "incoming").iterdir()) == []


# ----------------------------------------------------------------------------- scoring and storing onward


@pytest.fixture
def node(tmp_path):
    """A Listener with a stub predictor; ``node(destination_port, **cfg)`` starts one."""
    started = []

    def start(port: int, **overrides):
        cfg = _config(tmp_path, destination=f"DEST@127.0.0.1:{port}", **overrides)
        listener = Listener(cfg, StubPredictor(), MODEL)
        listener.start()
        started.append(listener)
        return cfg, listener

    yield start
    for listener in started:
        listener.stop(grace_s=1)


@pytest.mark.unit
def test_each_instance_gets_one_sr_at_the_destination_and_leaves_the_queue(node, caplog):
    dest = Destination()
    try:
        cfg, listener = node(dest.port)
        sources = [_dataset() for _ in range(6)]
        too_small = _dataset(side=16)
        with caplog.at_level(logging.INFO):
            assert _send(listener.receiver.address, *sources, too_small, sources[0]) == [0x0000] * 8
            _wait(lambda: len(dest.received) == 6 and not _queued(cfg), 20, "6 SRs at the destination")
        assert sorted(_source_of(sr) for sr in dest.received.values()) == sorted(str(s.SOPInstanceUID)
                                                                                for s in sources)
        assert dest.callers == {"KDRAY"}
        refused = Path(cfg.queue_dir) / "refused"
        assert (refused / f"{too_small.SOPInstanceUID}.dcm").exists()
        assert (refused / f"{too_small.SOPInstanceUID}.dcm.reason").read_text().startswith("too_small:")
        assert "SR(s) stored" in caplog.text
        for secret in (SECRET_NAME, *(str(s.SOPInstanceUID) for s in sources)):
            assert secret not in caplog.text
    finally:
        dest.stop()


@pytest.mark.integration  # no services, but it waits out retries: kept out of the one-minute unit tier
def test_a_destination_that_is_away_keeps_the_queue_until_it_is_back(tmp_path, node):
    import socket

    with socket.socket() as probe:  # a port with nobody on it (yet)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    early = InstanceQueue(tmp_path / "node")  # left by a previous run: scored first on start
    left = _dataset()
    buf = io.BytesIO()
    left.save_as(buf, enforce_file_format=True)
    early.put(str(left.SOPInstanceUID), buf.getvalue())
    (early.incoming / "half-written.part").write_bytes(b"never acknowledged")
    cfg, listener = node(port)
    assert list(early.incoming.iterdir()) == []
    late = _dataset()
    assert _send(listener.receiver.address, late) == [0x0000]
    time.sleep(1.5)  # at least one failed attempt
    assert len(_queued(cfg)) == 2 and listener.stored == 0
    dest = Destination(port)
    try:
        _wait(lambda: len(dest.received) == 2, 20, "the SRs once the destination is back")
        assert {_source_of(sr) for sr in dest.received.values()} == {str(left.SOPInstanceUID),
                                                                       str(late.SOPInstanceUID)}
        _wait(lambda: not _queued(cfg), 5, "an empty queue")
    finally:
        dest.stop()


@pytest.mark.unit
def test_an_sr_the_destination_refuses_goes_to_refused_with_its_status(node):
    dest = Destination(status=0xC123)
    try:
        cfg, listener = node(dest.port)
        ds = _dataset()
        assert _send(listener.receiver.address, ds) == [0x0000]
        reason = Path(cfg.queue_dir) / "refused" / f"{ds.SOPInstanceUID}.dcm.reason"
        _wait(reason.exists, 20, "the refusal")
        assert reason.read_text().startswith("destination_refused") and "0xC123" in reason.read_text()
        assert _queued(cfg) == []
    finally:
        dest.stop()


# ----------------------------------------------------------------------------- against Orthanc


class _Lines:
    """A subprocess's stdout lines, read by a thread, so that waiting for one has a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queues.Queue[str] = queues.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queues.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s; output: {''.join(self.seen)[-2000:]}")

    def all(self) -> str:
        """Everything read so far (call once the process has exited)."""
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def _sr_file(url: str, auth, orthanc_id: str):
    import requests

    answer = requests.get(f"{url}/instances/{orthanc_id}/file", auth=auth, timeout=30)
    answer.raise_for_status()
    return pydicom.dcmread(io.BytesIO(answer.content))


@pytest.mark.integration
def test_orthanc_pushes_100_instances_killed_mid_stream_and_gets_100_srs(tiny_export, tmp_path):
    import requests

    from cluster.local.pacs import AET, DICOM_PORT, LocalPacs

    started = time.monotonic()
    queue_dir, logs = tmp_path / "node", tmp_path / "logs"
    with LocalPacs(tmp_path / "pacs") as pacs:
        auth, url = pacs.auth(), pacs.url
        rng = np.random.default_rng(7)
        ids, sources, id_of = [], set(), {}
        for study in range(10):
            study_uid = f"1.2.826.0.1.3680043.10.77.{study}"
            for _ in range(10):
                data = dicom_bytes(rng.integers(0, 4095, (64, 64)), modality="DX", StudyInstanceUID=study_uid,
                                   PatientID=f"P{study}", PatientName=SECRET_NAME)
                answer = requests.post(f"{url}/instances", data=data, auth=auth, timeout=30)
                answer.raise_for_status()
                ids.append(answer.json()["ID"])
                uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
                sources.add(uid)
                id_of[uid] = ids[-1]
        command = [sys.executable, "-m", "jobs.listen", "--model", tiny_export[0], "--host", pacs.host_address,
                   "--port", "0", "--accepted_calling_aes", AET, "--destination",
                   f"{AET}@{pacs.pacs_address}:{DICOM_PORT}", "--queue_dir", str(queue_dir), "--batch_size", "16",
                   "--max_wait_s", "10", "--threads", "1"]
        env = {**os.environ, "KDRAY_LOG_DIR": str(logs)}

        def start_listener():
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            lines = _Lines(proc)
            try:
                port = int(re.search(r":(\d+); SRs go to", lines.wait_for("(Ctrl-C or SIGTERM stops)", 60)).group(1))
                modality = {"AET": "KDRAY", "Host": pacs.host_address, "Port": port}  # Orthanc's push target
                requests.put(f"{url}/modalities/KDRAY", json=modality, auth=auth, timeout=10).raise_for_status()
            except BaseException:
                proc.kill()
                proc.wait(timeout=10)
                raise
            return proc, lines

        def push(resources, synchronous=False):
            answer = requests.post(f"{url}/modalities/KDRAY/store", auth=auth, timeout=60,
                                   json={"Resources": resources, "Synchronous": synchronous})
            answer.raise_for_status()

        def srs() -> list[str]:
            answer = requests.post(f"{url}/tools/find", auth=auth, timeout=30,
                                   json={"Level": "Instance", "Query": {"Modality": "SR"}})
            answer.raise_for_status()
            return answer.json()

        proc, lines = start_listener()
        first_run = lines
        try:
            queued = queue_dir / "queue"
            push(ids[:40], synchronous=True)  # 40 acknowledged: two batches of 16 are scored, 8 wait (max_wait_s)
            push(ids[40:])  # the rest, while the listener is killed
            _wait(lambda: len(srs()) >= 32, 60, "the first two batches' SRs")
            proc.kill()
            proc.wait(timeout=10)
            acknowledged = {p.name[:-4] for p in queued.glob("*.dcm")}  # on disk, not yet stored onward
            stored_before = len(srs())
            assert acknowledged and 32 <= stored_before < 100
            scored_before = {_source_of(_sr_file(url, auth, i)) for i in srs()}
            proc, lines = start_listener()  # the same command: what is queued is scored first
            # Orthanc's second job failed with the listener: the sender pushes again what was never acknowledged
            # (neither queued nor scored), and nothing that was: those come from the queue alone
            push([id_of[uid] for uid in sorted(sources - acknowledged - scored_before)])
            _wait(lambda: len(srs()) >= 100, 90, "100 SRs in Orthanc")
            time.sleep(1.0)  # none more coming
            found = srs()
            assert len(found) == 100
            referenced = []
            for orthanc_id in found:
                referenced.append(_source_of(_sr_file(url, auth, orthanc_id)))
            assert sorted(referenced) == sorted(sources) and acknowledged <= set(referenced)
            _wait(lambda: not list(queued.glob("*.dcm")), 30, "an empty queue")
            proc.send_signal(signal.SIGTERM)  # a graceful stop
            assert proc.wait(timeout=30) == 0
            lines.wait_for("stopped:", 5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert not list((queue_dir / "refused").iterdir())
        logged = first_run.all() + lines.all() + "".join(p.read_text() for p in logs.glob("*.log"))
        assert SECRET_NAME not in logged and not any(uid in logged for uid in sources)
        print(f"100 pushed, {len(acknowledged)} acknowledged and unscored at the kill, {stored_before} SRs before it; "
              f"{time.monotonic() - started:.1f} s")
