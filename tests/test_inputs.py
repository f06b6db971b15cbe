"""kdray.inputs: untrusted files and tar streams read only as far as they deserve, and what a failure means."""

from __future__ import annotations

import errno
import io
import os
import tarfile
import tracemalloc

import pytest

from hostile import add_member, gnu_sparse_member, hostile_tar, noise_png
from kdray import inputs
from kdray.images import ImageLimits, ImageRefused

pytestmark = pytest.mark.unit


def png(seed: int = 0) -> bytes:
    return noise_png(64, seed)


def tar_outcomes(fileobj, limits: ImageLimits, max_tar_bytes: int = 2**30) -> dict[str, object]:
    """member (or "<tar>") → bytes read, or the reason code, as a scoring actor would see them."""
    outcomes = {}
    with inputs.open_tar(fileobj) as tar:
        for name, read in inputs.tar_members(tar, "shard.tar", limits, max_tar_bytes):
            key = name.partition("#")[2] or "<tar>"
            try:
                outcomes[key] = len(read())
            except (ImageRefused, OSError, tarfile.TarError) as exc:
                outcomes[key] = inputs.read_failure_reason(exc)
    return outcomes


def test_tar_members_are_streamed_and_refused_without_reading_them(tmp_path):
    """A 10 kB shard whose sparse member declares 64 MiB: refused, and nothing read it (the peak stays small)."""
    hostile_tar(tmp_path / "a.tar", png())
    assert (tmp_path / "a.tar").stat().st_size < 100_000
    tracemalloc.start()
    try:
        with open(tmp_path / "a.tar", "rb") as fh:
            outcomes = tar_outcomes(fh, ImageLimits(max_bytes=50_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcomes == {"ok.png": len(png()), "sparse.png": "sparse_member", "link.png": "not_a_file",
                        "pipe.png": "not_a_file", "big.png": "file_too_large"}
    assert peak < 2 * 2**20, peak
    with open(tmp_path / "a.tar", "rb") as fh:  # once the members read pass the shard's cap, the rest are not read
        assert tar_outcomes(fh, ImageLimits(), max_tar_bytes=100) == {
            "ok.png": len(png()), "sparse.png": "sparse_member", "link.png": "not_a_file", "pipe.png": "not_a_file",
            "big.png": "too_large"}


def test_a_sparse_members_map_is_not_read_either(tmp_path):
    """tarfile would keep a sparse member's map as a list that grows with the archive (GNU extension blocks, a pax
    GNU.sparse 1.0 map): both are passed over, and the member after them is read from the right offset."""
    with tarfile.open(tmp_path / "maps.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        sparse = gnu_sparse_member("gnu.png", b"x" * 1000, 64 * 2**20, extension_blocks=4000)
        tar.fileobj.write(sparse)
        tar.offset += len(sparse)
        regions = 200_000
        sparse_map = b"%d\n" % regions + b"1024\n1024\n" * regions
        sparse_map += b"\0" * (-len(sparse_map) % tarfile.BLOCKSIZE)
        add_member(tar, "GNUSparseFile.0/pax.png", sparse_map + b"x" * 1000, pax_headers={
            "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "pax.png",
            "GNU.sparse.realsize": str(64 * 2**20)})
        add_member(tar, "after.png", png())
    tracemalloc.start()
    try:
        with open(tmp_path / "maps.tar", "rb") as fh:
            outcomes = tar_outcomes(fh, ImageLimits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcomes == {"gnu.png": "sparse_member", "pax.png": "sparse_member", "after.png": len(png())}
    assert peak < 2**20, peak


def test_an_extended_tar_header_over_1_mib_is_refused_before_it_is_read(tmp_path):
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "first.png", png())
        add_member(tar, "second.png", png(seed=1), pax_headers={"comment": "x" * (8 * 2**20)})
    with tarfile.open(tmp_path / "long.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "d/" * (2**20) + "x.png", png())  # a GNU long name of 2 MiB, first in the shard
    tracemalloc.start()
    try:
        with open(tmp_path / "pax.tar", "rb") as fh:
            assert tar_outcomes(fh, ImageLimits()) == {"first.png": len(png()), "<tar>": "corrupt"}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    with open(tmp_path / "long.tar", "rb") as fh, pytest.raises(inputs.TarHeaderTooLarge, match="2,097,"):
        inputs.open_tar(fh)


def test_a_tar_failing_in_mid_stream_keeps_the_rows_before(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add_member(tar, "first.png", png())
        add_member(tar, "second.png", os.urandom(40_000))
        add_member(tar, "third.png", png(seed=2))

    class FailingDisk(io.FileIO):  # EIO once the reads pass 20 kB
        def read(self, size=-1):
            if self.tell() > 20_000:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size)

    with FailingDisk(tmp_path / "a.tar") as fh:
        outcomes = tar_outcomes(fh, ImageLimits())
    assert outcomes["first.png"] == len(png()) and outcomes["<tar>"] == "io_error"
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:30_000])  # cut in the middle of second.png: corrupt, and so is the tar
    with open(tmp_path / "cut.tar", "rb") as fh:
        assert tar_outcomes(fh, ImageLimits()) == {"first.png": len(png()), "second.png": "corrupt", "<tar>": "corrupt"}


@pytest.mark.parametrize("error, reason", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "missing"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), "missing"),
    (PermissionError(errno.EACCES, "Permission denied"), "forbidden"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), "not_a_file"),
    (OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"), "forbidden"),
    (OSError("AWS Error NO_SUCH_BUCKET during GetObject operation: The specified bucket does not exist"), "missing"),
    (OSError(errno.EIO, "Input/output error"), "io_error"),
    (OSError(errno.ESTALE, "Stale file handle"), "io_error"),
    (OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 18, Transferred a partial file"),
     "io_error"),
    (tarfile.ReadError("unexpected end of data"), "corrupt"),
    (ImageRefused("truncated", "cut short"), "truncated"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_read_failures_are_terminal_except_transient_ones(error, reason):
    assert inputs.read_failure_reason(error) == reason




@pytest.mark.timeout(30)
def test_a_named_file_is_read_through_its_links_but_a_fifo_or_an_oversized_file_is_not(tmp_path):
    """kdray predict and training read what the user named: a link is followed, a FIFO is refused without
    blocking (nobody will ever write to it), and a file over the byte limit is refused from its size."""
    (tmp_path / "x.png").write_bytes(png())
    os.symlink(tmp_path / "x.png", tmp_path / "link.png")
    assert inputs.read_named(str(tmp_path / "link.png"), ImageLimits()) == png()
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(ImageRefused) as refused:
        inputs.read_named(str(tmp_path / "fifo.png"), ImageLimits())
    assert refused.value.reason == "not_a_file" and "FIFO" in str(refused.value)
    with open(tmp_path / "huge.png", "wb") as fh:
        fh.truncate(2**30)  # a sparse gigabyte: reading it would allocate it
    with pytest.raises(ImageRefused) as refused:
        inputs.read_named(str(tmp_path / "huge.png"), ImageLimits(max_bytes=2**20))
    assert refused.value.reason == "file_too_large"
