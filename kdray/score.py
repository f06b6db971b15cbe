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

How it runs. The driver lists the inputs once and fixes them, in order, into shards of ``shard_size`` inputs (by
default :func:`auto_shard_size`; ``plan.json`` + ``inputs.parquet``; a tar file is one shard). An engine
(:mod:`kdray.scoring_engines`: Ray Data actors on a cluster, threads of this process on one machine) runs a
:class:`kdray.shard_scorer.ShardScorer` per shard: it reads, checks and decodes the shard's images, classifies
them with the shared :class:`kdray.predictor.Predictor`, and writes ``predictions/part-NNNNN.parquet`` and
``errors/part-NNNNN.parquet`` under fixed names (each file atomically), then ``_done/part-NNNNN.json``.
Nothing is materialised; results are written as they are produced.

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

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from kdray import KdrayError, dicomweb, storage
from kdray.images import ImageLimits
from kdray.inputs import is_hidden
from kdray.predictor import model_info
from kdray.report import REPORT_FILE, write_report
from kdray.schemas import ScoreSummary
from kdray.scoring_engines import Progress, choose_engine, run_locally, run_on_ray
from kdray.shard_scorer import (DONE_DIR, ERRORS_DIR, EXPLANATIONS_DIR, LOCK_FILE, PREDICTIONS_DIR, ReadPolicy,
                                ScoringAborted, ShardResult)

log = logging.getLogger(__name__)
SUMMARY_FILE, PLAN_FILE, INPUTS_FILE = "summary.json", "plan.json", "inputs.parquet"
MANIFEST_SUFFIXES = (".csv", ".parquet")
MIN_AUTO_SHARD, MAX_AUTO_SHARD = 32, 256


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
    dicom_results: bool = False  # DICOM rows also get an SR (and overlay SC) under dicom/ (kdray.dicom_results)
    dicom_store: str = ""  # a DICOMweb root where those results are also stored (STOW-RS)
    roots: list[str] = field(default_factory=list)  # where inputs may be read: the input's own root, then --
    allowed_roots: list[str] = field(default_factory=list)  # allowed_roots (both as storage.root_of makes them)
    outside_roots: int = 0  # manifest rows outside the roots at planning (refused when read, never opened)

    def fingerprint(self) -> str:
        parts = [self.input, self.model, self.kind, self.shard_size, self.shards]
        if self.explain != "none":  # (runs without explanations keep the fingerprint they always had)
            parts.append(self.explain)
        if self.dicom_results:  # (and so do runs without DICOM results)
            parts.append("dicom_results")
        if self.dicom_store:
            parts.append(self.dicom_store)
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
    if dicomweb.is_dicomweb(input_uri):
        return _plan_dicomweb(input_uri, model_uri, shard_size)
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


def _plan_dicomweb(input_uri: str, model_uri: str, shard_size: int) -> Plan:
    """A PACS's instances (QIDO-RS), one entry per SOP Instance UID, in UID order."""
    endpoint = dicomweb.parse(input_uri)
    entries = dicomweb.list_instances(endpoint)
    if not entries:
        raise KdrayError(f"{endpoint.base}: the query matches no instance")
    log.info("the PACS at %s lists %d instance(s)", endpoint.base, len(entries))
    size, shards = _cut(entries, shard_size)
    return Plan(input_uri, model_uri, "dicomweb", input_uri, size, shards, len(entries))


def _unfinished_pacs_plan(input_uri: str, model_uri: str, out: storage.Location) -> Plan | None:
    """The plan of an unfinished run of this PACS query into ``out``, as it was fixed then: a PACS changes between
    runs (new studies; kdray's own results), and a re-run finishes the first run's instances, no others."""
    if not dicomweb.is_dicomweb(input_uri) or storage.exists(out.join(SUMMARY_FILE)) \
            or not storage.exists(out.join(PLAN_FILE)):
        return None
    stored = storage.read_json(out.join(PLAN_FILE))
    if (stored.get("kind"), stored.get("input"), stored.get("model")) != ("dicomweb", input_uri, model_uri):
        return None  # (the fingerprint check then names the other run)
    table = storage.read_table(out.join(INPUTS_FILE), "the run's plan")
    shards: list[list[str]] = [[] for _ in range(int(stored["shards"]))]
    for shard, entry in zip(table["shard"].to_pylist(), table["entry"].to_pylist()):
        shards[shard].append(entry)
    log.info("finishing the unfinished run in %s: the %d instance(s) its first run listed", out.uri, len(table))
    return Plan(input_uri, model_uri, "dicomweb", input_uri, int(stored["shard_size"]), shards, len(table))


def _plan_manifest(loc: storage.Location, model_uri: str, shard_size: int, extra: list[str]) -> Plan:
    table = storage.read_table(loc, "manifest")
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


# ----------------------------------------------------------------------------- the actor


# ----------------------------------------------------------------------------- the driver


def _prepare_output(plan: Plan, out: storage.Location, overwrite: bool) -> set[int]:
    """Fix or check the run's plan; return the shards already done. Removes the finished marker first."""
    summary = out.join(SUMMARY_FILE)
    if storage.exists(summary) and not overwrite:
        raise KdrayError(f"{out.uri} already holds a finished scoring run; choose another --output "
                         "or pass --overwrite true")
    if overwrite:
        for sub in (SUMMARY_FILE, REPORT_FILE, PLAN_FILE, INPUTS_FILE):
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


def score_archive(model_uri: str, input_uri: str, output_uri: str, backend: str = "auto", batch_size: int = 32,
                  overwrite: bool = False, shard_size: int = 0, limits: ImageLimits | None = None,
                  policy: ReadPolicy | None = None, use_gpu: bool = True, explain: str = "none",
                  allowed_roots: list[str] | tuple = (), lock_ttl_s: float = storage.LOCK_TTL_S,
                  lock_heartbeat_s: float = storage.LOCK_HEARTBEAT_S, engine: str = "auto",
                  dicom_results: bool = False, dicom_store: str = "", report: bool = True) -> ScoreSummary:
    """Score every input under ``input_uri``; resumable (see the module docstring). Returns the summary.

    ``allowed_roots``: folders or S3 prefixes that inputs may be read from besides the input's own. The output is
    held for this run (:class:`kdray.storage.OutputLock`, with ``lock_ttl_s`` and ``lock_heartbeat_s``) from
    before anything in it is written or deleted until the run ends. ``engine``: where the shards are scored
    (:mod:`kdray.scoring_engines`: ``auto``, ``local`` or ``ray``). ``dicom_store``: a DICOMweb root
    (``dicomweb+http://host:port/dicom-web``) where the DICOM results are also stored by STOW-RS (implies
    ``dicom_results``). ``report``: also ``report.html`` (:mod:`kdray.report`), written just before
    ``summary.json``. Returns what ``summary.json`` holds."""
    if dicomweb.is_dicomweb(output_uri):
        raise KdrayError("--output holds the rows, markers and summary: a folder or s3:// prefix. To store the "
                         "results in a PACS, add --dicom_store dicomweb+http://host:port/dicom-web")
    if dicom_store:
        dicomweb.parse_store(dicom_store)  # a clear error now, not in every actor
    engine = choose_engine(engine)
    info = model_info(model_uri, backend)
    out = storage.resolve(output_uri)
    plan = (None if overwrite else _unfinished_pacs_plan(input_uri, model_uri, out)) \
        or plan_inputs(input_uri, model_uri, shard_size, allowed_roots)
    plan.explain, plan.dicom_results, plan.dicom_store = explain, bool(dicom_results or dicom_store), dicom_store
    if explain != "none":
        from kdray.explain import Explainer, should_explain  # torch loads only for explanations

        should_explain(explain, None, 0)  # a valid mode
        Explainer.load(model_uri)  # fail now, not in every actor, when the model cannot be explained
    with storage.OutputLock(out.join(LOCK_FILE), lock_ttl_s, lock_heartbeat_s, what="scoring run") as lock:
        done = _prepare_output(plan, out, overwrite)
        rows, elapsed, info = _score_shards(plan, out, done, info, lock, backend, batch_size, limits, policy,
                                            use_gpu, engine)
        if not lock.holds():
            raise ScoringAborted(f"another run took over {out.uri} while this one ran; this run stops without "
                                 "writing its summary")
        return _finish(plan, out, info.backend, engine, rows, elapsed, len(done), report, info.covid_threshold)


def _score_shards(plan: Plan, out: storage.Location, done: set[int], info, lock: storage.OutputLock, backend: str,
                  batch_size: int, limits: ImageLimits | None, policy: ReadPolicy | None, use_gpu: bool,
                  engine: str) -> tuple[list[ShardResult], float, object]:
    """Score the shards not yet done with the chosen engine; returns (results, seconds, model info)."""
    todo = [i for i in range(len(plan.shards)) if i not in done]
    on_gpu = use_gpu and _gpus(engine) > 0
    if on_gpu:  # onnxruntime-gpu cannot sit beside onnxruntime: a GPU runs the torch weights
        backend, info = "torch", model_info(plan.model, "torch")
    total = None if plan.images is None else sum(len(plan.shards[i]) for i in todo)
    log.info("scoring %s with %s (%s, %s engine): %d shard(s) to do, %d already done", plan.input, plan.model,
             info.backend, engine, len(todo), len(done))
    scorer = {"model_uri": plan.model, "output_uri": out.uri, "backend": backend, "batch_size": batch_size,
              "limits": asdict(limits or ImageLimits()), "policy": asdict(policy or ReadPolicy()), "base": plan.base,
              "kind": plan.kind, "explain": plan.explain, "dicom_results": plan.dicom_results,
              "dicom_store": plan.dicom_store, "roots": plan.roots, "run_id": lock.run_id,
              "fingerprint": plan.fingerprint()}
    work = [{"shard": i, "entries": plan.shards[i]} for i in todo]
    started = time.time()
    results: list[ShardResult] = []
    if work:
        progress = Progress(total, len(work))
        results = run_on_ray(work, scorer, on_gpu, progress) if engine == "ray" else \
            run_locally(work, scorer, progress)
        fatal = next((r.fatal for r in results if r.fatal), "")
        if fatal:
            raise ScoringAborted(fatal)
    undone = [r for r in results if not r.done]
    if undone:
        io_errors = sum(r.io_errors for r in undone)
        raise KdrayError(f"{io_errors} input(s) in {len(undone)} shard(s) could not be read (io_error, after "
                         f"retries); their shards stay unfinished. Re-run the same command to retry them")
    return results, time.time() - started, info


def _gpus(engine: str) -> float:
    """GPUs the engine can use: the cluster's on Ray; here, CUDA devices (torch is asked only where a driver is)."""
    if engine == "ray":
        from kdray.raycluster import cluster_gpus, init_ray

        init_ray()
        return cluster_gpus()
    if not os.path.exists("/dev/nvidiactl"):
        return 0
    import torch

    return float(torch.cuda.device_count())


def _finish(plan: Plan, out: storage.Location, backend: str, engine: str, results: list[ShardResult],
            elapsed: float, resumed: int, report: bool = True, covid_threshold: float | None = None) -> ScoreSummary:
    """Totals over every shard's marker (this attempt's and earlier ones'), then ``report.html`` (with ``report``)
    and ``summary.json``, last.

    Every shard is done, so a temporary file left now is one that a worker lost with its node (or process)
    never renamed: it is removed before the run is called finished. Only markers whose part files match them
    count (:func:`valid_markers`); a shard without one is not finished, and neither is the run."""
    _remove_stale_temporaries(out)
    markers = [ShardResult.from_marker(m) for m in valid_markers(out, plan.fingerprint()).values()]
    if len(markers) < len(plan.shards):
        raise KdrayError(f"{len(plan.shards) - len(markers)} shard(s) of {out.uri} have no valid marker (their part "
                         "files are missing or changed); re-run the same command to score them again")
    reasons: Counter = Counter()
    for marker in markers:
        reasons.update(marker.errors)
    this_run = sum(r.inputs for r in results)
    summary = ScoreSummary(
        model=plan.model, input=plan.input, output=out.uri, kind=plan.kind, backend=backend, engine=engine,
        images=sum(m.inputs for m in markers), scored=sum(m.scored for m in markers),
        explained=sum(m.explained for m in markers), explain=plan.explain, errors=sum(reasons.values()),
        errors_by_reason=dict(sorted(reasons.items())), hidden_skipped=plan.hidden_skipped,
        manifest_duplicates=plan.duplicates, roots=plan.roots, shards=len(plan.shards), shards_resumed=resumed,
        images_this_run=this_run, nodes=len({m.node for m in markers if m.node}), wall_s=round(elapsed, 1),
        img_per_s=round(this_run / max(elapsed, 1e-9), 2), steady_img_per_s=_steady_rate(results))
    if report:  # before the summary, so that every finished run has its page
        write_report(out, summary, plan.base, covid_threshold)  # (the predictor's: the model is not read again)
    storage.write_json(out.join(SUMMARY_FILE), summary.model_dump(mode="json"))  # last: the run is finished
    return summary


def _steady_rate(results: list[ShardResult]) -> float | None:
    """Images per second between the 10th and the 90th percentile of shard completion times."""
    if len(results) < 5:
        return None
    lo, hi = np.percentile([r.finished for r in results], (10, 90))
    inside = sum(r.inputs for r in results if lo < r.finished <= hi)
    return round(inside / (hi - lo), 2) if hi > lo else None
