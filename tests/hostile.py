"""The hostile-input corpus: files made by code, one case per class of attack on the loader, and a harness that
decodes each one in a child process under an address-space and a CPU limit, measuring its cost.

Each case is a file that costs a naive loader far more than its size (a decompression bomb, a compressed stream
whose own header disagrees with the DICOM header, a header that asks for an absurd allocation), or a valid but
heavy image whose decode the budget must admit and whose estimate must bound its real peak. Nothing here is a
binary blob: every file is built from its format's structure.

    python tests/hostile.py [--limits serving|scoring] [--size 224] [CASE ...]    # prints a table

:func:`run` writes the files to a temporary folder and starts one worker (this file, ``--worker``) with nothing
else imported; the worker warms the decoders up on tiny images, then forks one child per case. The child sets
``RLIMIT_AS`` (its current size + twice the decode budget + 512 MiB, so that a bomb dies of MemoryError instead
of taking the machine down) and ``RLIMIT_CPU``, resets its peak RSS (``/proc/self/clear_refs``), runs
:func:`kdray.images.load_image` once, and reports the outcome, the reason code, the growth of its peak RSS
(``VmHWM``) and its CPU seconds. ``MALLOC_MMAP_THRESHOLD_`` makes glibc map every large buffer afresh, so that
memory freed by earlier work cannot hide a peak.

bench/hostile.py runs the same files through ``kdray predict``, ``jobs.score`` and a live ``/predict``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OK = "ok"
MiB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    attack: str  # what a naive loader does with it
    make: Callable[[], bytes]
    expect: dict[str, str]  # limits name ("serving", "scoring") -> reason code, or "ok"


@dataclass(frozen=True)
class Outcome:
    case: str
    outcome: str  # ok | refused | memory_error | killed | crashed
    reason: str  # the reason code when refused, "ok" when decoded
    message: str
    peak_rss_bytes: int  # growth of the child's peak RSS during load_image
    cpu_s: float
    estimate_bytes: int  # the decode budget's estimate (LoadedImage.decode_bytes), 0 when refused
    file_bytes: int


# ----------------------------------------------------------------------------- builders: raw formats


@functools.lru_cache(maxsize=None)
def _deflate_zeros(nbytes: int, row: int = 0, raw: bool = False) -> bytes:
    """zlib (or raw deflate) of ``nbytes`` zero bytes; with ``row``, a zero filter byte leads every ``row`` bytes
    (PNG scanlines). A full flush resets the compressor, so one compressed block stands for every repeat of it."""
    unit = row + 1 if row else 1
    block = bytes(unit * max(1, (4 * MiB) // unit))
    total = nbytes + (nbytes // row if row else 0)
    repeats, rest = divmod(total, len(block))
    compressor = zlib.compressobj(9, wbits=-15)
    piece = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = piece * repeats + compressor.compress(block[:rest]) + compressor.flush()
    if raw:
        return body
    adler = 1
    for _ in range(repeats):
        adler = zlib.adler32(block, adler)
    return b"\x78\x01" + body + struct.pack(">I", zlib.adler32(block[:rest], adler))


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 0, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) \
        + _chunk(b"IEND", b"")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_zeros(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A valid PNG of all-zero pixels, whatever its size (a few hundred bytes per megapixel)."""
    row = width * {0: 1, 2: 3, 4: 2, 6: 4}[color_type] * bit_depth // 8
    return png_header(width, height, bit_depth, color_type, _deflate_zeros(row * height, row))


def tiff(width: int, height: int, bits: int, samples: int, strip: bytes, *, compression: int = 1,
         sample_format: int = 1) -> bytes:
    """A little-endian TIFF with one IFD and one strip."""
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [bits] * samples), (259, 3, [compression]),
               (262, 3, [2 if samples == 3 else 1]), (273, 4, [0]), (277, 3, [samples]), (278, 4, [height]),
               (279, 4, [len(strip)]), (284, 3, [1]), (339, 3, [sample_format] * samples)]
    data_start = 8 + 2 + 12 * len(entries) + 4
    ifd, extra = bytearray(struct.pack("<H", len(entries))), bytearray()
    for tag, kind, values in entries:
        payload = struct.pack("<" + ("H" if kind == 3 else "I") * len(values), *values)
        if len(payload) <= 4:
            ifd += struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, len(values), data_start + len(extra))
            extra += payload
    ifd += b"\0\0\0\0"
    struct.pack_into("<I", ifd, 2 + 12 * 5 + 8, data_start + len(extra))  # StripOffsets: the strip follows
    return b"II*\0" + struct.pack("<I", 8) + bytes(ifd) + bytes(extra) + strip


def packbits_zeros(row_bytes: int, rows: int) -> bytes:
    runs, left = bytearray(), row_bytes
    while left:
        k = min(128, left)
        runs += bytes([257 - k, 0]) if k > 1 else b"\x00\x00"
        left -= k
    return bytes(runs) * rows


def _pillow(array: np.ndarray, fmt: str, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def noise_png(side: int = 64, seed: int = 0) -> bytes:
    """A small valid gray PNG of noise (a regular input beside the hostile ones)."""
    return _pillow(np.random.default_rng(seed).integers(0, 255, (side, side), dtype=np.uint8), "PNG")


def _texture(height: int, width: int, dtype=np.uint8, top: int = 255, seed: int = 0) -> np.ndarray:
    """Structure at two scales plus noise: compresses like a radiograph, not like zeros or pure noise."""
    rng = np.random.default_rng(seed)
    rows = np.sin(np.arange(height, dtype=np.float32) / 23)
    cols = np.cos(np.arange(width, dtype=np.float32) / 37)
    base = (np.add.outer(rows, cols) + 2) * (top * 0.23)
    base += rng.integers(0, max(2, top // 32), (height, width), dtype=np.uint16)
    return np.minimum(base, top).astype(dtype)


def jpeg_with_frame_size(width: int, height: int, *, progressive: bool = False) -> bytes:
    """A small real JPEG whose frame header (SOF) is rewritten to declare ``width`` × ``height``."""
    data = bytearray(_pillow(_texture(64, 64), "JPEG", quality=80, progressive=progressive))
    pos = _marker(data, {0xC0, 0xC2})
    struct.pack_into(">HH", data, pos + 5, height, width)
    return bytes(data)


def jpeg_with_scans(extra_scans: int) -> bytes:
    """A progressive JPEG with its last scan repeated: every scan is one more pass over the coefficients."""
    data = _pillow(_texture(512, 512), "JPEG", quality=80, progressive=True)
    last = data.rfind(b"\xff\xda")
    return data[:last] + data[last:-2] * (extra_scans + 1) + b"\xff\xd9"


def _marker(data: bytes | bytearray, markers: set[int]) -> int:
    pos = 2
    while data[pos + 1] not in markers:
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return pos


# ----------------------------------------------------------------------------- builders: DICOM


def dicom(rows: int, columns: int, pixel_data: bytes, *, bits: int = 16, samples: int = 1,
          photometric: str = "MONOCHROME2", transfer_syntax: str = "1.2.840.10008.1.2.1", frames: int | None = None,
          bits_stored: int | None = None, **attributes) -> bytes:
    """A DX DICOM file with the given header and pixel data as they are (encapsulated ones already wrapped)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, DigitalXRayImageStorageForPresentation, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Hostile^Corpus", "HOSTILE-1"
    ds.Modality = "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, samples, photometric
    ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data
    if meta.TransferSyntaxUID.is_encapsulated:
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_compressed(array: np.ndarray, transfer_syntax: str, **attributes) -> bytes:
    """A real compressed DICOM (pydicom's encoders: RLE itself, JPEG 2000 by openjpeg, JPEG-LS by CharLS)."""
    import pydicom

    bits = array.dtype.itemsize * 8
    ds = pydicom.dcmread(io.BytesIO(dicom(*array.shape[:2], array.tobytes(), bits=bits,
                                          bits_stored=attributes.pop("bits_stored", None), **attributes)))
    ds.compress(transfer_syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _first_fragment(data: bytes) -> bytes:
    import pydicom
    from pydicom.encaps import get_frame

    return get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0)


def _encapsulated(rows: int, columns: int, frame: bytes, transfer_syntax: str, **header) -> bytes:
    from pydicom.encaps import encapsulate

    return dicom(rows, columns, encapsulate([frame]), transfer_syntax=transfer_syntax, **header)


def j2k_with_size(header_side: int, width: int, height: int, tile: int | None = None) -> bytes:
    """A real 64 × 64 JPEG 2000 DICOM whose codestream's SIZ is rewritten (image and, optionally, tile size)."""
    from pydicom.uid import JPEG2000Lossless

    stream = bytearray(_first_fragment(dicom_compressed(_texture(64, 64, np.uint16, 4095), JPEG2000Lossless,
                                                        bits_stored=12)))
    siz = stream.find(b"\xff\x4f\xff\x51") + 4
    struct.pack_into(">II", stream, siz + 4, width, height)  # Xsiz, Ysiz (the offsets stay 0)
    if tile is not None:
        struct.pack_into(">II", stream, siz + 20, tile, tile)  # XTsiz, YTsiz
    return _encapsulated(header_side, header_side, bytes(stream), JPEG2000Lossless, bits_stored=12)


def jpeg_dicom_with_frame_size(width: int, height: int, ls: bool = False) -> bytes:
    """A 64 × 64 JPEG (baseline) or JPEG-LS DICOM whose stream's frame header declares ``width`` × ``height``."""
    from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

    if ls:
        stream = bytearray(_first_fragment(dicom_compressed(_texture(64, 64, np.uint16, 4095), JPEGLSLossless,
                                                            bits_stored=12)))
        pos = _marker(stream, {0xF7})
        struct.pack_into(">HH", stream, pos + 5, height, width)
        return _encapsulated(64, 64, bytes(stream), JPEGLSLossless, bits_stored=12)
    stream = jpeg_with_frame_size(width, height)
    return _encapsulated(64, 64, stream, JPEGBaseline8Bit, bits=8, photometric="MONOCHROME2")


def rle_frame(segments: list[bytes]) -> bytes:
    offsets, pos = [], 64
    for segment in segments:
        offsets.append(pos)
        pos += len(segment)
    return struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments))) + b"".join(segments)


def rle_dicom(rows: int, columns: int, segments: list[bytes], bits: int = 8) -> bytes:
    from pydicom.uid import RLELossless

    return _encapsulated(rows, columns, rle_frame(segments), RLELossless, bits=bits)


def deep_sequences(depth: int) -> bytes:
    """A DICOM whose header nests ``depth`` sequences (parsers recurse once per level)."""
    item = b""
    for _ in range(depth):  # (0040,A730) Content Sequence, undefined lengths
        item = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff" + item \
            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    base = dicom(64, 64, bytes(64 * 64 * 2))
    insert = base.find(b"\xe0\x7f\x10\x00")  # before Pixel Data, where a tag of group 0x0040 fits
    return base[:insert] + item + base[insert:]


# ----------------------------------------------------------------------------- builders: tar shards


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def gnu_sparse_member(name: str, stored: bytes, real_size: int, extension_blocks: int = 0) -> bytes:
    """A GNU sparse ('S') member: ``stored`` bytes in the archive that declare ``real_size`` bytes expanded, with
    ``extension_blocks`` more blocks of its map (21 regions each) after the header."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = b"%011o\0%011o\0" % (0, len(stored))  # one region: offset 0, the stored bytes
    header[482] = 1 if extension_blocks else 0
    header[483:495] = b"%011o\0" % real_size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    block = bytearray(b"%011o\0%011o\0" % (1, 1) * 21 + bytes(8))
    extensions = b"".join(bytes(block[:504]) + bytes([i < extension_blocks - 1]) + bytes(7)
                          for i in range(extension_blocks))
    return bytes(header) + extensions + stored + b"\0" * (-len(stored) % tarfile.BLOCKSIZE)


def hostile_tar(path: Path, ok: bytes) -> None:
    """``ok`` as ok.png, then a sparse member declaring 64 MiB, a symlink, a FIFO, a member of 60 kB and a
    folder."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "ok.png", ok)
        sparse = gnu_sparse_member("sparse.png", b"\x89PNG" * 2500, 64 * 2**20)
        tar.fileobj.write(sparse)
        tar.offset += len(sparse)
        add_member(tar, "link.png", kind=tarfile.SYMTYPE, linkname="/etc/hostname")
        add_member(tar, "pipe.png", kind=tarfile.FIFOTYPE)
        add_member(tar, "big.png", os.urandom(60_000))
        add_member(tar, "folder", kind=tarfile.DIRTYPE)


# ----------------------------------------------------------------------------- the corpus

BOTH = ("serving", "scoring")


def _same(reason: str) -> dict[str, str]:
    return dict.fromkeys(BOTH, reason)


CASES: list[Case] = [
    # --- compressed DICOM streams that disagree with the header
    Case("rle_segment_bomb", "a 32×32 RLE DICOM whose one segment is 4 MiB of repeat runs (pydicom's decoder "
         "grows to 256 MiB and only warns)", lambda: rle_dicom(32, 32, [b"\x81\x00" * (2 * MiB)]), _same("corrupt")),
    Case("rle_segment_count", "a 16-bit RLE DICOM with one segment where its layout needs two",
         lambda: rle_dicom(64, 64, [b"\x81\x00" * 32], bits=16), _same("corrupt")),
    Case("j2k_declares_8000", "a 64×64 DICOM whose JPEG 2000 stream declares 8000×8000 (decoded in full, then "
         "refused)", lambda: j2k_with_size(64, 8000, 8000), _same("corrupt")),
    Case("j2k_declares_2_32", "a JPEG 2000 stream declaring 4294967295×4294967295",
         lambda: j2k_with_size(64, 2**32 - 1, 2**32 - 1), _same("corrupt")),
    Case("j2k_one_pixel_tiles", "a 1024×1024 JPEG 2000 stream cut into 1×1 tiles (a decoder structure each)",
         lambda: j2k_with_size(1024, 1024, 1024, tile=1), _same("corrupt")),
    Case("jpeg_sof_declares_8000", "a 64×64 DICOM whose baseline JPEG frame header declares 8000×8000",
         lambda: jpeg_dicom_with_frame_size(8000, 8000), _same("corrupt")),
    Case("jpegls_sof55_declares_8000", "a 64×64 DICOM whose JPEG-LS frame header declares 8000×8000",
         lambda: jpeg_dicom_with_frame_size(8000, 8000, ls=True), _same("corrupt")),
    # --- DICOM headers that ask for absurd work
    Case("million_frames", "a 64×64 DICOM declaring 1,000,000 frames", lambda: dicom(
        64, 64, bytes(64 * 64 * 2), frames=1_000_000), _same("too_large")),
    Case("header_8000_pixels_1k", "a native DICOM whose header says 8000×8000 and whose pixel data is 1 kB",
         lambda: dicom(8000, 8000, bytes(1024)), _same("truncated")),
    Case("bits_allocated_64", "64 bits allocated per sample", lambda: dicom(64, 64, bytes(64 * 64 * 8), bits=64),
         _same("unsupported_dicom")),
    Case("bits_stored_over_allocated", "16 allocated, 40 stored", lambda: dicom(
        64, 64, bytes(64 * 64 * 2), bits_stored=40), _same("unsupported_dicom")),
    Case("monochrome_with_3_samples", "MONOCHROME2 with 3 samples per pixel", lambda: dicom(
        64, 64, bytes(64 * 64 * 6), samples=3), _same("unsupported_dicom")),
    Case("deflated_dicom_bomb", "a deflated DICOM of 1 MB that inflates to 640 MiB", lambda: _deflated_bomb(),
         _same("too_large")),
    Case("deep_sequences", "5,000 nested sequences in the header", lambda: deep_sequences(5000), _same("corrupt")),
    Case("dicom_16bit_8000", "a real 8000×8000 16-bit DICOM (128 MB): about 1.1 GB to decode",
         lambda: dicom(8000, 8000, bytes(8000 * 8000 * 2)), {"serving": "file_too_large", "scoring": "too_large"}),
    # --- Pillow formats: pixels cheap on disk, dear in memory or CPU
    Case("float_tiff_8000", "a 250 kB float TIFF of 8000×8000 (2.2 GB and 5 s of CPU to decode)",
         lambda: tiff(8000, 8000, 32, 1, _deflate_zeros(8000 * 8000 * 4), compression=8, sample_format=3),
         _same("too_large")),
    Case("rgb16_packbits_tiff_8000", "a 4 MB PackBits RGB 16-bit TIFF of 8000×8000",
         lambda: tiff(8000, 8000, 16, 3, packbits_zeros(8000 * 6, 8000), compression=32773),
         {"serving": "too_large", "scoring": OK}),
    Case("png_rgba16_8000", "a 500 kB RGBA 16-bit PNG of 8000×8000 zeros",
         lambda: png_zeros(8000, 8000, 16, 6), {"serving": "too_large", "scoring": OK}),
    Case("png_gray16_6000", "a 16-bit gray PNG of 6000×6000 zeros (36 MP)", lambda: png_zeros(6000, 6000, 16, 0),
         {"serving": "too_large", "scoring": OK}),
    Case("png_declares_65535", "a PNG header declaring 65535×65535", lambda: png_header(65535, 65535),
         _same("too_large")),
    Case("jpeg_many_scans", "a progressive JPEG with 400 scans (a pass over every coefficient each)",
         lambda: jpeg_with_scans(400), _same("too_large")),
    Case("jpeg_declares_65500", "a JPEG whose frame header declares 65500×65500",
         lambda: jpeg_with_frame_size(65500, 65500), _same("too_large")),
    # --- valid heavy images: decoded, within their estimate
    Case("valid_png16_2000", "a 2000×2000 16-bit PNG", lambda: _pillow(_texture(2000, 2000, np.uint16, 4095), "PNG",
         compress_level=1), _same(OK)),
    Case("valid_jpeg_progressive_2000", "a 2000×2000 progressive RGB JPEG", lambda: _pillow(
        np.dstack([_texture(2000, 2000)] * 3), "JPEG", quality=85, progressive=True), _same(OK)),
    Case("valid_webp_1500", "a 1500×1500 WebP", lambda: _pillow(_texture(1500, 1500), "WEBP", quality=80), _same(OK)),
    Case("valid_tiff_rgb16_2000", "a 2000×2000 PackBits RGB 16-bit TIFF",
         lambda: tiff(2000, 2000, 16, 3, packbits_zeros(2000 * 6, 2000), compression=32773), _same(OK)),
    Case("valid_dicom_rle_2000", "a 2000×2000 12-bit RLE DICOM", lambda: _compressed_texture(2000, "rle"), _same(OK)),
    Case("valid_dicom_j2k_1000", "a 1000×1000 12-bit JPEG 2000 DICOM", lambda: _compressed_texture(1000, "j2k"),
         _same(OK)),
    Case("valid_dicom_jpegls_1000", "a 1000×1000 12-bit JPEG-LS DICOM", lambda: _compressed_texture(1000, "jls"),
         _same(OK)),
]
BY_NAME = {case.name: case for case in CASES}


def _deflated_bomb() -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = dicom(64, 64, bytes(64 * 64 * 2), transfer_syntax=DeflatedExplicitVRLittleEndian)
    end = 144 + int.from_bytes(plain[140:144], "little")  # the file meta group is not deflated
    return plain[:end] + _deflate_zeros(640 * MiB, raw=True)


def _compressed_texture(side: int, codec: str) -> bytes:
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    syntax = {"rle": RLELossless, "j2k": JPEG2000Lossless, "jls": JPEGLSLossless}[codec]
    return dicom_compressed(_texture(side, side, np.uint16, 4095), syntax, bits_stored=12)


# ----------------------------------------------------------------------------- the harness


def run(names: list[str] | None = None, limits: str = "serving", size: int = 224, cpu_limit_s: int = 60,
        timeout_s: float = 600) -> list[Outcome]:
    """Decode each case once in a fresh child (see the module docstring) under the named limits."""
    cases = [BY_NAME[n] for n in names] if names else CASES
    with tempfile.TemporaryDirectory(prefix="kdray-hostile-") as folder:
        for case in cases:
            Path(folder, case.name).write_bytes(case.make())
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        proc = subprocess.run([sys.executable, __file__, "--worker", folder, limits, str(size), str(cpu_limit_s),
                               *[c.name for c in cases]], env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the hostile-corpus worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [Outcome(**json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("{")]


def limits_named(name: str):
    from kdray.images import DEFAULT_LIMITS, SERVING_LIMITS

    return {"serving": SERVING_LIMITS, "scoring": DEFAULT_LIMITS}[name]


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _warm_up(size: int) -> None:
    """A tiny decode of every kind: lazy imports and decoder set-up are paid here, not in a measured child."""
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    from kdray.images import load_image

    tiny = _texture(64, 64)
    samples = [_pillow(tiny, fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP")]
    samples += [dicom(64, 64, _texture(64, 64, np.uint16, 4095).tobytes())]
    samples += [dicom_compressed(_texture(64, 64, np.uint16, 4095), ts, bits_stored=12)
                for ts in (RLELossless, JPEG2000Lossless, JPEGLSLossless)]
    samples += [jpeg_dicom_with_frame_size(64, 64)]
    for data in samples:
        load_image(data, size)


def _measure(path: Path, limits, size: int, cpu_limit_s: int) -> Outcome:
    from kdray.images import ImageRefused, load_image

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one decode, then report and leave without running any cleanup
        os.close(read_end)
        result = {"case": path.name, "file_bytes": path.stat().st_size, "estimate_bytes": 0}
        data = path.read_bytes()
        resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + 2 * getattr(limits, "max_decode_bytes", 2**30) + 512 * MiB,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit_s, cpu_limit_s + 5))
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # peak RSS := current RSS
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            loaded = load_image(data, size, limits)
            result.update(outcome="ok", reason=OK, message="", estimate_bytes=getattr(loaded, "decode_bytes", 0))
        except ImageRefused as exc:
            result.update(outcome="refused", reason=exc.reason, message=str(exc))
        except MemoryError:
            result.update(outcome="memory_error", reason="", message="MemoryError under the address-space limit")
        except BaseException as exc:  # noqa: BLE001 - a crash of the loader is a finding, reported as one
            result.update(outcome="crashed", reason="", message=f"{type(exc).__name__}: {str(exc)[:200]}")
        after = resource.getrusage(resource.RUSAGE_SELF)
        result.update(peak_rss_bytes=max(0, _status("VmHWM") - base),
                      cpu_s=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3))
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        report = fh.read()
    _, status = os.waitpid(pid, 0)
    if report:
        return Outcome(**json.loads(report))
    signal_name = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else f"exit {status}"
    return Outcome(path.name, "killed", "", f"the child died ({signal_name})", 0, 0.0, 0, path.stat().st_size)


def _worker(folder: str, limits_name: str, size: int, cpu_limit_s: int, names: list[str]) -> None:
    limits = limits_named(limits_name)
    _warm_up(size)
    for name in names:
        print(json.dumps(asdict(_measure(Path(folder, name), limits, size, cpu_limit_s))), flush=True)


def format_table(outcomes: list[Outcome], limits: str) -> str:
    lines = [f"| case ({limits} limits) | expected | outcome | reason | file | peak RSS growth | estimate | CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.case} | {BY_NAME[o.case].expect[limits]} | {o.outcome} | {o.reason} | "
                     f"{o.file_bytes / MiB:.2f} MiB | {o.peak_rss_bytes / MiB:.1f} MiB | "
                     f"{o.estimate_bytes / MiB:.1f} MiB | {o.cpu_s:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--limits", choices=BOTH, default="serving")
        parser.add_argument("--size", type=int, default=224)
        parser.add_argument("cases", nargs="*", metavar="CASE", help=f"some of: {', '.join(BY_NAME)}")
        args = parser.parse_args()
        unknown = sorted(set(args.cases) - set(BY_NAME))
        if unknown:
            parser.error(f"unknown case(s): {', '.join(unknown)}")
        print(format_table(run(args.cases or None, args.limits, args.size), args.limits))
