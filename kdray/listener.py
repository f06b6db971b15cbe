"""An AI node for pushed images: a DICOM C-STORE SCP that scores CR/DX instances and C-STOREs their SRs onward.

The way of one instance:

1. **Received** (:class:`Receiver`, pynetdicom): an association is accepted only from the configured calling AE
   titles and up to ``max_associations`` at a time; a C-STORE is refused with a status, and one log line with a
   reason code (never a UID or a header value), when its SOP class is not CR/DX storage, its Modality is not
   allowed, it is larger than ``limits.max_bytes`` (counted while it arrives: the association is aborted past
   the limit), or the queue is full.
2. **Queued** (:class:`InstanceQueue`): the dataset as received (with its File Meta Information) is written to
   ``incoming/``, fsynced, and renamed into ``queue/<SOP Instance UID>.dcm``; only then is success (0x0000)
   returned, so an acknowledged instance survives a crash. The same SOP Instance UID received twice is one file.
3. **Scored** (:class:`BatchScorer`): a worker thread takes up to ``batch_size`` instances (or fewer, once the
   oldest has waited ``max_wait_s``), decodes each with the bounded loader (:func:`kdray.images.load_image`),
   classifies them in one call and builds each one's SR (:func:`kdray.dicom_results.structured_report`).
4. **Stored** (:class:`Forwarder`): the batch's SRs go to the destination over one association. An instance
   whose SR the destination accepted is deleted from the queue (the node keeps no copy of patient images; the
   sender's PACS has them). One the decoder or the destination refused goes to ``refused/`` with a ``.reason``
   file. A destination that is away (or out of resources) leaves the batch queued, retried with backoff.

Exactly once at the destination: an instance re-scored after a crash (acknowledged, not yet deleted) makes the
same SR, whose UIDs derive from the source's and the model's (:func:`kdray.dicom_results.result_uids`), so the
PACS keeps one. On start, what a previous run left in ``queue/`` is scored first and ``incoming/`` (never
acknowledged) is emptied. :meth:`Listener.stop` (SIGTERM, SIGINT in ``jobs.listen``) stops accepting, lets
running associations end for a few seconds, finishes the batch in hand and returns. Grad-CAM overlays are not
built: SR only.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdray import KdrayError, first_line
from kdray.config import ImageLimits, ListenJobConfig

log = logging.getLogger(__name__)
progress = logging.getLogger("kdray.progress")

#: The SOP classes an AI node for chest radiographs scores: CR, DX for presentation, DX for processing.
XRAY_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (what dicom_results writes)
# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): what a sender sees when an instance is refused.
SUCCESS, SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES = 0x0000, 0x0122, 0xA700
DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA900, 0xC000
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
STOP_GRACE_S = 10.0  # how long running associations may go on after a stop, before they are aborted
RETRY_MAX_S = 30.0  # the longest wait between two attempts at a destination that is away
REASON_SUFFIX = ".reason"


class DestinationAway(KdrayError):
    """The destination refused the association or did not answer: the batch stays queued."""


def valid_uid(uid: str) -> bool:
    """A UID that may name a file: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


class InstanceQueue:
    """The on-disk queue under ``root``: ``incoming/`` (being written), ``queue/<SOP UID>.dcm`` (acknowledged, not
    yet stored onward) and ``refused/`` (with ``<name>.reason``). All three on one file system, so that a rename
    is atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming, self.queue, self.refused = self.root / "incoming", self.root / "queue", self.root / "refused"
        for folder in (self.incoming, self.queue, self.refused):
            folder.mkdir(parents=True, exist_ok=True)
        self.arrived = threading.Event()  # set on every put: a waiting worker looks again

    def clear_incoming(self) -> int:
        """Remove what a crash left half-written (never acknowledged: its sender still has it)."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def put(self, sop_uid: str, data: bytes) -> Path:
        """Write ``data`` durably as ``queue/<sop_uid>.dcm`` (fsync, atomic rename, fsync of the folder)."""
        if not valid_uid(sop_uid):
            raise ValueError("not a valid UID")
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        final = self.queue / f"{sop_uid}.dcm"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, final)  # a second copy of the same instance replaces the first: one file
            _fsync_dir(self.queue)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self.arrived.set()
        return final

    def waiting(self) -> list[Path]:
        """The queued instances, oldest first."""
        entries = []
        for entry in os.scandir(self.queue):
            if entry.name.endswith(".dcm"):
                try:
                    entries.append((entry.stat().st_mtime_ns, entry.name))
                except FileNotFoundError:  # stored and deleted meanwhile
                    continue
        return [self.queue / name for _, name in sorted(entries)]

    def depth(self) -> int:
        return sum(1 for entry in os.scandir(self.queue) if entry.name.endswith(".dcm"))

    def done(self, path: Path) -> None:
        """Its SR is stored: the instance leaves the node."""
        path.unlink(missing_ok=True)

    def refuse(self, path: Path, reason: str) -> None:
        """Out of the queue into ``refused/``, with why (a reason code and a message without header values)."""
        target = self.refused / path.name
        (self.refused / f"{path.name}{REASON_SUFFIX}").write_text(reason + "\n")
        try:
            os.replace(path, target)
        except FileNotFoundError:
            pass


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quiet_libraries() -> None:
    """pynetdicom logs requests' identifiers at DEBUG and association details at INFO; highdicom logs each source's
    UIDs at INFO while it builds an SR. kdray's INFO records go to the job's log file, where neither belongs."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _printable(text: str) -> str:
    """A peer's AE title for a log line: printable ASCII only (a title is 16 characters at most)."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(text).strip())[:16]


class Receiver:
    """The C-STORE SCP: checks, then :meth:`InstanceQueue.put`, then success. ``start`` binds ``host:port``."""

    def __init__(self, cfg: ListenJobConfig, queue: InstanceQueue) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.cfg, self.queue = cfg, queue
        self.ae = AE(ae_title=cfg.ae_title)
        # Every storage SOP class is negotiated, so that a sender pushing a whole study (a CT, a report) gets a
        # per-instance refusal rather than a failed association; CR and DX in any transfer syntax (the loader
        # refuses what it cannot decode), the rest in the default ones.
        for context in AllStoragePresentationContexts:
            syntaxes = ALL_TRANSFER_SYNTAXES if context.abstract_syntax in XRAY_SOP_CLASSES else \
                context.transfer_syntax
            self.ae.add_supported_context(context.abstract_syntax, syntaxes)
        self.ae.require_calling_aet = list(cfg.accepted_calling_aes)
        self.ae.maximum_associations = cfg.max_associations
        self.ae.maximum_pdu_size = cfg.max_pdu
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = cfg.network_timeout_s
        self._handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                          (evt.EVT_PDU_RECV, self._on_pdu)]
        self._received: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # association → bytes this message
        self._cut: weakref.WeakSet = weakref.WeakSet()  # associations aborted for an oversized message
        self._lock = threading.Lock()
        self.server = None
        self.refusals: dict[str, int] = {}

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def start(self) -> tuple[str, int]:
        quiet_libraries()
        self.server = self.ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=self._handlers)
        return self.address

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """No new associations; running ones may end by themselves for ``grace_s``, then they are aborted (an
        instance not yet acknowledged is the sender's to send again)."""
        if self.server is None:
            return
        self.server.shutdown()
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self.server = None

    def _refuse(self, event, reason: str, status: int) -> int:
        with self._lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
        log.warning("refused an instance from %s: %s (status 0x%04X)", _printable(event.assoc.requestor.ae_title),
                    reason, status)
        return status

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        title = str(requestor.ae_title).strip()
        reason = "calling_ae_not_accepted" if title not in self.cfg.accepted_calling_aes else "too_many_associations"
        with self._lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
        log.warning("refused an association from %s at %s: %s", _printable(title), requestor.address, reason)

    def _on_pdu(self, event) -> None:
        """Counts what a C-STORE's P-DATA brings while it arrives (pynetdicom keeps it in memory): past
        ``max_bytes`` the association is aborted, before more is held."""
        pdu = event.pdu
        if type(pdu).__name__ != "P_DATA_TF":
            return
        with self._lock:
            if event.assoc in self._cut:  # (PDUs already on their way when it was aborted)
                return
            total = self._received.get(event.assoc, 0) + sum(len(item.presentation_data_value)
                                                              for item in pdu.presentation_data_value_items)
            self._received[event.assoc] = total
            cut = total > self.cfg.limits.max_bytes + self.cfg.max_pdu  # (+ one PDU: the command set comes first)
            if cut:
                self._cut.add(event.assoc)
        if cut:
            self._refuse(event, "file_too_large", OUT_OF_RESOURCES)
            event.assoc.abort(block=False)  # (this runs in the association's own thread: it cannot wait for it)

    def _on_store(self, event) -> int:
        with self._lock:
            self._received.pop(event.assoc, None)  # the next message counts from zero
        try:
            return self._store(event)
        except Exception as exc:  # noqa: BLE001 - the sender gets a status, never a dropped association
            log.warning("refused an instance from %s: internal_error (%s; status 0x%04X)",
                        _printable(event.assoc.requestor.ae_title), type(exc).__name__, OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES

    def _store(self, event) -> int:
        request = event.request
        sop_class, sop_uid = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        if sop_class not in XRAY_SOP_CLASSES:
            return self._refuse(event, "unsupported_sop_class", SOP_CLASS_NOT_SUPPORTED)
        if not valid_uid(sop_uid):
            return self._refuse(event, "bad_uid", DOES_NOT_MATCH)
        data = event.encoded_dataset(include_meta=True)
        if len(data) > self.cfg.limits.max_bytes:
            return self._refuse(event, "file_too_large", OUT_OF_RESOURCES)
        status = self._check_header(event, data, sop_uid)
        if status is not None:
            return status
        if self.queue.depth() >= self.cfg.max_queued:
            return self._refuse(event, "queue_full", OUT_OF_RESOURCES)
        try:
            self.queue.put(sop_uid, data)
        except OSError as exc:
            log.error("cannot queue an instance (%s): refused, the sender keeps it", first_line(exc))
            return self._refuse(event, "io_error", OUT_OF_RESOURCES)
        return SUCCESS

    def _check_header(self, event, data: bytes, sop_uid: str) -> int | None:
        """Modality and SOP Instance UID from the dataset itself (only those elements are parsed)."""
        import io

        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 specific_tags=["Modality", "SOPInstanceUID"])
            modality, uid = str(ds.get("Modality", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
        except Exception:  # noqa: BLE001 - pydicom raises many types for what it cannot parse
            return self._refuse(event, "corrupt", CANNOT_UNDERSTAND)
        allowed = self.cfg.limits.modalities
        if allowed and modality.upper() not in {m.upper() for m in allowed}:
            return self._refuse(event, "wrong_modality", DOES_NOT_MATCH)
        if uid != sop_uid:
            return self._refuse(event, "uid_mismatch", DOES_NOT_MATCH)
        return None


@dataclass
class Outcome:
    """One queued instance after scoring: its SR, or why it has none."""

    path: Path
    report: object | None = None  # a pydicom Dataset
    reason: str = ""


class BatchScorer:
    """Decode (bounded), classify in one call, and build each instance's SR."""

    def __init__(self, predictor, model, limits: ImageLimits) -> None:
        self.predictor, self.model, self.limits = predictor, model, limits

    def score(self, paths: list[Path]) -> list[Outcome]:
        from kdray.dicom_results import Finding, NotADicomSource, SourceHeaderRefused, read_source, structured_report
        from kdray.images import ImageRefused, check_file_size, load_image

        outcomes, images, sources = [], [], []
        for path in paths:
            try:
                check_file_size(path.stat().st_size, self.limits)
                data = path.read_bytes()
                loaded = load_image(data, self.predictor.image_size, self.limits)
                source = read_source(data)
            except FileNotFoundError:
                continue  # (stored and deleted by a duplicate's batch: nothing to do)
            except (ImageRefused, NotADicomSource) as exc:
                outcomes.append(Outcome(path, reason=f"{exc.reason}: {first_line(exc)}"))
                continue
            outcomes.append(Outcome(path))
            images.append(loaded.pixels)
            sources.append(source)
        good = [o for o in outcomes if not o.reason]
        if not good:
            return outcomes
        p = self.predictor
        probs = np.asarray(p.probabilities(np.stack(images)), np.float32)
        suspect = p.covid_suspect(probs)
        for i, (outcome, source) in enumerate(zip(good, sources)):
            finding = Finding(tuple(p.classes), tuple(float(v) for v in probs[i]),
                              None if suspect is None else bool(suspect[i]), p.covid_threshold)
            try:
                outcome.report = structured_report(source, finding, self.model)
            except SourceHeaderRefused as exc:
                outcome.reason = f"{exc.reason}: {first_line(exc)}"
        return outcomes


class Forwarder:
    """C-STOREs SRs to ``AET@host:port`` as the node's AE title, one association per call."""

    def __init__(self, cfg: ListenJobConfig) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        self.called, self.host, self.port = ListenJobConfig.destination_of(cfg.destination)
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.add_requested_context(SR_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = cfg.network_timeout_s
        self.ae.connection_timeout = min(cfg.network_timeout_s, 10.0)

    def describe(self) -> str:
        return f"{self.called}@{self.host}:{self.port}"

    def send(self, reports: list) -> list[int | None]:
        """Each report's C-STORE status; None for one not answered (the association ended first). Raises
        :class:`DestinationAway` when no association could be made."""
        assoc = self.ae.associate(self.host, self.port, ae_title=self.called)
        if not assoc.is_established:
            raise DestinationAway(f"the destination {self.describe()} "
                                  f"{'rejected' if assoc.is_rejected else 'did not accept'} the association")
        statuses: list[int | None] = [None] * len(reports)
        try:
            for i, report in enumerate(reports):
                answer = assoc.send_c_store(report)
                if "Status" not in answer:  # no response: timed out, aborted
                    break
                statuses[i] = int(answer.Status)
        finally:
            if assoc.is_established:
                assoc.release()
        return statuses


def _stored(status: int) -> bool:
    """Success, or a warning (coercion 0xB000, elements discarded 0xB007, does not match 0xB006): stored."""
    return status == SUCCESS or 0xB000 <= status <= 0xBFFF or status == 0x0107


def _transient(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF  # out of resources: try again later


class Listener:
    """The node: :class:`Receiver` + :class:`InstanceQueue` + a worker thread (:class:`BatchScorer` then
    :class:`Forwarder`). ``predictor``/``model`` default to the config's model."""

    def __init__(self, cfg: ListenJobConfig, predictor=None, model=None) -> None:
        if not cfg.accepted_calling_aes:
            raise KdrayError("--accepted_calling_aes is empty: the node would refuse every sender")
        if ListenJobConfig.destination_of(cfg.destination) is None:
            raise KdrayError("--destination is required (where the SRs go, AET@host:port)")
        if predictor is None:
            from kdray.predictor import load_predictor

            predictor = load_predictor(cfg.model, backend=cfg.backend, threads=cfg.threads)
        if model is None:
            from kdray.shard_scorer import model_identity

            model = model_identity(cfg.model, predictor.model_id)
        self.cfg = cfg
        self.queue = InstanceQueue(cfg.queue_dir)
        self.receiver = Receiver(cfg, self.queue)
        self.scorer = BatchScorer(predictor, model, cfg.limits)
        self.forwarder = Forwarder(cfg)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.stored = self.refused = self.batches = 0

    def start(self) -> tuple[str, int]:
        quiet_libraries()
        left = self.queue.clear_incoming()
        if left:
            log.info("removed %d half-received instance(s) left by a previous run (never acknowledged)", left)
        depth = self.queue.depth()
        if depth:
            progress.info("%d instance(s) queued by a previous run: scoring them first", depth)
        address = self.receiver.start()
        self._worker = threading.Thread(target=self._work, name="kdray-listener-worker", daemon=True)
        self._worker.start()
        progress.info("listening as %s on %s:%d (accepting %s); SRs go to %s", self.cfg.ae_title, *address,
                      ", ".join(self.cfg.accepted_calling_aes), self.forwarder.describe())
        return address

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, let running associations end (``grace_s``), finish the batch in hand, return."""
        self.receiver.stop(grace_s)
        self._stop.set()
        self.queue.arrived.set()
        if self._worker is not None:
            self._worker.join()
        progress.info("stopped: %d SR(s) stored, %d instance(s) refused, %d still queued", self.stored,
                      self.refused, self.queue.depth())

    # -- the worker
    def _next_batch(self) -> list[Path]:
        """Up to batch_size of the oldest, once there are that many or the oldest has waited max_wait_s; [] when
        stopping."""
        while not self._stop.is_set():
            self.queue.arrived.clear()
            waiting = self.queue.waiting()
            if len(waiting) >= self.cfg.batch_size:
                return waiting[:self.cfg.batch_size]
            if waiting:
                try:
                    age = time.time() - waiting[0].stat().st_mtime
                except FileNotFoundError:
                    continue
                if age >= self.cfg.max_wait_s:
                    return waiting
                self.queue.arrived.wait(min(self.cfg.max_wait_s - age, 0.5))
            else:
                self.queue.arrived.wait(0.5)
        return []

    def _work(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                complete = self._process(batch)
            except DestinationAway as exc:
                log.warning("%s; %d instance(s) stay queued, next try in %.0f s", exc, len(batch), backoff)
                complete = False
            except Exception:  # noqa: BLE001 - the worker must outlive one bad batch; the instances stay queued
                log.exception("a batch failed; its instances stay queued")
                complete = False
            if complete:
                backoff = 1.0
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)

    def _process(self, batch: list[Path]) -> bool:
        """Score and store one batch; False when some of it must be tried again later."""
        outcomes = self.scorer.score(batch)
        for outcome in outcomes:
            if outcome.reason:
                self.queue.refuse(outcome.path, outcome.reason)
                self.refused += 1
                log.warning("an instance was not scored: %s", outcome.reason.partition(":")[0])
        scored = [o for o in outcomes if o.report is not None]
        complete, stored = True, 0
        if scored:
            statuses = self.forwarder.send([o.report for o in scored])
            for outcome, status in zip(scored, statuses):
                if status is None or _transient(status):
                    complete = False
                elif _stored(status):
                    self.queue.done(outcome.path)
                    stored += 1
                else:
                    self.queue.refuse(outcome.path, f"destination_refused: the destination answered 0x{status:04X}")
                    self.refused += 1
                    log.warning("the destination refused an SR (status 0x%04X)", status)
        self.stored += stored
        self.batches += 1
        progress.info("batch %d: %d instance(s), %d SR(s) stored, %d refused; %d queued", self.batches, len(batch),
                      stored, len(outcomes) - len(scored), self.queue.depth())
        return complete
