"""Offline scoring of image archives with Ray Data: streaming, resumable, exactly once.

Inputs (``--input``):

- a folder or ``s3://`` prefix, recursive: every file is scored or listed in ``errors/``, judged by
  its content (:mod:`kdray.images`), not its extension. Hidden files (a name, or a folder on the way,
  starting with ``.``) are skipped and counted;
- a manifest: a ``.csv`` or ``.parquet`` file with a ``path`` column (absolute URIs, or paths
  relative to the manifest's folder). A path named twice is scored once, and the summary says so;
- ``.tar`` shards in the WebDataset layout (a ``.tar`` file, or a folder holding only ``.tar``
  files): every image member is an input, named ``<tar URI>#<member>``; members with a metadata
  extension (``.json``, ``.txt``, ``.cls``, …) are skipped and counted.

How it runs. The driver lists the inputs once and fixes them, in order, into shards of
``shard_size`` inputs (by default :func:`auto_shard_size`; ``plan.json`` + ``inputs.parquet``; a tar file is one shard). Ray Data streams
the shards through a pool of :class:`ShardScorer` actors; each actor reads, checks and decodes its
shard's images, classifies them with the shared :class:`kdray.predictor.Predictor`, and writes
``predictions/part-NNNNN.parquet`` and ``errors/part-NNNNN.parquet`` under fixed names (each file
atomically), then ``_done/part-NNNNN.json``. Nothing is materialised; results are written as they
are produced.

Exactly once, and resumable. Killed at any moment, the same command run again skips every shard
with a ``_done`` marker and scores the others again, overwriting their files, so every input ends
up exactly once in ``predictions`` ∪ ``errors``. A shard holding an ``io_error`` row (an input that
could not be read: gone since listing, access refused, an unreadable tar shard) gets no marker, so a
re-run retries it. ``summary.json`` is written last and marks the run finished; it is removed before a
re-run writes anything.

S3 outages. Every read and write goes through :mod:`kdray.storage`, which retries an S3 that cannot be
reached (or answers 5xx/SlowDown) with backoff for ``KDRAY_S3_RETRY_S`` seconds (default 120). If S3
is still away after that, the job stops with one line (:class:`kdray.storage.S3Unavailable`): the
shard in progress gets no marker and there is no ``summary.json``; once S3 is back, the same command
resumes. Many read failures in a row, or an output store that cannot be written, also stop the job
with a one-line error and no ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import tarfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from kdray import KdrayError, storage
from kdray.explain import Explainer, should_explain
from kdray.images import FILE_TOO_LARGE, IO_ERROR, ImageLimits, ImageRefused, load_image
from kdray.predictor import Predictor, model_info
from kdray.raycluster import cluster_cpus, cluster_gpus, init_ray
from kdray.runner import root_cause

log = logging.getLogger(__name__)
progress_log = logging.getLogger("kdray.progress")

SUMMARY_FILE, PLAN_FILE, INPUTS_FILE = "summary.json", "plan.json", "inputs.parquet"
PREDICTIONS_DIR, ERRORS_DIR, DONE_DIR = "predictions", "errors", "_done"
EXPLANATIONS_DIR = "explanations"
EXPLAIN_CHUNK = 8  # images per Grad-CAM call
MANIFEST_SUFFIXES = (".csv", ".parquet")
MIN_AUTO_SHARD, MAX_AUTO_SHARD = 32, 256
METADATA_SUFFIXES = (".json", ".txt", ".cls", ".cls2", ".xml", ".yaml", ".yml", ".csv", ".npy", ".pth")
DICOM_FIELDS = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid", "SOPInstanceUID": "sop_uid",
                "Modality": "modality", "BodyPartExamined": "body_part", "ViewPosition": "view_position"}


class ScoringAborted(KdrayError):
    """The job stopped: too many read failures in a row, or the output store cannot be written."""


class MissingInput(KdrayError):
    """A listed input is not there (deleted since listing, or a manifest typo): an io_error, not retried."""


@dataclass(frozen=True)
class ReadPolicy:
    """When per-input read failures (``io_error`` rows) stop the whole job. How long an unreachable S3 is
    retried is the storage layer's budget (``KDRAY_S3_RETRY_S``, :func:`kdray.storage.retrying`)."""

    max_consecutive_io_errors: int = 20


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

    def fingerprint(self) -> str:
        parts = [self.input, self.model, self.kind, self.shard_size, self.shards]
        if self.explain != "none":  # (runs without explanations keep the fingerprint they always had)
            parts.append(self.explain)
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- listing


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def auto_shard_size(inputs: int) -> int:
    """About 16 shards for small archives (enough to keep every actor busy to the end; smaller shards cost more
    in per-shard writes than they gain), 256 inputs each for large ones. A function of the input count only,
    so that a re-run of the same command cuts the same shards."""
    return max(MIN_AUTO_SHARD, min(MAX_AUTO_SHARD, inputs // 16))


def _cut(entries: list[str], shard_size: int) -> tuple[int, list[list[str]]]:
    size = shard_size or auto_shard_size(len(entries))
    return size, [entries[i:i + size] for i in range(0, len(entries), size)]


def plan_inputs(input_uri: str, model_uri: str, shard_size: int = 0) -> Plan:
    """List the inputs once and cut them into shards (deterministic: sorted paths or manifest order).
    ``shard_size`` 0 = :func:`auto_shard_size`."""
    if shard_size < 0:
        raise KdrayError(f"shard_size must be >= 0 (0 = automatic), got {shard_size}")
    loc = storage.resolve(input_uri)
    kind = storage.info(loc).type
    if kind == pafs.FileType.File and loc.path.lower().endswith(MANIFEST_SUFFIXES):
        return _plan_manifest(loc, model_uri, shard_size)
    if kind == pafs.FileType.File and loc.path.lower().endswith(".tar"):
        return Plan(input_uri, model_uri, "tar", "", 1, [[loc.uri]], None)
    files = storage.list_files(loc)  # a clear error for a missing folder or bucket
    relative = [posixpath.relpath(f.path, loc.path) for f in files]
    visible = [r for r in relative if not _is_hidden(r)]
    hidden = len(relative) - len(visible)
    if not visible:
        raise KdrayError(f"{input_uri}: no files to score" + (f" ({hidden} hidden files skipped)" if hidden else ""))
    if all(r.lower().endswith(".tar") for r in visible):
        return Plan(input_uri, model_uri, "tar", loc.uri, 1, [[r] for r in visible], None, hidden)
    size, shards = _cut(visible, shard_size)
    return Plan(input_uri, model_uri, "folder", loc.uri, size, shards, len(visible), hidden)


def _plan_manifest(loc: storage.Location, model_uri: str, shard_size: int) -> Plan:
    table = _read_manifest(loc)
    if "path" not in table.column_names:
        raise KdrayError(f"{loc.uri}: a scoring manifest needs a 'path' column (has {', '.join(table.column_names)})")
    base = loc.uri.rsplit("/", 1)[0] if "/" in loc.uri else "."
    seen, entries = set(), []
    for raw in table["path"].to_pylist():
        if raw is None or not str(raw).strip():
            continue
        path = str(raw).strip()
        uri = path if "://" in path or path.startswith("/") else storage.join(base, path)
        if uri not in seen:
            seen.add(uri)
            entries.append(uri)
    duplicates = sum(1 for raw in table["path"].to_pylist() if raw is not None and str(raw).strip()) - len(entries)
    if not entries:
        raise KdrayError(f"{loc.uri}: the manifest names no files")
    if duplicates:
        log.warning("%s names %d path(s) more than once; each is scored once", loc.uri, duplicates)
    size, shards = _cut(entries, shard_size)
    return Plan(loc.uri, model_uri, "manifest", "", size, shards, len(entries), 0, duplicates)


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
    """Ray Data actor: one shard in, its predictions and errors written, one summary row out."""

    def __init__(self, model_uri: str, output_uri: str, backend: str = "auto", threads: int = 1,
                 batch_size: int = 32, limits: dict | None = None, policy: dict | None = None,
                 base: str = "", kind: str = "folder", explain: str = "none"):
        self.predictor = Predictor.load(model_uri, backend=backend, threads=threads)
        self.explain = explain
        self.explainer = Explainer.load(model_uri, threads=threads) if explain != "none" else None
        self.out = storage.resolve(output_uri)
        self.batch_size, self.base, self.kind = batch_size, base, kind
        self.limits = ImageLimits(**(limits or {}))
        self.policy = ReadPolicy(**(policy or {}))
        self.consecutive_io_errors = 0
        self._filesystems: dict[str, pafs.FileSystem] = {}  # one per scheme: an S3 client is costly to create

    def __call__(self, batch: dict) -> dict:
        rows = [self._score_shard(int(shard), list(entries)) for shard, entries in zip(batch["shard"], batch["entries"])]
        return {key: np.asarray([row[key] for row in rows]) for key in rows[0]}

    # -- reading
    def _inputs(self, entries: list[str]):
        """(name, bytes or None, loaded image or refusal) for each input of the shard."""
        if self.kind == "tar":
            for entry in entries:
                yield from self._tar_members(_entry_uri(self.base, entry))
            return
        for entry in entries:
            uri = _entry_uri(self.base, entry)
            yield uri, lambda uri=uri: self._read(uri)

    def _location(self, uri: str) -> storage.Location:
        """``uri`` resolved; on S3 with one filesystem per actor (creating an S3 client per file is costly)."""
        if not uri.startswith("s3://"):
            return storage.resolve(uri)
        if "s3" not in self._filesystems:
            self._filesystems["s3"] = storage.resolve(uri).fs
        return storage.Location(self._filesystems["s3"], uri[len("s3://"):].rstrip("/"), uri)

    def _read(self, uri: str) -> bytes:
        loc = self._location(uri)

        def read() -> bytes:  # one request per file: no separate stat (a HEAD on S3) before the GET
            limit = self.limits.max_bytes
            try:
                with loc.fs.open_input_stream(loc.path) as fh:
                    data = fh.read(limit + 1)  # never more than the byte limit, whatever the file's size
            except FileNotFoundError:
                raise MissingInput(f"{uri}: no such file") from None
            if len(data) > limit:
                raise ImageRefused(FILE_TOO_LARGE, f"file is larger than {limit} bytes, the most accepted")
            return data

        return storage.retrying(read, uri, "reading")

    def _tar_members(self, tar_uri: str):
        loc = self._location(tar_uri)

        def members():
            with loc.fs.open_input_stream(loc.path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                out = []
                for member in tar:
                    if not member.isfile() or _is_hidden(member.name):
                        continue
                    name = f"{loc.uri}#{member.name}"
                    if member.name.lower().endswith(METADATA_SUFFIXES):
                        out.append((name, None))
                        continue
                    if member.size > self.limits.max_bytes:
                        out.append((name, ImageRefused("file_too_large", f"{member.size} bytes > the "
                                                                         f"{self.limits.max_bytes}-byte limit")))
                        continue
                    out.append((name, tar.extractfile(member).read()))
                return out

        try:
            listed = storage.retrying(members, tar_uri, "reading")
        except storage.S3Unavailable:
            raise  # stops the job (_score_shard): S3 is away, not this shard
        except (OSError, KdrayError, tarfile.TarError) as exc:
            yield tar_uri, _raiser(IO_ERROR if not isinstance(exc, tarfile.TarError) else "corrupt",
                                   f"cannot read the tar shard: {str(exc).splitlines()[0][:200]}")
            return
        for name, payload in listed:
            if payload is None:
                continue  # WebDataset metadata member
            if isinstance(payload, ImageRefused):
                yield name, _raiser(payload.reason, str(payload))
            else:
                yield name, lambda payload=payload: payload

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
                data = read()
                self.consecutive_io_errors = 0
                loaded = load_image(data, self.predictor.image_size, self.limits)
            except storage.S3Unavailable:
                raise  # S3 is away after the retry budget: the job stops, this input is not an io_error row
            except ImageRefused as exc:
                errors.append({"path": name, "reason": exc.reason, "message": str(exc)})
                continue
            except (OSError, KdrayError) as exc:
                self.consecutive_io_errors += 1
                errors.append({"path": name, "reason": IO_ERROR, "message": str(exc).splitlines()[0][:300]})
                if self.consecutive_io_errors >= self.policy.max_consecutive_io_errors:
                    raise ScoringAborted(f"{self.consecutive_io_errors} reads failed in a row (last: {name}: "
                                         f"{errors[-1]['message']}); stopping. Re-run the same command to resume")
                continue
            good_names.append(name)
            good_images.append(loaded.pixels)
            good_meta.append(loaded)
        name = f"part-{shard:05d}"
        predictions = self._predictions(good_names, good_images, good_meta, name)
        self._write(self.out.join(PREDICTIONS_DIR, f"{name}.parquet"), predictions)
        self._write(self.out.join(ERRORS_DIR, f"{name}.parquet"), _errors_table(errors))
        io_errors = sum(1 for e in errors if e["reason"] == IO_ERROR)
        reasons = Counter(e["reason"] for e in errors)
        explained = predictions.num_rows - predictions.column("explanation").null_count \
            if "explanation" in predictions.column_names else 0
        row = {"shard": shard, "inputs": len(good_names) + len(errors), "scored": len(good_names),
               "explained": explained,
               "errors": json.dumps(dict(reasons)), "io_errors": io_errors, "seconds": time.time() - started,
               "finished": time.time(), "done": io_errors == 0, "fatal": "", "node": _node_id()}
        if row["done"]:  # a shard with io_error rows stays undone: a re-run retries it
            self._write_done(self.out.join(DONE_DIR, f"{name}.json"), row)
        return row

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

    def _write(self, loc: storage.Location, table: pa.Table) -> None:
        self._write_or_abort(loc, lambda: storage.write_parquet(loc, table))

    def _write_done(self, loc: storage.Location, row: dict) -> None:
        self._write_or_abort(loc, lambda: storage.write_json(loc, row))

    def _write_or_abort(self, loc: storage.Location, write) -> None:
        """``write()`` (the storage layer retries an unreachable S3); an output store that still fails stops the
        job cleanly."""
        try:
            write()
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


def _raiser(reason: str, message: str):
    def read():
        if reason == IO_ERROR:
            raise OSError(message)
        raise ImageRefused(reason, message)
    return read


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
        done_dir = out.join(DONE_DIR)
        if storage.info(done_dir).type == pafs.FileType.NotFound:
            return set()
        return {int(f.base_name.split("-")[1].split(".")[0]) for f in storage.list_files(done_dir)
                if f.base_name.startswith("part-")}
    storage.write_parquet(out.join(INPUTS_FILE), pa.table({
        "shard": pa.array([i for i, s in enumerate(plan.shards) for _ in s], pa.int32()),
        "entry": pa.array([e for s in plan.shards for e in s], pa.string())}))
    storage.write_json(plan_loc, {"fingerprint": fingerprint, "input": plan.input, "model": plan.model,
                                  "kind": plan.kind, "base": plan.base, "shard_size": plan.shard_size,
                                  "shards": len(plan.shards), "images": plan.images})
    return set()


def _remove_stale_temporaries(out: storage.Location) -> None:
    """Half-written files of a killed attempt (local outputs only; S3 uploads appear whole or not at all)."""
    if out.is_s3:
        return
    for sub in (PREDICTIONS_DIR, ERRORS_DIR, DONE_DIR):
        folder = out.join(sub)
        if storage.info(folder).type == pafs.FileType.Directory:
            for f in storage.list_files(folder):
                if f.base_name.startswith(".tmp-"):
                    storage.delete_file(storage.Location(out.fs, f.path, f.path))


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
                  policy: ReadPolicy | None = None, use_gpu: bool = True, explain: str = "none") -> dict:
    """Score every input under ``input_uri``; resumable (see the module docstring). Returns the summary."""
    import ray

    info = model_info(model_uri, backend)
    plan = plan_inputs(input_uri, model_uri, shard_size)
    plan.explain = explain
    if explain != "none":
        should_explain(explain, None, 0)  # a valid mode
        Explainer.load(model_uri)  # fail now, not in every actor, when the model cannot be explained
    out = storage.resolve(output_uri)
    done = _prepare_output(plan, out, overwrite)
    todo = [i for i in range(len(plan.shards)) if i not in done]
    init_ray()
    on_gpu = use_gpu and cluster_gpus() > 0
    chosen_backend = "torch" if on_gpu else backend  # onnxruntime-gpu cannot sit beside onnxruntime
    if on_gpu:
        info = model_info(model_uri, "torch")
    total = None if plan.images is None else sum(len(plan.shards[i]) for i in todo)
    log.info("scoring %s with %s (%s): %d shard(s) to do, %d already done", input_uri, model_uri, info.backend,
             len(todo), len(done))
    started = time.time()
    rows: list[dict] = []
    if todo:
        compute, resources, threads = scoring_pool(on_gpu, len(todo))
        ds = ray.data.from_items([{"shard": i, "entries": plan.shards[i]} for i in todo],
                                 override_num_blocks=len(todo))
        scored = ds.map_batches(ShardScorer, batch_size=1, batch_format="numpy", compute=compute,
                                fn_constructor_kwargs={"model_uri": model_uri, "output_uri": out.uri,
                                                       "backend": chosen_backend, "threads": threads,
                                                       "batch_size": batch_size,
                                                       "limits": dataclasses.asdict(limits or ImageLimits()),
                                                       "policy": dataclasses.asdict(policy or ReadPolicy()),
                                                       "base": plan.base, "kind": plan.kind,
                                                       "explain": explain},
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
    elapsed = time.time() - started
    undone = [r for r in rows if not r["done"]]
    if undone:
        io_errors = sum(int(r["io_errors"]) for r in undone)
        raise KdrayError(f"{io_errors} input(s) in {len(undone)} shard(s) could not be read (io_error, after "
                         f"retries); their shards stay unfinished. Re-run the same command to retry them")
    return _finish(plan, out, info.backend, model_uri, rows, elapsed, len(done))


def _finish(plan: Plan, out: storage.Location, backend: str, model_uri: str, rows: list[dict], elapsed: float,
            resumed: int) -> dict:
    """Totals over every shard's marker (this attempt's and earlier ones'), then ``summary.json``, last.

    Every shard is done, so a temporary file left now is one that a worker lost with its node (or process)
    never renamed: it is removed before the run is called finished."""
    _remove_stale_temporaries(out)
    done_dir = out.join(DONE_DIR)
    markers = [storage.read_json(storage.Location(out.fs, f.path, f.path))
               for f in storage.list_files(done_dir) if f.base_name.startswith("part-")] \
        if storage.exists(done_dir) else []
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
               "shards": len(plan.shards), "shards_resumed": resumed, "images_this_run": this_run,
               "nodes": len({m["node"] for m in markers if m.get("node")}),
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
