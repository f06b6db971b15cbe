"""Reading untrusted inputs: one local file, or the members of a tar stream, and what a failure to read means.

Scoring, training and ``kdray predict`` read files that nobody here wrote. Everything here reads only what it
must, and says why when it will not:

- :func:`read_local`: a local regular file, checked before it is opened and opened without blocking (a FIFO
  would wait for a writer forever), never more than the byte limit read (:func:`open_local`);
- :func:`tar_members`: a tar stream, one member at a time, with the members that are not plain files, the
  sparse ones, the ones over the limits and oversized extended headers refused before their data is read;
- :func:`read_failure_reason`: the reason code of a failure. Every one is terminal (the input counts as
  done) except ``io_error``, a failure that may pass, which the caller retries.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tarfile

import pyarrow.fs as pafs

from kdray import KdrayError, first_line, storage
from kdray.images import (CORRUPT, FILE_TOO_LARGE, FORBIDDEN, IO_ERROR, MISSING, NOT_A_FILE, SPARSE_MEMBER,
                          TOO_LARGE, ImageLimits, ImageRefused, check_file_size)

METADATA_SUFFIXES = (".json", ".txt", ".cls", ".cls2", ".xml", ".yaml", ".yml", ".csv", ".npy", ".pth")
#: An extended tar header (pax, GNU long name) is read whole by tarfile: a larger one is refused first.
MAX_TAR_HEADER_BYTES = 2**20
_EXTENDED_TAR_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK)


class TarHeaderTooLarge(tarfile.HeaderError):
    """An extended tar header over :data:`MAX_TAR_HEADER_BYTES`, refused before tarfile reads it into memory.

    A plain HeaderError subclass on purpose: tarfile's ``next()`` ends the archive quietly on an
    InvalidHeaderError past the first member, and re-raises this one."""


def is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))



#: errno values that mean the input is not there, for good: a name that leads nowhere.
_MISSING_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
#: What a missing object or refused access looks like in pyarrow's S3 messages ("AWS Error <type> during ...").
_S3_FORBIDDEN = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|HTTP status 403")
_S3_MISSING = re.compile(r"NO_SUCH_KEY|NoSuchKey|NO_SUCH_BUCKET|NoSuchBucket|RESOURCE_NOT_FOUND|HTTP status 404")


def read_failure_reason(exc: BaseException) -> str:
    """The reason code for an input that could not be read or decoded. Only a failure that may pass is ``io_error``
    (an S3 5xx or timeout after the retries, EIO, ESTALE, a stream cut in the middle…): its shard stays
    unfinished so that a re-run retries it. Everything else is terminal: not there (``missing``), not allowed
    (``forbidden``), not a file, or the decoder's refusal."""
    if isinstance(exc, ImageRefused):
        return exc.reason
    if isinstance(exc, tarfile.TarError):
        return CORRUPT
    if isinstance(exc, PermissionError):
        return FORBIDDEN
    if isinstance(exc, IsADirectoryError):
        return NOT_A_FILE
    if isinstance(exc, OSError):
        if isinstance(exc, FileNotFoundError) or exc.errno in _MISSING_ERRNOS:
            return MISSING
        if _S3_FORBIDDEN.search(str(exc)):
            return FORBIDDEN
        if _S3_MISSING.search(str(exc)):
            return MISSING
    return IO_ERROR


def failure_message(exc: BaseException) -> str:
    """One line for an error row: the OS's words for a local failure (not the path: the row has it)."""
    if isinstance(exc, ImageRefused):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})" if exc.errno else exc.strerror
    return first_line(exc, 300)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a link"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_local(path: str):
    """A local regular file, opened for reading (``path`` is real: :func:`kdray.storage.within_roots`); returns
    (file, size). Anything else is refused (``not_a_file``) without reading from it: it is checked with lstat
    before it is opened (opening some devices has effects), opened without blocking (a FIFO would wait for a
    writer forever) and without following a last link (one swapped in since the check), and checked again."""
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ImageRefused(NOT_A_FILE, f"{_file_kind(mode)}, not a regular file; not read")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRefused(NOT_A_FILE, f"{_file_kind(st.st_mode)}, not a regular file; not read")
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_local(path: str, limits: ImageLimits) -> bytes:
    """A local input's bytes (:func:`open_local`): a file over the byte limit is refused from its size, and no more
    than the limit + 1 bytes are ever read (it may grow meanwhile)."""
    fh, size = open_local(path)
    with fh:
        check_file_size(size, limits)
        data = fh.read(size + 1)  # (sized by the file, not by the limit: a read allocates what it asks for)
        if len(data) > size:  # it grew since
            data += fh.read(limits.max_bytes + 1 - len(data))
    check_file_size(len(data), limits)
    return data


def read_location(loc: storage.Location, limits: ImageLimits) -> bytes:
    """An input's bytes, local (:func:`read_local`; ``loc.path`` real) or on S3: one GET (no HEAD first) read to
    at most the byte limit + 1, an unreachable S3 retried (:func:`kdray.storage.retrying`)."""
    if not loc.is_s3:
        return read_local(loc.path, limits)

    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as fh:
            data = fh.read(limits.max_bytes + 1)
        check_file_size(len(data), limits)
        return data

    return storage.retrying(read, loc.uri, "reading")


def read_named(uri: str, limits: ImageLimits, fs=None) -> bytes:
    """A file the user named (``kdray predict FILE``, a training set's listing): as :func:`read_location`, through
    its links (a named link is the user's choice; scoring's roots do not apply). With ``fs``, ``uri`` is a path in
    that filesystem (bucket/key on S3), which is reused."""
    if fs is None:
        loc = storage.resolve(uri)
    else:  # a path inside ``fs``: bucket/key on S3
        loc = storage.Location(fs, uri, f"s3://{uri}" if isinstance(fs, pafs.S3FileSystem) else uri)
    if not loc.is_s3:
        loc = storage.Location(loc.fs, os.path.realpath(loc.path), loc.uri)
    return read_location(loc, limits)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that reads no more of the headers than a member's refusal needs: an extended header (pax, GNU
    long name or link) over :data:`MAX_TAR_HEADER_BYTES` is refused (tarfile reads one whole, before it returns
    the member it describes), and a sparse member's map is passed over unread (tarfile keeps it as a list that
    grows with the archive; the member is refused as ``sparse_member`` anyway)."""

    def _proc_member(self, tar):
        if self.type in _EXTENDED_TAR_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise TarHeaderTooLarge(f"an extended header of {self.size:,} bytes (at most {MAX_TAR_HEADER_BYTES:,} "
                                    "are read)")
        return super()._proc_member(tar)

    def _proc_sparse(self, tar):
        """A GNU sparse ('S') member: its extension blocks are skipped one at a time instead of collected."""
        _, extended, real_size = self._sparse_structs
        del self._sparse_structs
        while extended:
            block = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data in a sparse member's map")
            extended = bool(block[504])  # the last extension block says so
        self.sparse = []
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + self._block(self.size)
        self.size = real_size
        return self

    def _proc_gnusparse_10(self, next, pax_headers, tar):  # noqa: A002 - tarfile's name for the member
        """A pax GNU sparse 1.0 member: its map, at the start of its data, is left unread with the data."""
        next.sparse = []


def open_tar(fileobj) -> tarfile.TarFile:
    """A tar stream for :func:`tar_members` (reads the first header)."""
    return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_BoundedTarInfo)


def tar_members(tar: tarfile.TarFile, tar_uri: str, limits: ImageLimits, max_tar_bytes: int):
    """``(name, read)`` for each input member of a tar stream, one member at a time: ``read()`` returns that
    member's bytes, and must be called before the next member is asked for. No member's data is read until then,
    and none that is refused: a sparse member (``sparse_member``: tarfile would expand its holes), a link,
    device or FIFO (``not_a_file``), a member over the byte limit (``file_too_large``), and every member once
    those read have passed ``max_tar_bytes`` (``too_large``). Folders, hidden and metadata members are skipped.
    A failure in the stream ends it with a row for the tar itself (``corrupt`` or, if it may pass, ``io_error``);
    the rows before it stand."""
    read_total = 0
    while True:
        try:
            member = tar.next()
        except Exception as exc:  # noqa: BLE001 - tarfile's parser also raises ValueError & co. on bad headers
            yield tar_failure(tar_uri, exc)
            return
        if member is None:
            return
        tar.members.clear()  # a stream needs no index of the members passed (their headers would pile up)
        if member.isdir() or is_hidden(member.name) or member.name.lower().endswith(METADATA_SUFFIXES):
            continue
        name = f"{tar_uri}#{member.name}"
        if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
            yield name, refusal(SPARSE_MEMBER, f"a sparse member of {member.size:,} bytes expanded; not read")
        elif not member.isfile():
            yield name, refusal(NOT_A_FILE, f"{_member_kind(member)}, not a file; not read")
        elif member.size > limits.max_bytes:
            yield name, refusal(FILE_TOO_LARGE, f"member is {member.size:,} bytes; at most {limits.max_bytes:,} "
                                                "are accepted")
        elif read_total > max_tar_bytes:
            yield name, refusal(TOO_LARGE, f"the tar shard's members passed {max_tar_bytes:,} bytes read; "
                                           "not read")
        else:
            read_total += member.size
            yield name, lambda member=member: tar.extractfile(member).read()


def tar_failure(tar_uri: str, exc: Exception):
    """The row for a tar shard that cannot be read (on): ``corrupt``, or ``io_error`` when the failure may pass."""
    reason = read_failure_reason(exc) if isinstance(exc, (OSError, KdrayError, tarfile.TarError)) else CORRUPT
    return tar_uri, refusal(reason, f"cannot read the tar shard: {failure_message(exc)}")


def _member_kind(member: tarfile.TarInfo) -> str:
    kinds = (("issym", "a symbolic link"), ("islnk", "a hard link"), ("ischr", "a character device"),
             ("isblk", "a block device"), ("isfifo", "a FIFO"))
    return next((name for test, name in kinds if getattr(member, test)()), f"a member of type {member.type!r}")


def refusal(reason: str, message: str):
    """A ``read`` for an input refused before reading: it raises the refusal."""
    def read():
        raise ImageRefused(reason, message)
    return read
