"""Offline scoring of image archives with Ray Data: streaming, resumable, exactly once.

Inputs (``--input``):

- a folder or ``s3://`` prefix, recursive: every file is scored or listed in ``errors/``, judged by
  its content (:mod:`kdray.images`), not its extension. Hidden files (a name, or a folder on the way,
  starting with ``.``) are skipped and counted. A local folder is walked by :func:`kdray.storage.walk_local`:
  each real folder once (a link loop adds nothing), links followed only inside the roots, and what cannot be
  read is listed so that it gets its row (a link out, a broken link, a FIFO, a device);
- a manifest: a ``.csv`` or ``.parquet`` file with a ``path`` column (absolute URIs, or paths
  relative to the manifest's folder). A path named twice is scored once, and the summary says so;
- ``.tar`` shards in the WebDataset layout (a ``.tar`` file, or a folder holding only ``.tar``
  files): every image member is an input, named ``<tar URI>#<member>``; members with a metadata
  extension (``.json``, ``.txt``, ``.cls``, …) are skipped and counted. Members are streamed one at a time,
  and only a regular member within the byte limits is read (:func:`tar_members`).

Reading only what it should. A job reads inside its roots only: the input folder (or S3 prefix), the manifest's
folder (or prefix), and ``--allowed_roots``. Each input is resolved canonically (relative rows joined to the
manifest's folder, ``file://`` dropped, local paths through every link, S3 keys normalised and ``..`` refused;
:func:`kdray.storage.within_roots`), at planning and again where the read happens, so that a link swapped in
later is caught too. An input outside is an ``outside_roots`` row and is never opened. A local input is opened
without blocking and checked before any read: what is not a regular file is ``not_a_file``, and a read never
takes more than the byte limit (+1).

How it runs. The driver lists the inputs once and fixes them, in order, into shards of
``shard_size`` inputs (by default :func:`auto_shard_size`; ``plan.json`` + ``inputs.parquet``; a tar file is one shard). Ray Data streams
the shards through a pool of :class:`ShardScorer` actors; each actor reads, checks and decodes its
shard's images, classifies them with the shared :class:`kdray.predictor.Predictor`, and writes
``predictions/part-NNNNN.parquet`` and ``errors/part-NNNNN.parquet`` under fixed names (each file
atomically), then ``_done/part-NNNNN.json``. Nothing is materialised; results are written as they
are produced.

One run per output. ``score_archive`` takes the output's lock (``_lock.json``, :class:`kdray.storage.OutputLock`)
before it writes or deletes anything there, ``--overwrite`` included, and a second live run is refused with one
line naming the holder. A holder whose process on this host is gone (``kill -9``) is taken over at once, one on
another host once its heartbeat is older than the TTL. Each actor checks that the lock still names its run before
it writes a shard's marker (fencing): a run that was taken over stops instead of mixing its files in.

Exactly once, and resumable. Killed at any moment, the same command run again skips every shard
with a valid ``_done`` marker and scores the others again, overwriting their files, so every input ends
up exactly once in ``predictions`` ∪ ``errors``. A marker counts only when it records this plan's fingerprint and
its part files are there with the sizes it records; any other is removed and its shard redone. Reasons are
terminal (the input counts as done: ``missing``, ``forbidden``, ``outside_roots``, ``not_a_file``,
``sparse_member``, and the decoder's) except ``io_error``, a transient read failure (an S3 5xx or timeout after
the retries, EIO, ESTALE…): a shard holding one gets no marker, so a re-run retries it. ``summary.json`` is
written last and marks the run finished; it is removed before a re-run writes anything.

S3 outages. Every read and write goes through :mod:`kdray.storage`, which retries an S3 that cannot be
reached (or answers 5xx/SlowDown) with backoff for ``KDRAY_S3_RETRY_S`` seconds (default 120). If S3
is still away after that, the job stops with one line (:class:`kdray.storage.S3Unavailable`): the
shard in progress gets no marker and there is no ``summary.json``; once S3 is back, the same command
resumes. Many ``io_error`` reads in a row, or an output store that cannot be written, also stop the job
with a one-line error and no ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from kdray import KdrayError, storage
from kdray.explain import Explainer, should_explain
from kdray.images import IO_ERROR, OUTSIDE_ROOTS, ImageLimits, ImageRefused, load_image
from kdray.inputs import (failure_message, is_hidden, open_local, open_tar, read_failure_reason, read_location,
                          tar_failure, tar_members)
from kdray.predictor import Predictor, model_info
from kdray.raycluster import cluster_cpus, cluster_gpus, init_ray
from kdray.runner import root_cause

log = logging.getLogger(__name__)
progress_log = logging.getLogger("kdray.progress")

SUMMARY_FILE, PLAN_FILE, INPUTS_FILE, LOCK_FILE = "summary.json", "plan.json", "inputs.parquet", "_lock.json"
PREDICTIONS_DIR, ERRORS_DIR, DONE_DIR = "predictions", "errors", "_done"
EXPLANATIONS_DIR = "explanations"
EXPLAIN_CHUNK = 8  # images per Grad-CAM call
MANIFEST_SUFFIXES = (".csv", ".parquet")
MIN_AUTO_SHARD, MAX_AUTO_SHARD = 32, 256
DICOM_FIELDS = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid", "SOPInstanceUID": "sop_uid",
                "Modality": "modality", "BodyPartExamined": "body_part", "ViewPosition": "view_position"}


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
class Plan:
    """The fixed shape of one scoring run: what is scored, in which shards."""

    input: str
    model: str
    kind: str  # folder | manifest | tar
    base: str  # URI that shard entries are relative to ("" when entries are absolute URIs)
    shard_size: int
    shards: list[list[str]]  # entries per shard: paths relative to base, or tar URIs (one per shard)
    images: int | None  # None for tar input (members are counted as they are read)
    hidden_skipped: int = 0
    duplicates: int = 0
    explain: str = "none"  # which rows get a Grad-CAM overlay (kdray.explain.EXPLAIN_MODES)
    roots: list[str] = field(default_factory=list)  # where inputs may be read: the input's own root, then --
    allowed_roots: list[str] = field(default_factory=list)  # allowed_roots (both as storage.root_of makes them)
    outside_roots: int = 0  # manifest rows outside the roots at planning (refused when read, never opened)

    def fingerprint(self) -> str:
        parts = [self.input, self.model, self.kind, self.shard_size, self.shards]
        if self.explain != "none":  # (runs without explanations keep the fingerprint they always had)
            parts.append(self.explain)
        if self.allowed_roots:  # (and so do runs without extra roots)
            parts.append(self.allowed_roots)
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- listing


def auto_shard_size(inputs: int) -> int:
    """About 16 shards for small archives (enough to keep every actor busy to the end; smaller shards cost more
    in per-shard writes than they gain), 256 inputs each for large ones. A function of the input count only,
    so that a re-run of the same command cuts the same shards."""
    return max(MIN_AUTO_SHARD, min(MAX_AUTO_SHARD, inputs // 16))


def _cut(entries: list[str], shard_size: int) -> tuple[int, list[list[str]]]:
    size = shard_size or auto_shard_size(len(entries))
    return size, [entries[i:i + size] for i in range(0, len(entries), size)]


def plan_inputs(input_uri: str, model_uri: str, shard_size: int = 0, allowed_roots: list[str] | tuple = ()) -> Plan:
    """List the inputs once and cut them into shards (deterministic: sorted paths or manifest order).
    ``shard_size`` 0 = :func:`auto_shard_size`. Inputs may be read inside the input's own root (the folder or
    prefix; a manifest's folder; a tar file itself) and ``allowed_roots``."""
    if shard_size < 0:
        raise KdrayError(f"shard_size must be >= 0 (0 = automatic), got {shard_size}")
    loc = storage.resolve(input_uri)
    extra = sorted({storage.root_of(r) for r in allowed_roots})
    kind = storage.info(loc).type
    if kind == pafs.FileType.File and loc.path.lower().endswith(MANIFEST_SUFFIXES):
        return _plan_manifest(loc, model_uri, shard_size, extra)
    roots = [storage.root_of(loc.uri), *extra]
    if kind == pafs.FileType.File and loc.path.lower().endswith(".tar"):
        return Plan(input_uri, model_uri, "tar", "", 1, [[loc.uri]], None, roots=roots, allowed_roots=extra)
    relative = storage.list_tree(loc, roots)  # a clear error for a missing folder or bucket
    visible = [r for r in relative if not is_hidden(r)]
    hidden = len(relative) - len(visible)
    if not visible:
        raise KdrayError(f"{input_uri}: no files to score" + (f" ({hidden} hidden files skipped)" if hidden else ""))
    if all(r.lower().endswith(".tar") for r in visible):
        return Plan(input_uri, model_uri, "tar", loc.uri, 1, [[r] for r in visible], None, hidden, roots=roots,
                    allowed_roots=extra)
    size, shards = _cut(visible, shard_size)
    return Plan(input_uri, model_uri, "folder", loc.uri, size, shards, len(visible), hidden, roots=roots,
                allowed_roots=extra)


def _plan_manifest(loc: storage.Location, model_uri: str, shard_size: int, extra: list[str]) -> Plan:
    table = _read_manifest(loc)
    if "path" not in table.column_names:
        raise KdrayError(f"{loc.uri}: a scoring manifest needs a 'path' column (has {', '.join(table.column_names)})")
    base = loc.uri.rsplit("/", 1)[0] if "/" in loc.uri else "."
    roots = [storage.root_of(base), *extra]
    seen, entries = set(), []
    rows = [str(raw).strip() for raw in table["path"].to_pylist() if raw is not None and str(raw).strip()]
    for path in rows:
        uri = storage.canonical_uri(path if "://" in path or path.startswith("/") else storage.join(base, path))
        if uri not in seen:
            seen.add(uri)
            entries.append(uri)
    duplicates = len(rows) - len(entries)
    if not entries:
        raise KdrayError(f"{loc.uri}: the manifest names no files")
    if duplicates:
        log.warning("%s names %d path(s) more than once; each is scored once", loc.uri, duplicates)
    outside = sum(1 for uri in entries if storage.within_roots(uri, roots) is None)
    if outside:
        log.warning("%s names %d path(s) outside its own folder and --allowed_roots: they are listed as "
                    "outside_roots and never read", loc.uri, outside)
    size, shards = _cut(entries, shard_size)
    return Plan(loc.uri, model_uri, "manifest", "", size, shards, len(entries), 0, duplicates, roots=roots,
                allowed_roots=extra, outside_roots=outside)


def _read_manifest(loc: storage.Location) -> pa.Table:
    import pyarrow.csv as pacsv

    import pyarrow.parquet as pq

    data = storage.read_bytes(loc)
    try:
        if loc.path.lower().endswith(".parquet"):
            return pq.read_table(pa.BufferReader(data))
        return pacsv.read_csv(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise KdrayError(f"{loc.uri}: cannot read the manifest ({str(exc).splitlines()[0][:200]})") from None


def _entry_uri(plan_base: str, entry: str) -> str:
    return storage.join(plan_base, entry) if plan_base else entry


# ----------------------------------------------------------------------------- the actor


class ShardScorer:
    """Ray Data actor: one shard in, its predictions and errors written, one summary row out.

    ``roots``: where inputs may be read (:func:`kdray.storage.within_roots`, checked again here, at the read).
    ``run_id``: the run that holds the output's lock; a marker is written only while the lock names it.
    ``fingerprint``: the plan's, recorded in each marker."""

    def __init__(self, model_uri: str, output_uri: str, backend: str = "auto", threads: int = 1,
                 batch_size: int = 32, limits: dict | None = None, policy: dict | None = None,
                 base: str = "", kind: str = "folder", explain: str = "none", roots: list[str] | tuple = (),
                 run_id: str = "", fingerprint: str = ""):
        self.predictor = Predictor.load(model_uri, backend=backend, threads=threads)
        self.explain = explain
        self.explainer = Explainer.load(model_uri, threads=threads) if explain != "none" else None
        self.out = storage.resolve(output_uri)
        self.batch_size, self.base, self.kind = batch_size, base, kind
        self.limits = ImageLimits(**(limits or {}))
        self.policy = ReadPolicy(**(policy or {}))
        self.roots, self.run_id, self.fingerprint = list(roots), run_id, fingerprint
        self.consecutive_io_errors = 0
        self._filesystems: dict[str, pafs.FileSystem] = {}  # one per scheme: an S3 client is costly to create

    def __call__(self, batch: dict) -> dict:
        rows = [self._score_shard(int(shard), list(entries)) for shard, entries in zip(batch["shard"], batch["entries"])]
        return {key: np.asarray([row[key] for row in rows]) for key in rows[0]}

    # -- reading
    def _inputs(self, entries: list[str]):
        """(name, read) for each input of the shard: ``read()`` returns its bytes or raises why not."""
        for entry in entries:
            uri = _entry_uri(self.base, entry)
            if self.kind == "tar":
                yield from self._tar_inputs(uri)
            else:
                yield uri, lambda uri=uri: self._read(uri)

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
    def _score_shard(self, shard: int, entries: list[str]) -> dict:
        """Score and write one shard. A fatal condition comes back as the row's ``fatal`` message rather than an
        exception: the driver then stops the job cleanly, and Ray Data releases this actor (an exception raised
        here left the actor holding its CPU in the driver's Ray)."""
        started = time.time()
        try:
            return self._score_and_write(shard, entries, started)
        except (ScoringAborted, storage.S3Unavailable) as exc:
            return {"shard": shard, "inputs": 0, "scored": 0, "explained": 0, "errors": "{}", "io_errors": 0,
                    "seconds": time.time() - started, "finished": time.time(), "done": False, "fatal": str(exc),
                    "node": _node_id()}

    def _score_and_write(self, shard: int, entries: list[str], started: float) -> dict:
        good_names, good_images, good_meta, errors = [], [], [], []
        for name, read in self._inputs(entries):
            try:
                loaded = load_image(read(), self.predictor.image_size, self.limits)
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
        name = f"part-{shard:05d}"
        predictions = self._predictions(good_names, good_images, good_meta, name)
        parts = {"predictions": self._write(f"{PREDICTIONS_DIR}/{name}.parquet", predictions),
                 "errors": self._write(f"{ERRORS_DIR}/{name}.parquet", _errors_table(errors))}
        io_errors = sum(1 for e in errors if e["reason"] == IO_ERROR)
        reasons = Counter(e["reason"] for e in errors)
        explained = predictions.num_rows - predictions.column("explanation").null_count \
            if "explanation" in predictions.column_names else 0
        row = {"shard": shard, "inputs": len(good_names) + len(errors), "scored": len(good_names),
               "explained": explained,
               "errors": json.dumps(dict(reasons)), "io_errors": io_errors, "seconds": time.time() - started,
               "finished": time.time(), "done": io_errors == 0, "fatal": "", "node": _node_id()}
        if row["done"]:  # a shard with io_error rows stays undone: a re-run retries it
            self._check_lock(shard)
            marker = {**row, "fingerprint": self.fingerprint, "run": self.run_id, "parts": parts}
            loc = self.out.join(DONE_DIR, f"{name}.json")
            self._write_or_abort(loc, lambda: storage.write_json(loc, marker))
        return row

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

    def _predictions(self, names: list[str], images: list[np.ndarray], loaded: list, part: str) -> pa.Table:
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
        for tag, column in DICOM_FIELDS.items():
            columns[column] = pa.array([m.dicom.get(tag) for m in loaded], pa.string())
        if self.explainer is not None:
            columns.update(self._explain(names, images, probs, suspect, part))
        return pa.table(columns)

    def _explain(self, names: list[str], images: list[np.ndarray], probs: np.ndarray, suspect, part: str) -> dict:
        """Grad-CAM overlays of the chosen rows, written before the shard's predictions (a re-run rewrites the
        same names). Columns: ``explanation`` (the overlay's path relative to the output; null = not
        explained) and ``explanation_torch_class`` (the torch weights' own top class; the map explains
        ``label``)."""
        paths: list[str | None] = [None] * len(names)
        torch_classes: list[str | None] = [None] * len(names)
        chosen = np.flatnonzero(should_explain(self.explain, suspect, len(names)))
        for start in range(0, len(chosen), EXPLAIN_CHUNK):
            rows = chosen[start:start + EXPLAIN_CHUNK]
            explanations = self.explainer.explain(np.stack([images[i] for i in rows]), probs[rows].argmax(1))
            for i, explanation in zip(rows, explanations):
                relative = explanation_path(part, names[i])
                loc = self.out.join(*relative.split("/"))
                self._write_or_abort(loc, lambda: storage.write_bytes(loc, explanation.overlay_png))
                paths[i], torch_classes[i] = relative, explanation.torch_class
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
            raise ScoringAborted(f"cannot write {loc.uri}: {str(exc).splitlines()[0][:200]}") from None


def _node_id() -> str:
    """The Ray node this actor runs on (kept in each shard's marker: where it was scored)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def explanation_path(part: str, name: str) -> str:
    """Where a row's overlay goes, relative to the output: the shard's folder and a hash of the input's name
    (the prediction row's ``path``), so that the names are stable across re-runs and never collide."""
    return f"{EXPLANATIONS_DIR}/{part}/{hashlib.sha256(name.encode()).hexdigest()[:20]}.png"


def _errors_table(errors: list[dict]) -> pa.Table:
    return pa.table({"path": pa.array([e["path"] for e in errors], pa.string()),
                     "reason": pa.array([e["reason"] for e in errors], pa.string()),
                     "message": pa.array([e["message"] for e in errors], pa.string())})


# ----------------------------------------------------------------------------- the driver


def _prepare_output(plan: Plan, out: storage.Location, overwrite: bool) -> set[int]:
    """Fix or check the run's plan; return the shards already done. Removes the finished marker first."""
    summary = out.join(SUMMARY_FILE)
    if storage.exists(summary) and not overwrite:
        raise KdrayError(f"{out.uri} already holds a finished scoring run; choose another --output "
                         "or pass --overwrite true")
    if overwrite:
        for sub in (SUMMARY_FILE, PLAN_FILE, INPUTS_FILE):
            storage.delete_file(out.join(sub))
        for sub in (PREDICTIONS_DIR, ERRORS_DIR, DONE_DIR, EXPLANATIONS_DIR):
            storage.delete_dir(out.join(sub))
    storage.makedirs(out)
    plan_loc = out.join(PLAN_FILE)
    fingerprint = plan.fingerprint()
    if storage.exists(plan_loc):
        stored = storage.read_json(plan_loc)
        if stored.get("fingerprint") != fingerprint:
            raise KdrayError(f"{out.uri} holds an unfinished scoring run of other inputs or another model "
                             f"({stored.get('input')}, {stored.get('model')}); re-run that command to finish it, "
                             "or pass --overwrite true to start again")
        _remove_stale_temporaries(out)
        return set(valid_markers(out, fingerprint))
    storage.write_parquet(out.join(INPUTS_FILE), pa.table({
        "shard": pa.array([i for i, s in enumerate(plan.shards) for _ in s], pa.int32()),
        "entry": pa.array([e for s in plan.shards for e in s], pa.string())}))
    storage.write_json(plan_loc, {"fingerprint": fingerprint, "input": plan.input, "model": plan.model,
                                  "kind": plan.kind, "base": plan.base, "shard_size": plan.shard_size,
                                  "shards": len(plan.shards), "images": plan.images, "roots": plan.roots})
    return set()


def valid_markers(out: storage.Location, fingerprint: str) -> dict[int, dict]:
    """Shard → its ``_done`` marker, for the markers that still hold: written for this plan (``fingerprint``), and
    every part file they record is there with the size recorded. Any other marker is removed, so that its shard
    is scored again (a part file deleted or replaced since, a marker from another plan or an older kdray)."""
    done_dir = out.join(DONE_DIR)
    if storage.info(done_dir).type == pafs.FileType.NotFound:
        return {}
    sizes = {}
    for sub in (PREDICTIONS_DIR, ERRORS_DIR):
        if storage.info(out.join(sub)).type == pafs.FileType.Directory:
            sizes.update({f"{sub}/{f.base_name}": f.size for f in storage.list_files(out.join(sub))})
    markers = {}
    for f in storage.list_files(done_dir):
        if not (f.base_name.startswith("part-") and f.base_name.endswith(".json")):
            continue
        loc = storage.Location(out.fs, f.path, storage.join(out.uri, DONE_DIR, f.base_name))
        try:
            marker = storage.read_json(loc)
            parts = marker.get("parts") or {}
            holds = (marker.get("fingerprint") == fingerprint and {"predictions", "errors"} <= set(parts)
                     and all(sizes.get(part.get("file")) == part.get("bytes") for part in parts.values()))
        except (ValueError, AttributeError, TypeError):  # not a marker this code wrote
            holds = False
        if holds:
            markers[int(f.base_name[len("part-"):-len(".json")])] = marker
            continue
        log.warning("%s does not match its part files or this plan; its shard is scored again", loc.uri)
        storage.delete_file(loc)
    return markers


def _remove_stale_temporaries(out: storage.Location) -> None:
    """Half-written files of a killed attempt (local outputs only; S3 uploads appear whole or not at all): in the
    output folder itself (the plan's, the summary's) and below it. The lock's own are the lock's to remove
    (:class:`kdray.storage.OutputLock`): its heartbeat may be writing one now."""
    if out.is_s3:
        return
    stale = [entry.path for entry in os.scandir(out.path) if entry.is_file(follow_symlinks=False)
             and entry.name.startswith(".tmp-") and not entry.name.endswith(f"-{LOCK_FILE}")]
    for sub in (PREDICTIONS_DIR, ERRORS_DIR, DONE_DIR, EXPLANATIONS_DIR):
        folder = out.join(sub)
        if storage.info(folder).type == pafs.FileType.Directory:
            stale += [f.path for f in storage.list_files(folder) if f.base_name.startswith(".tmp-")]
    for path in stale:
        storage.delete_file(storage.Location(out.fs, path, path))


def scoring_pool(use_gpu: bool, shards: int | None = None):
    """(compute, per-actor resources, threads): one single-threaded scorer per CPU, each asking for half a
    CPU so that Ray Data's own tasks are never starved (docs/architecture.md); a GPU each where there are GPUs.
    The pool has its full size from the start (no ramp-up), but never more actors than shards."""
    from ray.data import ActorPoolStrategy

    gpus = int(cluster_gpus())
    if use_gpu and gpus:
        size = max(1, min(gpus, shards or gpus))
        return ActorPoolStrategy(size=size), {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = max(1, int(cluster_cpus()))
    size = max(1, min(cpus, shards or cpus))
    return ActorPoolStrategy(size=size), {"num_cpus": 0.5}, 1


class _Progress:
    def __init__(self, total: int | None, shards: int, every_s: float = 5.0):
        self.total, self.shards, self.every_s = total, shards, every_s
        self.started = self.last = time.time()
        self.images = self.done_shards = 0

    def update(self, inputs: int) -> None:
        self.images += inputs
        self.done_shards += 1
        now = time.time()
        if now - self.last < self.every_s and self.done_shards < self.shards:
            return
        self.last = now
        rate = self.images / max(now - self.started, 1e-9)
        if self.total:
            eta = (self.total - self.images) / rate if rate else float("nan")
            progress_log.info("scored %d/%d images (%.0f%%), %.1f img/s, ETA %.0f s", self.images, self.total,
                              100 * self.images / self.total, rate, eta)
        else:
            progress_log.info("scored %d images, shard %d/%d, %.1f img/s", self.images, self.done_shards,
                              self.shards, rate)


def score_archive(model_uri: str, input_uri: str, output_uri: str, backend: str = "auto", batch_size: int = 32,
                  overwrite: bool = False, shard_size: int = 0, limits: ImageLimits | None = None,
                  policy: ReadPolicy | None = None, use_gpu: bool = True, explain: str = "none",
                  allowed_roots: list[str] | tuple = (), lock_ttl_s: float = storage.LOCK_TTL_S,
                  lock_heartbeat_s: float = storage.LOCK_HEARTBEAT_S) -> dict:
    """Score every input under ``input_uri``; resumable (see the module docstring). Returns the summary.

    ``allowed_roots``: folders or S3 prefixes that inputs may be read from besides the input's own. The output is
    held for this run (:class:`kdray.storage.OutputLock`, with ``lock_ttl_s`` and ``lock_heartbeat_s``) from
    before anything in it is written or deleted until the run ends."""
    info = model_info(model_uri, backend)
    plan = plan_inputs(input_uri, model_uri, shard_size, allowed_roots)
    plan.explain = explain
    if explain != "none":
        should_explain(explain, None, 0)  # a valid mode
        Explainer.load(model_uri)  # fail now, not in every actor, when the model cannot be explained
    out = storage.resolve(output_uri)
    with storage.OutputLock(out.join(LOCK_FILE), lock_ttl_s, lock_heartbeat_s, what="scoring run") as lock:
        done = _prepare_output(plan, out, overwrite)
        rows, elapsed, info = _score_shards(plan, out, done, info, lock, backend, batch_size, limits, policy,
                                            use_gpu)
        if not lock.holds():
            raise ScoringAborted(f"another run took over {out.uri} while this one ran; this run stops without "
                                 "writing its summary")
        return _finish(plan, out, info.backend, model_uri, rows, elapsed, len(done))


def _score_shards(plan: Plan, out: storage.Location, done: set[int], info, lock: storage.OutputLock, backend: str,
                  batch_size: int, limits: ImageLimits | None, policy: ReadPolicy | None, use_gpu: bool):
    """Stream the shards not yet done through the actor pool; returns (rows, seconds, model info)."""
    import ray

    todo = [i for i in range(len(plan.shards)) if i not in done]
    init_ray()
    on_gpu = use_gpu and cluster_gpus() > 0
    chosen_backend = "torch" if on_gpu else backend  # onnxruntime-gpu cannot sit beside onnxruntime
    if on_gpu:
        info = model_info(plan.model, "torch")
    total = None if plan.images is None else sum(len(plan.shards[i]) for i in todo)
    log.info("scoring %s with %s (%s): %d shard(s) to do, %d already done", plan.input, plan.model, info.backend,
             len(todo), len(done))
    started = time.time()
    rows: list[dict] = []
    if todo:
        compute, resources, threads = scoring_pool(on_gpu, len(todo))
        ds = ray.data.from_items([{"shard": i, "entries": plan.shards[i]} for i in todo],
                                 override_num_blocks=len(todo))
        scored = ds.map_batches(ShardScorer, batch_size=1, batch_format="numpy", compute=compute,
                                fn_constructor_kwargs={"model_uri": plan.model, "output_uri": out.uri,
                                                       "backend": chosen_backend, "threads": threads,
                                                       "batch_size": batch_size,
                                                       "limits": dataclasses.asdict(limits or ImageLimits()),
                                                       "policy": dataclasses.asdict(policy or ReadPolicy()),
                                                       "base": plan.base, "kind": plan.kind,
                                                       "explain": plan.explain, "roots": plan.roots,
                                                       "run_id": lock.run_id, "fingerprint": plan.fingerprint()},
                                **resources)
        progress = _Progress(total, len(todo))
        fatal = ""
        try:
            for row in scored.iter_rows():
                if row["fatal"]:
                    fatal = str(row["fatal"])
                    break  # stops the dataset; the actors are released
                rows.append(row)
                progress.update(int(row["inputs"]))
        except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's error; show its root cause in one line
            raise KdrayError(root_cause(exc)) from None
        if fatal:
            raise ScoringAborted(fatal)
    undone = [r for r in rows if not r["done"]]
    if undone:
        io_errors = sum(int(r["io_errors"]) for r in undone)
        raise KdrayError(f"{io_errors} input(s) in {len(undone)} shard(s) could not be read (io_error, after "
                         f"retries); their shards stay unfinished. Re-run the same command to retry them")
    return rows, time.time() - started, info


def _finish(plan: Plan, out: storage.Location, backend: str, model_uri: str, rows: list[dict], elapsed: float,
            resumed: int) -> dict:
    """Totals over every shard's marker (this attempt's and earlier ones'), then ``summary.json``, last.

    Every shard is done, so a temporary file left now is one that a worker lost with its node (or process)
    never renamed: it is removed before the run is called finished. Only markers whose part files match them
    count (:func:`valid_markers`); a shard without one is not finished, and neither is the run."""
    _remove_stale_temporaries(out)
    markers = list(valid_markers(out, plan.fingerprint()).values())
    if len(markers) < len(plan.shards):
        raise KdrayError(f"{len(plan.shards) - len(markers)} shard(s) of {out.uri} have no valid marker (their part "
                         "files are missing or changed); re-run the same command to score them again")
    reasons: Counter = Counter()
    for marker in markers:
        reasons.update(json.loads(marker["errors"]))
    images = sum(int(m["inputs"]) for m in markers)
    this_run = sum(int(r["inputs"]) for r in rows)
    finished = sorted(float(r["finished"]) for r in rows)
    summary = {"model": model_uri, "input": plan.input, "output": out.uri, "kind": plan.kind, "backend": backend,
               "images": images, "scored": sum(int(m["scored"]) for m in markers),
               "explained": sum(int(m.get("explained", 0)) for m in markers), "explain": plan.explain,
               "errors": sum(reasons.values()), "errors_by_reason": dict(sorted(reasons.items())),
               "hidden_skipped": plan.hidden_skipped, "manifest_duplicates": plan.duplicates,
               "roots": plan.roots, "shards": len(plan.shards), "shards_resumed": resumed,
               "images_this_run": this_run, "nodes": len({m["node"] for m in markers if m.get("node")}),
               "wall_s": round(elapsed, 1), "img_per_s": round(this_run / max(elapsed, 1e-9), 2),
               "steady_img_per_s": _steady_rate(rows, finished)}
    storage.write_json(out.join(SUMMARY_FILE), summary)  # last: the run is finished
    return summary


def _steady_rate(rows: list[dict], finished: list[float]) -> float | None:
    """Images per second between the 10th and the 90th percentile of shard completion times."""
    if len(finished) < 5:
        return None
    lo, hi = np.percentile(finished, (10, 90))
    inside = sum(int(r["inputs"]) for r in rows if lo < float(r["finished"]) <= hi)
    return round(inside / (hi - lo), 2) if hi > lo else None
