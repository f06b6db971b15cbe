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
(``kdray.raycluster.FORWARDED_ENV``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kdray import KdrayError

log = logging.getLogger(__name__)

#: Seconds to wait between writing a local file's temporary copy and renaming it (tests only: it lets a test
#: kill a job in the middle of a write). Read once, at import, from KDRAY_FAULT_WRITE_DELAY_S.
_WRITE_DELAY_S = float(os.environ.get("KDRAY_FAULT_WRITE_DELAY_S", "0") or 0)

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
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(" operation: ", 1)[-1].split(";", 1)[0].strip()[:120]


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


def _call(loc: Location, fn: Callable[[], object], what: str = "accessing"):
    """A storage operation on ``loc``: :func:`retrying`, then any other OSError as one line (:func:`_explain`);
    FileNotFoundError is left to the caller."""
    try:
        return retrying(fn, loc.uri, what)
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
        if "AccessDenied" in text or "InvalidAccessKeyId" in text or "403" in text:
            return KdrayError(f"{loc.uri}: S3 refused access; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return KdrayError(f"{loc.uri}: {text.splitlines()[0][:200] if text else type(exc).__name__}")


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


def read_bytes(uri: str | Location) -> bytes:
    loc = resolve(uri) if isinstance(uri, str) else uri

    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as fh:
            return fh.read()

    try:
        return _call(loc, read, "reading")
    except FileNotFoundError:
        raise KdrayError(f"{loc.uri}: no such file") from None


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
        if _WRITE_DELAY_S:  # fault injection for the kill-during-a-write tests
            time.sleep(_WRITE_DELAY_S)
        loc.fs.move(tmp, loc.path)

    if loc.is_s3:
        check_bucket(loc)
    _call(loc, upload if loc.is_s3 else write_local, "writing")


def write_text(uri: str | Location, text: str) -> None:
    write_bytes(uri, text.encode())


def read_json(uri: str | Location) -> dict:
    return json.loads(read_bytes(uri))


def write_json(uri: str | Location, obj: object) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_parquet(uri: str | Location, table) -> None:
    """Write a pyarrow Table as one Parquet file, atomically like :func:`write_bytes`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


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


def local_copy(uri: str, cache_root: str) -> str:
    """Return a local path holding ``uri`` (a file or folder), downloading it from S3 if needed."""
    loc = resolve(uri)
    if not loc.is_s3:
        if not exists(loc):
            raise KdrayError(f"{uri}: no such file or folder")
        return loc.path
    dest = os.path.join(cache_root, loc.path.replace("/", "__"))
    if info(loc).type == pafs.FileType.Directory:
        copy_dir(uri, dest)
    else:
        write_bytes(dest, read_bytes(loc))
    return dest
