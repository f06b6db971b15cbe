"""The unit of scoring work: one shard of inputs read, checked, decoded, classified, written, and marked done.

:class:`ShardScorer` is what both engines run (:mod:`kdray.scoring_engines`): a Ray Data actor on a cluster,
a worker thread of the local engine otherwise. For each input of its shard it reads only what it should
(:mod:`kdray.inputs`: inside the plan's roots, bounded, a FIFO never opened), decodes it with the shared loader,
classifies the good ones with the shared :class:`kdray.predictor.Predictor`, and writes
``predictions/part-NNNNN.parquet`` and ``errors/part-NNNNN.parquet`` (each atomically), then, while the output's
lock still names its run, ``_done/part-NNNNN.json``: the shard's :class:`ShardResult`, the plan's fingerprint and
each part file's size and row count. A shard holding an ``io_error`` row gets no marker, so a re-run retries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from kdray import KdrayError, first_line, storage
from kdray.images import DICOM_IDENTIFIERS, IO_ERROR, OUTSIDE_ROOTS, ImageLimits, ImageRefused, load_image
from kdray.inputs import (failure_message, open_local, open_tar, read_failure_reason, read_location, tar_failure,
                          tar_members)
from kdray.predictor import load_predictor

log = logging.getLogger(__name__)
LOCK_FILE = "_lock.json"
PREDICTIONS_DIR, ERRORS_DIR, DONE_DIR = "predictions", "errors", "_done"
EXPLANATIONS_DIR = "explanations"
DICOM_DIR = "dicom"
EXPLAIN_CHUNK = 8  # images per Grad-CAM call


class ScoringAborted(KdrayError):
    """The job stopped: too many read failures in a row, or the output store cannot be written."""


@dataclass(frozen=True)
class ReadPolicy:
    """When per-input read failures (``io_error`` rows) stop the whole job, and how many bytes of one tar shard's
    members are read (the members after that are ``too_large`` rows). How long an unreachable S3 is retried is
    the storage layer's budget (``KDRAY_S3_RETRY_S``, :func:`kdray.storage.retrying`)."""

    max_consecutive_io_errors: int = 20
    max_tar_bytes: int = 16 * 2**30


@dataclass
class ShardResult:
    """What scoring one shard did; the driver totals these (``errors``: reason → count)."""

    shard: int
    inputs: int
    scored: int
    explained: int
    errors: dict[str, int] = field(default_factory=dict)
    io_errors: int = 0
    seconds: float = 0.0
    finished: float = 0.0  # when it was done (time.time())
    done: bool = False  # no io_error: its marker was written
    fatal: str = ""  # a condition that stops the job (S3 away, the store failing, another run took over)
    node: str = ""  # the Ray node, or local:<host>

    def marker(self) -> dict:
        """The fields a shard's ``_done`` marker records (``errors`` as JSON, as markers always held it)."""
        return {**asdict(self), "errors": json.dumps(self.errors)}

    @classmethod
    def from_marker(cls, marker: dict) -> "ShardResult":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in marker.items() if k in known}
        values["errors"] = json.loads(values.get("errors") or "{}")
        return cls(**values)

    @staticmethod
    def columns(results: list["ShardResult"]) -> dict[str, np.ndarray]:
        """Ray Data rows: one array per field (``errors`` as JSON)."""
        rows = [r.marker() for r in results]
        return {name: np.asarray([row[name] for row in rows]) for name in rows[0]}

    @classmethod
    def from_row(cls, row: dict) -> "ShardResult":
        return cls.from_marker(dict(row))


def _entry_uri(plan_base: str, entry: str) -> str:
    return storage.join(plan_base, entry) if plan_base else entry


class ShardScorer:
    """Ray Data actor: one shard in, its predictions and errors written, one summary row out.

    ``roots``: where inputs may be read (:func:`kdray.storage.within_roots`, checked again here, at the read).
    ``run_id``: the run that holds the output's lock; a marker is written only while the lock names it.
    ``fingerprint``: the plan's, recorded in each marker. ``dicom_store``: a DICOMweb root where the shard's
    DICOM results are also stored (STOW-RS) before its marker is written."""

    def __init__(self, model_uri: str, output_uri: str, backend: str = "auto", threads: int = 1,
                 batch_size: int = 32, limits: dict | None = None, policy: dict | None = None,
                 base: str = "", kind: str = "folder", explain: str = "none", roots: list[str] | tuple = (),
                 run_id: str = "", fingerprint: str = "", dicom_results: bool = False, dicom_store: str = ""):
        self.predictor = load_predictor(model_uri, backend=backend, threads=threads)
        self.dicom_model = model_identity(model_uri, self.predictor.model_id) if dicom_results or dicom_store \
            else None
        self.dicom_store = dicom_store
        self.explain = explain
        self.explainer = None
        if explain != "none":
            from kdray.explain import Explainer  # torch loads only for explanations

            self.explainer = Explainer.load(model_uri, threads=threads)
        self.out = storage.resolve(output_uri)
        self.batch_size, self.base, self.kind = batch_size, base, kind
        self.limits = ImageLimits(**(limits or {}))
        self.policy = ReadPolicy(**(policy or {}))
        self.roots, self.run_id, self.fingerprint = list(roots), run_id, fingerprint
        self.consecutive_io_errors = 0
        self._filesystems: dict[str, pafs.FileSystem] = {}  # one per scheme: an S3 client is costly to create
        self._pacs = self._store_session = None  # DICOMweb sessions, made on first use

    def __call__(self, batch: dict) -> dict:
        """The Ray Data face: a batch of shards in, one column per ShardResult field out."""
        results = [self.score(int(shard), list(entries)) for shard, entries in zip(batch["shard"], batch["entries"])]
        return ShardResult.columns(results)

    # -- reading
    def _inputs(self, entries: list[str]):
        """(name, read) for each input of the shard: ``read()`` returns its bytes or raises why not."""
        if self.kind == "dicomweb":  # entries: study/series/sop UIDs at the plan's PACS
            yield from self._pacs_inputs(entries)
            return
        for entry in entries:
            uri = _entry_uri(self.base, entry)
            if self.kind == "tar":
                yield from self._tar_inputs(uri)
            else:
                yield uri, lambda uri=uri: self._read(uri)

    def _pacs_inputs(self, entries: list[str]):
        from kdray import dicomweb

        endpoint = dicomweb.parse(self.base)
        if self._pacs is None:
            self._pacs = dicomweb.session()  # one per actor: at most one request in flight per scoring actor
        for entry in entries:
            yield (_instance_name(endpoint, entry),
                   lambda entry=entry: dicomweb.retrieve(endpoint, entry, self.limits.max_bytes, self._pacs))

    def _location(self, uri: str) -> storage.Location:
        """``uri`` resolved; on S3 with one filesystem per actor (creating an S3 client per file is costly)."""
        if not uri.startswith("s3://"):
            return storage.resolve(uri)
        if "s3" not in self._filesystems:
            self._filesystems["s3"] = storage.resolve(uri).fs
        return storage.Location(self._filesystems["s3"], uri[len("s3://"):].rstrip("/"), uri)

    def _inside(self, uri: str) -> str:
        """Where ``uri`` really is (:func:`kdray.storage.within_roots`), or ``outside_roots``."""
        real = storage.within_roots(uri, self.roots)
        if real is None:
            raise ImageRefused(OUTSIDE_ROOTS, "outside the input's own folder and --allowed_roots; not read")
        return real

    def _read(self, uri: str) -> bytes:
        return read_location(self._location(self._inside(uri)), self.limits)

    def _tar_inputs(self, tar_uri: str):
        """The members of one tar shard (:func:`tar_members`); a shard that cannot be opened is one row."""
        def open_shard():
            real = self._inside(tar_uri)
            if real.startswith("s3://"):
                loc = self._location(real)
                stream = loc.fs.open_input_stream(loc.path)
            else:
                stream = open_local(real)[0]
            try:
                return stream, open_tar(stream)
            except BaseException:
                stream.close()
                raise

        try:
            stream, tar = storage.retrying(open_shard, tar_uri, "reading")
        except storage.S3Unavailable:
            raise  # stops the job (_score_shard): S3 is away, not this shard
        except Exception as exc:  # noqa: BLE001 - tarfile's parser also raises ValueError & co. on bad headers
            yield tar_failure(tar_uri, exc)
            return
        with stream, tar:
            yield from tar_members(tar, tar_uri, self.limits, self.policy.max_tar_bytes)

    # -- one shard
    def score(self, shard: int, entries: list[str]) -> ShardResult:
        """Score and write one shard. A fatal condition comes back as the result's ``fatal`` message rather than
        an exception: the driver then stops the job cleanly, and Ray Data releases this actor (an exception raised
        here left the actor holding its CPU in the driver's Ray)."""
        started = time.time()
        try:
            return self._score_and_write(shard, entries, started)
        except (ScoringAborted, storage.S3Unavailable) as exc:
            return ShardResult(shard, 0, 0, 0, {}, 0, time.time() - started, time.time(), False, str(exc), node_id())

    def _score_and_write(self, shard: int, entries: list[str], started: float) -> ShardResult:
        good_names, good_images, good_meta, errors, sources = [], [], [], [], []
        for name, read in self._inputs(entries):
            try:
                data = read()
                loaded = load_image(data, self.predictor.image_size, self.limits)
            except storage.S3Unavailable:
                raise  # S3 is away after the retry budget: the job stops, this input is not an io_error row
            except (OSError, KdrayError, tarfile.TarError) as exc:
                reason = read_failure_reason(exc)
                errors.append({"path": name, "reason": reason, "message": failure_message(exc)})
                self._count_read_failure(reason, name, errors[-1]["message"])
                continue
            self.consecutive_io_errors = 0
            good_names.append(name)
            good_images.append(loaded.pixels)
            good_meta.append(loaded)
            sources.append(_dicom_source(data) if self.dicom_model and loaded.format == "dicom" else None)
        name = f"part-{shard:05d}"
        predictions = self._predictions(good_names, good_images, good_meta, name, sources)
        parts = {"predictions": self._write(f"{PREDICTIONS_DIR}/{name}.parquet", predictions),
                 "errors": self._write(f"{ERRORS_DIR}/{name}.parquet", _errors_table(errors))}
        io_errors = sum(1 for e in errors if e["reason"] == IO_ERROR)
        explained = predictions.num_rows - predictions.column("explanation").null_count \
            if "explanation" in predictions.column_names else 0
        result = ShardResult(shard, len(good_names) + len(errors), len(good_names), explained,
                             dict(Counter(e["reason"] for e in errors)), io_errors, time.time() - started,
                             time.time(), io_errors == 0, "", node_id())
        if result.done:  # a shard with io_error rows stays undone: a re-run retries it
            self._check_lock(shard)
            marker = {**result.marker(), "fingerprint": self.fingerprint, "run": self.run_id, "parts": parts}
            loc = self.out.join(DONE_DIR, f"{name}.json")
            self._write_or_abort(loc, lambda: storage.write_json(loc, marker))
        return result

    def _count_read_failure(self, reason: str, name: str, message: str) -> None:
        """Many transient failures in a row stop the job (the store is likely failing); terminal reasons, such as
        a manifest full of missing paths, do not."""
        if reason != IO_ERROR:
            self.consecutive_io_errors = 0
            return
        self.consecutive_io_errors += 1
        if self.consecutive_io_errors >= self.policy.max_consecutive_io_errors:
            raise ScoringAborted(f"{self.consecutive_io_errors} reads failed in a row (last: {name}: {message}); "
                                 "stopping. Re-run the same command to resume")

    def _check_lock(self, shard: int) -> None:
        """Fencing: a shard is marked done only while the output's lock names this run."""
        if not self.run_id:
            return
        loc = self.out.join(LOCK_FILE)
        holder = self._write_or_abort(loc, lambda: storage.read_lock(loc)) or {}  # (a failing store stops the job)
        if holder.get("run") != self.run_id:
            raise ScoringAborted(f"another run took over {self.out.uri} (its lock names run {holder.get('run')}); "
                                 f"this run stops without marking shard {shard} done")

    def _predictions(self, names: list[str], images: list[np.ndarray], loaded: list, part: str,
                     sources: list) -> pa.Table:
        p = self.predictor
        probs = np.zeros((0, len(p.classes)), np.float32)
        if images:
            stacked = np.stack(images)
            probs = np.concatenate([p.probabilities(stacked[i:i + self.batch_size])
                                    for i in range(0, len(stacked), self.batch_size)]).astype(np.float32)
        columns = {"path": pa.array(names, pa.string()),
                   "label": pa.array([p.classes[i] for i in probs.argmax(1)] if len(probs) else [], pa.string())}
        for k, cls in enumerate(p.classes):
            columns[f"p_{cls}"] = pa.array(probs[:, k], pa.float32())
        suspect = p.covid_suspect(probs)
        columns["covid_suspect"] = pa.nulls(len(names), pa.bool_()) if suspect is None else pa.array(suspect)
        columns["model_id"] = pa.array([p.model_id] * len(names), pa.string())
        columns["backend"] = pa.array([p.backend] * len(names), pa.string())
        columns["format"] = pa.array([m.format for m in loaded], pa.string())
        columns["width"] = pa.array([m.width for m in loaded], pa.int32())
        columns["height"] = pa.array([m.height for m in loaded], pa.int32())
        for tag, column in DICOM_IDENTIFIERS.items():
            columns[column] = pa.array([m.dicom.get(tag) for m in loaded], pa.string())
        overlays: dict[int, bytes] = {}
        if self.explainer is not None:
            columns.update(self._explain(names, images, probs, suspect, part, overlays))
        if self.dicom_model is not None:
            columns.update(self._dicom_results(probs, suspect, sources, overlays, part))
        return pa.table(columns)

    def _dicom_results(self, probs: np.ndarray, suspect, sources: list, overlays: dict[int, bytes], part: str) -> dict:
        """Each DICOM row's SR (and overlay Secondary Capture), written before the shard's predictions under
        names from their own UIDs (a re-run rewrites the same files). Columns ``dicom_sr`` and ``dicom_overlay``:
        paths relative to the output; null for a row that is not DICOM or not explained. With ``dicom_store``,
        the same objects also go to the PACS, all stored or the job stops (no marker: a re-run stores them again)."""
        from kdray.dicom_results import Finding, SourceHeaderRefused, overlay_capture, overlay_rgb, structured_report

        p = self.predictor
        srs: list[str | None] = [None] * len(sources)
        captures: list[str | None] = [None] * len(sources)
        written: list[bytes] = []
        for i, source in enumerate(sources):
            if source is None:
                continue
            finding = Finding(tuple(p.classes), tuple(float(v) for v in probs[i]),
                              None if suspect is None else bool(suspect[i]), p.covid_threshold)
            try:
                report = structured_report(source, finding, self.dicom_model)
                capture = overlay_capture(source, overlay_rgb(overlays[i]), self.dicom_model) if i in overlays \
                    else None
            except SourceHeaderRefused as exc:  # the row keeps its prediction; its message holds no value
                log.warning("no DICOM result for one input (%s): %s", exc.reason, exc)
                continue
            srs[i] = self._write_dicom(part, report, written)
            if capture is not None:
                captures[i] = self._write_dicom(part, capture, written)
        if self.dicom_store and written:
            self._store(written)
        return {"dicom_sr": pa.array(srs, pa.string()), "dicom_overlay": pa.array(captures, pa.string())}

    def _write_dicom(self, part: str, ds, written: list[bytes]) -> str:
        from kdray.dicom_results import to_bytes

        relative = f"{DICOM_DIR}/{part}/{ds.SOPInstanceUID}.dcm"
        loc = self.out.join(*relative.split("/"))
        data = to_bytes(ds)
        self._write_or_abort(loc, lambda: storage.write_bytes(loc, data))
        written.append(data)
        return relative

    def _store(self, objects: list[bytes]) -> None:
        from kdray import dicomweb

        if self._store_session is None:
            self._store_session = dicomweb.session()
        try:
            dicomweb.store(dicomweb.parse_store(self.dicom_store), objects, self._store_session)
        except (OSError, KdrayError) as exc:
            raise ScoringAborted(f"cannot store DICOM results in the PACS: {first_line(exc)}; re-run the same "
                                 "command to resume") from None

    def _explain(self, names: list[str], images: list[np.ndarray], probs: np.ndarray, suspect, part: str,
                 overlays: dict[int, bytes]) -> dict:
        """Grad-CAM overlays of the chosen rows, written before the shard's predictions (a re-run rewrites the
        same names). Columns: ``explanation`` (the overlay's path relative to the output; null = not
        explained) and ``explanation_torch_class`` (the torch weights' own top class; the map explains
        ``label``)."""
        paths: list[str | None] = [None] * len(names)
        torch_classes: list[str | None] = [None] * len(names)
        from kdray.explain import should_explain

        chosen = np.flatnonzero(should_explain(self.explain, suspect, len(names)))
        for start in range(0, len(chosen), EXPLAIN_CHUNK):
            rows = chosen[start:start + EXPLAIN_CHUNK]
            explanations = self.explainer.explain(np.stack([images[i] for i in rows]), probs[rows].argmax(1))
            for i, explanation in zip(rows, explanations):
                relative = explanation_path(part, names[i])
                loc = self.out.join(*relative.split("/"))
                self._write_or_abort(loc, lambda: storage.write_bytes(loc, explanation.overlay_png))
                paths[i], torch_classes[i] = relative, explanation.torch_class
                overlays[i] = explanation.overlay_png
        return {"explanation": pa.array(paths, pa.string()),
                "explanation_torch_class": pa.array(torch_classes, pa.string())}

    def _write(self, relative: str, table: pa.Table) -> dict:
        """One part file; returns what its shard's marker records of it."""
        loc = self.out.join(*relative.split("/"))
        size = self._write_or_abort(loc, lambda: storage.write_parquet(loc, table))
        return {"file": relative, "bytes": size, "rows": table.num_rows}

    def _write_or_abort(self, loc: storage.Location, write):
        """``write()`` (the storage layer retries an unreachable S3); an output store that still fails stops the
        job cleanly."""
        try:
            return write()
        except storage.S3Unavailable:
            raise
        except (OSError, KdrayError) as exc:
            raise ScoringAborted(f"cannot write {loc.uri}: {first_line(exc)}") from None


def _instance_name(endpoint, entry: str) -> str:
    """A PACS row's ``path``: the instance's WADO-RS URL (no credentials: they are never in the URI)."""
    try:
        return endpoint.instance_url(entry)
    except ImageRefused:
        return f"{endpoint.base}/{entry[:200]}"


def model_identity(model_uri: str, model_id: str):
    """The :class:`kdray.dicom_results.ModelIdentity` of what scores: the export's card, else the model id."""
    from kdray.dicom_results import ModelIdentity
    from kdray.predictor import is_export, read_model_card

    if is_export(model_uri):
        card = read_model_card(model_uri)
        return ModelIdentity.of(card.name, card.version, model_id)
    return ModelIdentity.of("kdray-student", model_id, model_id)


def _dicom_source(data: bytes):
    """The header of a DICOM row for its results; None (no DICOM result, a warning without values) when it lacks
    what a result must refer to."""
    from kdray.dicom_results import NotADicomSource, read_source

    try:
        return read_source(data)
    except NotADicomSource as exc:
        log.warning("no DICOM result for one input (%s): %s", exc.reason, exc)
        return None


def node_id() -> str:
    """The Ray node this actor runs on (kept in each shard's marker: where it was scored)."""
    ray = sys.modules.get("ray")  # (the local engine never imports Ray)
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return f"local:{socket.gethostname()}"


def explanation_path(part: str, name: str) -> str:
    """Where a row's overlay goes, relative to the output: the shard's folder and a hash of the input's name
    (the prediction row's ``path``), so that the names are stable across re-runs and never collide."""
    return f"{EXPLANATIONS_DIR}/{part}/{hashlib.sha256(name.encode()).hexdigest()[:20]}.png"


def _errors_table(errors: list[dict]) -> pa.Table:
    return pa.table({"path": pa.array([e["path"] for e in errors], pa.string()),
                     "reason": pa.array([e["reason"] for e in errors], pa.string()),
                     "message": pa.array([e["message"] for e in errors], pa.string())})
