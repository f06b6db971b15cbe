"""One storage layer: URIs (local path, file://, s3://bucket/prefix) → pyarrow filesystem + path.

S3 settings come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION). Writes are atomic: local files are written to a
temporary name and renamed; S3 objects appear whole when their upload completes, and
multi-file outputs are committed by writing a marker last.

S3 outages. Every S3 request made here (and every one passed to :func:`retrying`) that fails because S3
cannot be reached or answers with a transient error (connection refused or reset, a timeout, a 5xx,
SlowDown) is retried with exponential backoff (0.5 s doubling to 10 s, ±25% jitter) for up to
``KDRAY_S3_RETRY_S`` seconds (default 120; 0 = one attempt), with a warning per retry. Then it raises
:class:`S3Unavailable`, one line that names the URI and the endpoint. A missing bucket or key, refused
credentials and refused images are not retried. The variable reaches Ray workers
(``kdray.raycluster.FORWARDED_ENV``; the keys never do: ``kdray.raycluster.SECRET_ENV``).

Reading only what a job should. :func:`within_roots` says where a URI really is (every local link resolved, an S3
key normalised) and whether that is inside the roots a job may read; :func:`walk_local` lists a local folder
without following links blindly (no loops, no way out of its roots); :class:`OutputLock` holds an output folder
for one run at a time.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import re
import socket
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from kdray import KdrayError, first_line

log = logging.getLogger(__name__)

#: How long (seconds) an S3 request that cannot get through is retried before the job stops; read at each call.
RETRY_ENV = "KDRAY_S3_RETRY_S"
DEFAULT_RETRY_S = 120.0
BACKOFF_START_S, BACKOFF_CAP_S = 0.5, 10.0
#: pyarrow's own attempts per request (its AWS SDK retry strategy): a lone hiccup is absorbed there, an outage is
#: left to :func:`retrying`, so that the two never multiply into minutes (a hung server costs at most
#: SDK_ATTEMPTS x (connect + request timeout) past the budget).
SDK_ATTEMPTS, CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S = 2, 5, 30
#: What a transient failure looks like in pyarrow's S3 messages ("AWS Error <type> during <operation> operation:
#: <message>"): the AWS SDK's error types for an unreachable endpoint, timeouts, throttling and 5xx, curl's codes.
_TRANSIENT = re.compile(r"NETWORK_CONNECTION|curlCode|connect to server|Connection (?:refused|reset)|timed out|"
                        r"Timeout|SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|"
                        r"InternalError|THROTTLING|REQUEST_TIMEOUT|HTTP status 5\d\d", re.IGNORECASE)
_AWS_ERROR = "AWS Error"  # in every error pyarrow's S3 filesystem raises; never in a local file's


class S3Unavailable(KdrayError):
    """S3 could not be reached, or kept failing with transient errors, for the whole retry budget."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI it came from."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts), join(self.uri, *parts))


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs = dict(region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
        if os.environ.get("AWS_SESSION_TOKEN"):  # temporary keys (SSO, an assumed role) are refused without it
            kwargs.update(session_token=os.environ["AWS_SESSION_TOKEN"])
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    kwargs.update(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=SDK_ATTEMPTS))
    return pafs.S3FileSystem(**kwargs)


def retry_budget_s() -> float:
    """Seconds to keep retrying an S3 request that cannot get through: ``KDRAY_S3_RETRY_S``, default 120."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # (also refuses nan)
        raise KdrayError(f"{RETRY_ENV}={raw!r}: must be a number of seconds >= 0 (default {DEFAULT_RETRY_S:g})")
    return value


def is_transient(exc: BaseException) -> bool:
    """True for a failure worth retrying: S3 unreachable, a timeout, a 5xx or SlowDown. Never for a missing file
    or bucket, refused credentials or any kdray error (a refused image, an exhausted retry budget)."""
    if isinstance(exc, (KdrayError, FileNotFoundError, PermissionError)) or not isinstance(exc, OSError):
        return False
    text = str(exc)
    return _AWS_ERROR in text and bool(_TRANSIENT.search(text))


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "the default AWS endpoint"


def _cause(exc: BaseException) -> str:
    """The short reason inside one of pyarrow's S3 messages (``curlCode: 7, Could not connect to server``)."""
    return first_line(exc, 10_000).split(" operation: ", 1)[-1].split(";", 1)[0].strip()[:120]


def retrying(fn: Callable[[], object], uri: str, what: str = "accessing", budget_s: float | None = None):
    """``fn()``, retried with exponential backoff while it fails transiently (:func:`is_transient`), for up to
    ``budget_s`` seconds (default :func:`retry_budget_s`); then :class:`S3Unavailable`, one line naming ``uri``.
    Any other error is raised at once. ``what`` names the action in the warnings (``reading``, ``writing``)."""
    budget = retry_budget_s() if budget_s is None else budget_s
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - started
            left = budget - elapsed
            if left <= 0:
                raise S3Unavailable(f"{uri}: cannot reach S3 at {_endpoint()} ({_cause(exc)}) after retrying for "
                                    f"{elapsed:.0f} s; once it is back, re-run the same command to resume") from None
            log.warning("S3 unreachable at %s (%s); retrying %s %s for up to %.0f s more", _endpoint(), _cause(exc),
                        what, uri, left)
            delay = min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** attempt) * random.uniform(0.75, 1.25)
            time.sleep(min(delay, left))
            attempt += 1


def _call(loc: Location, fn: Callable[[], object], what: str = "accessing", budget_s: float | None = None):
    """A storage operation on ``loc``: :func:`retrying`, then any other OSError as one line (:func:`_explain`);
    FileNotFoundError is left to the caller."""
    try:
        return retrying(fn, loc.uri, what, budget_s)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _explain(loc, exc) from None


def resolve(uri: str) -> Location:
    """Turn a URI into a :class:`Location`."""
    if not uri:
        raise KdrayError("empty path or URI")
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise KdrayError(f"{uri}: an S3 URI needs a bucket name")
        return Location(s3_filesystem(), path, uri.rstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise KdrayError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if uri.startswith("s3://") else os.path.join(uri, *parts)


def _explain(loc: Location, exc: Exception) -> KdrayError:
    text = str(exc)
    if loc.is_s3:
        bucket = loc.path.split("/", 1)[0]
        if "NoSuchBucket" in text or "does not exist" in text.lower() and "bucket" in text.lower():
            return KdrayError(f"{loc.uri}: S3 bucket {bucket!r} does not exist")
        if any(code in text for code in ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "403")):
            return KdrayError(f"{loc.uri}: S3 refused access; {access_hint()}")
    return KdrayError(f"{loc.uri}: {first_line(exc)}")


def access_hint() -> str:
    """What to check when S3 refuses access: the keys' names (never their values), or, for a process that has
    none (a Ray worker on a node without credentials: kdray sends no key through Ray), what the node needs."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys)"
    return ("this process has no AWS keys (a role's, if any, were refused): on a Ray cluster every node needs S3 "
            "credentials of its own, an IAM role or AWS_* keys in the node's environment (docs/deployment.md)")


def info(loc: Location) -> pafs.FileInfo:
    return _call(loc, lambda: loc.fs.get_file_info(loc.path), "looking up")


def exists(uri: str | Location) -> bool:
    loc = resolve(uri) if isinstance(uri, str) else uri
    return info(loc).type != pafs.FileType.NotFound


def list_files(loc: Location) -> list[pafs.FileInfo]:
    """All files below a directory (recursive), sorted by path. Errors name the problem."""
    kind = info(loc).type
    if kind == pafs.FileType.NotFound:
        if loc.is_s3:
            check_bucket(loc)
        raise KdrayError(f"{loc.uri}: no such file or folder")
    if kind != pafs.FileType.Directory:
        raise KdrayError(f"{loc.uri}: is a file, expected a folder")
    found = _call(loc, lambda: loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)), "listing")
    return sorted((f for f in found if f.type == pafs.FileType.File), key=lambda f: f.path)


def check_bucket(loc: Location) -> None:
    """Raise a clear error if the S3 bucket of ``loc`` does not exist or cannot be reached."""
    bucket = loc.path.split("/", 1)[0]
    bucket_info = info(Location(loc.fs, bucket, f"s3://{bucket}"))
    if bucket_info.type == pafs.FileType.NotFound:
        raise KdrayError(f"{loc.uri}: S3 bucket {bucket!r} does not exist")


def read_bytes(uri: str | Location, limit: int | None = None) -> bytes:
    """A file's bytes; with ``limit``, a file larger than that is refused after reading at most ``limit`` + 1."""
    loc = resolve(uri) if isinstance(uri, str) else uri

    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as fh:
            return fh.read() if limit is None else fh.read(limit + 1)

    try:
        data = _call(loc, read, "reading")
    except FileNotFoundError:
        raise KdrayError(f"{loc.uri}: no such file") from None
    if limit is not None and len(data) > limit:
        raise KdrayError(f"{loc.uri}: larger than {limit:,} bytes, the most read for it")
    return data


#: A manifest (CSV or Parquet) is read whole: 10 million rows of paths fit well under this.
MAX_TABLE_BYTES = 2 * 2**30


def read_table(uri: str | Location, what: str = "table") -> pa.Table:
    """A CSV or Parquet file (by its name) as a pyarrow Table, at most :data:`MAX_TABLE_BYTES`; a file that is
    neither is one line naming it and ``what`` it was read as."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    loc = resolve(uri) if isinstance(uri, str) else uri
    data = read_bytes(loc, MAX_TABLE_BYTES)
    try:
        if loc.path.lower().endswith(".parquet"):
            return pq.read_table(pa.BufferReader(data))
        return pacsv.read_csv(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise KdrayError(f"{loc.uri}: cannot read the {what} ({first_line(exc)})") from None


def _move_into_place(fs: pafs.FileSystem, tmp: str, path: str) -> None:
    """The last step of a local atomic write: the finished temporary file takes its final name. A function of its
    own so that a test can stop a job between the two steps (tests/fault_hooks.py slows it down)."""
    fs.move(tmp, path)


def write_bytes(uri: str | Location, data: bytes) -> None:
    """Write atomically: a reader sees the old object or the whole new one, never a part."""
    loc = resolve(uri) if isinstance(uri, str) else uri

    def upload() -> None:  # S3: the object appears when the upload completes; a failed one leaves nothing
        with loc.fs.open_output_stream(loc.path) as fh:
            fh.write(data)

    def write_local() -> None:
        parent = posixpath.dirname(loc.path)
        loc.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
        with loc.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        _move_into_place(loc.fs, tmp, loc.path)

    if loc.is_s3:
        check_bucket(loc)
    _call(loc, upload if loc.is_s3 else write_local, "writing")


def write_text(uri: str | Location, text: str) -> None:
    write_bytes(uri, text.encode())


def read_json(uri: str | Location) -> dict:
    return json.loads(read_bytes(uri))


def write_json(uri: str | Location, obj: object) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_parquet(uri: str | Location, table) -> int:
    """Write a pyarrow Table as one Parquet file, atomically like :func:`write_bytes`; returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    write_bytes(uri, data)
    return len(data)


def read_parquet(uri: str | Location):
    """Read one Parquet file into a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(uri)))


def makedirs(uri: str | Location) -> None:
    loc = resolve(uri) if isinstance(uri, str) else uri
    if loc.is_s3:
        check_bucket(loc)
        return  # S3 has no folders
    loc.fs.create_dir(loc.path, recursive=True)


def delete_dir(uri: str | Location) -> None:
    loc = resolve(uri) if isinstance(uri, str) else uri
    if info(loc).type == pafs.FileType.Directory:
        _call(loc, lambda: loc.fs.delete_dir(loc.path), "deleting")


def delete_file(uri: str | Location) -> None:
    """Delete one file or object if it is there."""
    loc = resolve(uri) if isinstance(uri, str) else uri
    if info(loc).type == pafs.FileType.File:
        _call(loc, lambda: loc.fs.delete_file(loc.path), "deleting")


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder between any two locations (used to upload local data or models to S3)."""
    s, d = resolve(src), resolve(dst)
    if d.is_s3:
        check_bucket(d)
    _call(d, lambda: pafs.copy_files(s.path, d.path, source_filesystem=s.fs, destination_filesystem=d.fs), "copying to")


# ----------------------------------------------------------------------------- roots: where a job may read


def canonical_uri(uri: str) -> str:
    """One spelling per input. ``file://`` is dropped and a local path made absolute and normalised (``a/./b``,
    ``a//b`` and ``a/x/../b`` all become ``a/b``; lexically: links are :func:`within_roots`' business). An S3 key
    is normalised likewise, unless it holds a ``..`` segment: S3 keys are literal, so such a URI is kept as
    written (and :func:`within_roots` refuses it). Another scheme is returned unchanged (never within a root)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if ".." in key.split("/"):
            return uri
        key = posixpath.normpath(key) if key else "."
        return f"s3://{bucket}" if key == "." else f"s3://{bucket}/{key}"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def root_of(uri: str) -> str:
    """``uri`` as a root for :func:`within_roots`: a local folder's (or file's) real path, or a canonical S3
    bucket or prefix."""
    canonical = canonical_uri(uri)
    if canonical.startswith("s3://"):
        if ".." in canonical.split("/"):
            raise KdrayError(f"{uri}: a root may not hold a '..' segment")
        return canonical
    if "://" in canonical:
        raise KdrayError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return os.path.realpath(canonical)


def _under(path: str, root: str, sep: str) -> bool:
    return path == root or path.startswith(root.rstrip(sep) + sep)


def within_roots(uri: str, roots: Sequence[str]) -> str | None:
    """Where ``uri`` really is, if that is inside one of ``roots`` (made by :func:`root_of`); None otherwise.

    Local: the real path, every link resolved, so that ``..`` and links pointing out are caught wherever they
    are (callers open this path, not ``uri``). S3: the canonical URI, under a root's bucket and prefix (a prefix
    ends at a ``/``: ``s3://b/scans`` does not hold ``s3://b/scans-old/x``); a key with a ``..`` segment is never
    inside. Checked where a read happens, it also catches a link swapped in after listing."""
    canonical = canonical_uri(uri)
    if canonical.startswith("s3://"):
        if ".." in canonical[len("s3://"):].split("/"):
            return None
        inside = any(r.startswith("s3://") and _under(canonical, r, "/") for r in roots)
        return canonical if inside else None
    if "://" in canonical:
        return None
    real = os.path.realpath(canonical)
    return real if any("://" not in r and _under(real, r, os.sep) for r in roots) else None


# ----------------------------------------------------------------------------- listing a local folder


def walk_local(root: str, roots: Sequence[str] = ()) -> list[str]:
    """Every entry below a local folder that is not a folder, as paths relative to ``root``, sorted.

    Unlike a recursive listing that follows links, this walks each real folder once (loops are recognised by
    ``(st_dev, st_ino)``, so a link to a parent adds nothing) and follows a link, to a file or a folder, only
    when its target's real path lies inside ``root``'s real path or one of ``roots``. The real tree is walked
    first and links after it, so a file reached both ways is listed once, under its own name. What the reader
    must refuse is listed, not hidden: a link that points out (``outside_roots`` when read), a broken link
    (``missing``), a FIFO, device or socket (``not_a_file``)."""
    top = os.path.realpath(root)
    allowed = [top, *(r for r in roots if "://" not in r)]
    seen: set[tuple[int, int]] = set()  # real folders walked and files listed
    found: list[str] = []
    links: deque[tuple[str, str]] = deque()  # (name, path): followed once the real tree is listed

    def walk(path: str, prefix: str, via_link: bool = False) -> None:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise KdrayError(f"{path}: cannot list this folder ({exc.strerror or type(exc).__name__})") from None
        for entry in entries:
            name = prefix + entry.name
            if entry.is_symlink():
                links.append((name, entry.path))
            elif entry.is_dir(follow_symlinks=False):
                walk(entry.path, name + "/", via_link)
            else:
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if via_link and (st.st_dev, st.st_ino) in seen:
                        continue  # listed already (hard links in the real tree keep their names)
                    seen.add((st.st_dev, st.st_ino))
                found.append(name)

    walk(top, "")
    while links:
        name, path = links.popleft()
        if not any(_under(os.path.realpath(path), r, os.sep) for r in allowed):
            found.append(name)  # points out: refused when read
            continue
        try:
            st = os.stat(path)
        except OSError:
            found.append(name)  # broken, or a loop of links: missing when read
            continue
        if stat.S_ISDIR(st.st_mode):
            walk(path, name + "/", via_link=True)
        elif (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            found.append(name)
    return sorted(found)


def list_tree(loc: Location, roots: Sequence[str] = ()) -> list[str]:
    """Every input below a folder or S3 prefix, as paths relative to it, sorted: S3 objects (:func:`list_files`),
    or a local folder walked by :func:`walk_local`."""
    if loc.is_s3:
        return [posixpath.relpath(f.path, loc.path) for f in list_files(loc)]
    kind = info(loc).type
    if kind == pafs.FileType.NotFound:
        raise KdrayError(f"{loc.uri}: no such file or folder")
    if kind != pafs.FileType.Directory:
        raise KdrayError(f"{loc.uri}: is a file, expected a folder")
    return walk_local(loc.path, roots)


# ----------------------------------------------------------------------------- one run per output folder

LOCK_TTL_S, LOCK_HEARTBEAT_S = 60.0, 10.0
#: Releasing a lock tries once: at the end of a run that S3 stopped, waiting again for S3 would only delay the
#: error (the next run on this host takes a dead holder's lock over at once anyway).
RELEASE_BUDGET_S = 0.0


class OutputLocked(KdrayError):
    """Another live run holds the output folder."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc/<pid>/stat``, clock ticks since boot): with the pid it names one
    process, whatever reuses the pid later. None when there is no such live process (a zombie counts as gone);
    "" when it exists but this system has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()  # the name, in parentheses, may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return None if os.path.isdir("/proc/self") else _process_exists(pid)
    except OSError:
        return _process_exists(pid)
    return None if fields[0] in (b"Z", b"X") else fields[19].decode()


def _process_exists(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # someone else's process: it exists
    return ""


def _machine() -> str:
    """This kernel and pid namespace: a pid means the same process only where both are the same."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def read_lock(loc: Location, budget_s: float | None = None) -> dict | None:
    """The record in a lock file, None when there is none ({} when it cannot be parsed)."""
    def read() -> bytes | None:
        try:
            with loc.fs.open_input_stream(loc.path) as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    data = _call(loc, read, "reading", budget_s)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def lock_holder_gone(record: dict, ttl_s: float, now: float | None = None) -> str:
    """Why the holder of ``record`` is dead ("" when it may be alive): on this machine, its process is gone (or
    its pid is another process now); anywhere, its heartbeat is older than ``ttl_s``."""
    if not record.get("run"):
        return "the lock file is unreadable"
    if record.get("host") == socket.gethostname() and record.get("machine") == _machine():
        started = process_start(int(record.get("pid") or 0))
        if started is None or started and record.get("started") and started != record["started"]:
            return f"its process {record.get('pid')} on this host is gone"
    age = (time.time() if now is None else now) - float(record.get("heartbeat") or 0)
    return f"its heartbeat is {age:.0f} s old (over {ttl_s:.0f} s)" if age > ttl_s else ""


class OutputLock:
    """One run at a time in an output folder: a lock file there names the run that holds it.

    The record holds a run id (uuid4), the host, the pid with its start time, and a heartbeat that a daemon thread
    renews every ``heartbeat_s``. A holder is dead when its process on this host is gone (so a run killed with
    ``kill -9`` and started again here takes over at once) or when its heartbeat is older than ``ttl_s`` (a run
    on another machine). Acquiring writes the record, waits ``settle_s`` and reads it back: of two runs that
    write at once only the one read back holds the lock, on S3 as on a local disk. The holder's workers check
    :meth:`names` before they commit anything (fencing), and the heartbeat stops, with :attr:`lost` set, once
    the file names another run. Released (deleted, if it still names this run) when the run ends."""

    def __init__(self, loc: Location, ttl_s: float = LOCK_TTL_S, heartbeat_s: float = LOCK_HEARTBEAT_S,
                 settle_s: float | None = None, what: str = "run"):
        self.loc, self.ttl_s, self.heartbeat_s, self.what = loc, ttl_s, heartbeat_s, what
        self.settle_s = (1.0 if loc.is_s3 else 0.05) if settle_s is None else settle_s
        self.run_id = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # a heartbeat never writes after release
        self._thread: threading.Thread | None = None
        self._record = {"run": self.run_id, "host": socket.gethostname(), "machine": _machine(),
                        "pid": os.getpid(), "started": process_start(os.getpid()) or "", "acquired": time.time()}

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "OutputLock":
        """Take the lock, or raise :class:`OutputLocked` (one line: the holder and what to do)."""
        folder = posixpath.dirname(self.loc.uri)
        for _ in range(3):
            holder = read_lock(self.loc)
            if holder is not None:
                gone = lock_holder_gone(holder, self.ttl_s)
                if not gone:
                    age = time.time() - float(holder.get("heartbeat") or 0)
                    raise OutputLocked(
                        f"{folder} is in use by another {self.what} (run {holder.get('run')}, host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago); wait for it to "
                        f"end or stop it, then run again (a run whose heartbeat stops for {self.ttl_s:.0f} s is "
                        "taken over)")
                log.warning("taking over %s from run %s on %s: %s", self.loc.uri, holder.get("run"),
                            holder.get("host"), gone)
            self._write()
            time.sleep(self.settle_s)
            if self.names(self.run_id):
                self._remove_dead_writes()
                self._thread = threading.Thread(target=self._beat, name="kdray-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
        raise OutputLocked(f"{folder}: other runs kept replacing its lock; run again once they are done")

    def names(self, run_id: str) -> bool:
        """Whether the lock file names ``run_id`` now."""
        return (read_lock(self.loc) or {}).get("run") == run_id

    def holds(self) -> bool:
        """Whether this run still holds the lock (the file names it, and no other run took it over)."""
        return not self.lost and self.names(self.run_id)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it still names this run. Never raises: a lock left
        behind is a dead holder's, taken over by the next run."""
        self._stop.set()
        if not self._mutex.acquire(timeout=max(self.heartbeat_s, 1.0)):
            log.warning("left %s in place: its heartbeat is still writing", self.loc.uri)
            return
        try:
            def delete() -> None:
                if (read_lock(self.loc, RELEASE_BUDGET_S) or {}).get("run") == self.run_id:
                    self.loc.fs.delete_file(self.loc.path)

            _call(self.loc, delete, "deleting", RELEASE_BUDGET_S)
        except (OSError, KdrayError) as exc:
            log.warning("could not remove %s (%s); the next run takes it over", self.loc.uri,
                        first_line(exc))
        finally:
            self._mutex.release()

    def _write(self) -> None:
        write_json(self.loc, {**self._record, "heartbeat": time.time(), "ttl_s": self.ttl_s})

    def _remove_dead_writes(self) -> None:
        """The temporary copies of the lock file that a killed holder left (local folders; see write_bytes). Once
        this run holds the lock, no one else is writing it."""
        if self.loc.is_s3:
            return
        folder, name = posixpath.split(self.loc.path)
        for entry in os.scandir(folder):
            if entry.name.startswith(".tmp-") and entry.name.endswith(f"-{name}"):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    if not self.names(self.run_id):
                        self.lost = True
                        log.error("%s no longer names this run (%s): another run took over", self.loc.uri,
                                  self.run_id)
                        return
                    self._write()
                except Exception as exc:  # noqa: BLE001 - keep beating: the next renewal may get through
                    log.warning("could not renew %s (%s); trying again in %.0f s", self.loc.uri,
                                first_line(exc), self.heartbeat_s)
