"""One storage layer: URIs (local path, file://, s3://bucket/prefix) → pyarrow filesystem + path.

S3 settings come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). Writes are atomic: local files are written to a
temporary name and renamed; S3 objects appear whole when their upload completes, and
multi-file outputs are committed by writing a marker last.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kdray import KdrayError

#: Seconds to wait between writing a local file's temporary copy and renaming it (tests only: it lets a test
#: kill a job in the middle of a write). Read once, at import, from KDRAY_FAULT_WRITE_DELAY_S.
_WRITE_DELAY_S = float(os.environ.get("KDRAY_FAULT_WRITE_DELAY_S", "0") or 0)


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
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    kwargs.update(connect_timeout=5, request_timeout=30, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    return pafs.S3FileSystem(**kwargs)


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
        if any(s in text for s in ("Couldn't connect", "curlCode", "connect to", "Connection refused", "Timeout")):
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
            return KdrayError(f"{loc.uri}: cannot reach S3 at {endpoint} ({text.splitlines()[0][:160]})")
        if "AccessDenied" in text or "InvalidAccessKeyId" in text or "403" in text:
            return KdrayError(f"{loc.uri}: S3 refused access; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return KdrayError(f"{loc.uri}: {text.splitlines()[0][:200] if text else type(exc).__name__}")


def info(loc: Location) -> pafs.FileInfo:
    try:
        return loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise _explain(loc, exc) from None


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
    try:
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except OSError as exc:
        raise _explain(loc, exc) from None
    return sorted((f for f in found if f.type == pafs.FileType.File), key=lambda f: f.path)


def check_bucket(loc: Location) -> None:
    """Raise a clear error if the S3 bucket of ``loc`` does not exist or cannot be reached."""
    bucket = loc.path.split("/", 1)[0]
    bucket_info = info(Location(loc.fs, bucket, f"s3://{bucket}"))
    if bucket_info.type == pafs.FileType.NotFound:
        raise KdrayError(f"{loc.uri}: S3 bucket {bucket!r} does not exist")


def read_bytes(uri: str | Location) -> bytes:
    loc = resolve(uri) if isinstance(uri, str) else uri
    try:
        with loc.fs.open_input_stream(loc.path) as fh:
            return fh.read()
    except FileNotFoundError:
        raise KdrayError(f"{loc.uri}: no such file") from None
    except OSError as exc:
        raise _explain(loc, exc) from None


def write_bytes(uri: str | Location, data: bytes) -> None:
    """Write atomically: a reader sees the old object or the whole new one, never a part."""
    loc = resolve(uri) if isinstance(uri, str) else uri
    try:
        if loc.is_s3:
            check_bucket(loc)
            with loc.fs.open_output_stream(loc.path) as fh:  # S3: the object appears when the upload completes
                fh.write(data)
            return
        parent = posixpath.dirname(loc.path)
        loc.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
        with loc.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        if _WRITE_DELAY_S:  # fault injection for the kill-during-a-write tests
            time.sleep(_WRITE_DELAY_S)
        loc.fs.move(tmp, loc.path)
    except OSError as exc:
        raise _explain(loc, exc) from None


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
        loc.fs.delete_dir(loc.path)


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder between any two locations (used to upload local data or models to S3)."""
    s, d = resolve(src), resolve(dst)
    if d.is_s3:
        check_bucket(d)
    pafs.copy_files(s.path, d.path, source_filesystem=s.fs, destination_filesystem=d.fs)


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
