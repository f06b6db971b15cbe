"""What a compressed pixel stream says about itself, read from its own header without decoding it.

A DICOM header and the JPEG, JPEG-LS, JPEG 2000 or RLE stream inside its Pixel Data can disagree, and the
decoders trust the stream: a 1 kB file whose header says 64 × 64 may hold a JPEG 2000 stream that declares
8000 × 8000 (or 2³² × 2³²), which the decoder allocates in full. :mod:`kdray.images` reads the stream's own
geometry here, compares it with the header and with the decode budget, and only then lets a decoder run.

Everything here parses bytes with bounds checks only: no allocation that grows with what a header declares.
Errors are :class:`StreamError` with a short message that quotes no file content other than numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["StreamError", "StreamGeometry", "j2k_geometry", "jpeg_geometry", "rle_segments"]

#: JPEG start-of-frame markers (every coding process: baseline, extended, progressive, lossless, arithmetic)
#: and JPEG-LS's SOF55; not DHT (C4), JPG (C8) or DAC (CC), which share the range.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field
_SOS, _EOI = 0xDA, 0xD9
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC immediately followed by SIZ: the start of every JPEG 2000 codestream
_RLE_HEADER = 64


class StreamError(ValueError):
    """A compressed stream whose header is missing, cut off or inconsistent."""


@dataclass(frozen=True)
class StreamGeometry:
    codec: str  # "JPEG", "JPEG-LS", "JPEG 2000"
    width: int
    height: int
    components: int
    precision: int  # bits per sample (the largest over the components)
    scans: int = 1  # JPEG: start-of-scan markers after the frame header (progressive files have several)
    progressive: bool = False
    tiles: int = 1  # JPEG 2000


def jpeg_geometry(data: bytes) -> StreamGeometry:
    """The frame header (SOFn, or JPEG-LS SOF55) of a JPEG or JPEG-LS stream, and how many scans follow it."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise StreamError("the JPEG stream does not start with a start-of-image marker")
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise StreamError(f"the JPEG stream has no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (_SOS, _EOI):
            raise StreamError("the JPEG stream has no frame header before its image data")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            raise StreamError("the JPEG stream is cut off inside a marker segment")
        if marker in _SOF:
            if length < 8:
                raise StreamError("the JPEG frame header is too short")
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            if height == 0:
                raise StreamError("the JPEG frame header leaves the height to a later DNL marker (not supported)")
            if width == 0 or components == 0:
                raise StreamError("the JPEG frame header declares no pixels")
            # Entropy-coded data never holds FF DA: JPEG stuffs a zero after every FF, JPEG-LS a zero bit.
            scans = data.count(b"\xff\xda", pos + 2 + length)
            return StreamGeometry("JPEG-LS" if marker == 0xF7 else "JPEG", width, height, components, precision,
                                  scans, marker in _PROGRESSIVE_SOF)
        pos += 2 + length
    raise StreamError("the JPEG stream ends before its frame header")


def j2k_geometry(data: bytes) -> StreamGeometry:
    """The SIZ segment of a JPEG 2000 codestream (bare, or inside a JP2 file's codestream box)."""
    start = 0 if data[:4] == _J2K_SIZ else data.find(_J2K_SIZ, 0, 1 << 16)
    if start < 0:
        raise StreamError("no JPEG 2000 codestream header (SOC, SIZ) in the first 64 KiB")
    siz = data[start + 4:]
    if len(siz) < 38:
        raise StreamError("the JPEG 2000 SIZ segment is cut off")
    length, _, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz = struct.unpack(">HHIIIIIIIIH", siz[:38])
    if csiz == 0 or length != 38 + 3 * csiz or len(siz) < length:
        raise StreamError("the JPEG 2000 SIZ segment is inconsistent with its component count")
    if not (xo < xsiz and yo < ysiz and xt and yt and xto <= xo and yto <= yo and xto + xt > xo and yto + yt > yo):
        raise StreamError("the JPEG 2000 SIZ segment declares an invalid image or tile grid")
    precision = max((siz[38 + 3 * i] & 0x7F) + 1 for i in range(csiz))
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    return StreamGeometry("JPEG 2000", xsiz - xo, ysiz - yo, csiz, precision, tiles=tiles)


def rle_segments(frame: bytes, rows: int, columns: int, segments: int) -> None:
    """Check a DICOM RLE frame's segment table (PS3.5 G.4) against the image it should hold.

    ``segments`` is what the header implies (Samples per Pixel × Bits Allocated / 8). Each segment holds one
    byte plane of rows × columns bytes; its encoding can never be more than twice as long (a literal run of n
    bytes costs n + 1, a repeat run of k ≥ 2 costs 2), so a longer one decodes past the image or pads itself
    with no-op bytes: both are refused before a decoder expands them."""
    if len(frame) < _RLE_HEADER:
        raise StreamError("the RLE frame is shorter than its 64-byte segment table")
    count, *offsets = struct.unpack("<16I", frame[:_RLE_HEADER])
    if count != segments:
        raise StreamError(f"the RLE frame has {count} segment(s); the header's pixel layout needs {segments}")
    ends = offsets[1:count] + [len(frame)]
    longest = 2 * (rows * columns + 1) + 1
    for start, end in zip(offsets[:count], ends):
        if not _RLE_HEADER <= start < end <= len(frame):
            raise StreamError("the RLE segment table points outside the frame or out of order")
        if end - start > longest:
            raise StreamError(f"an RLE segment is {end - start:,} bytes long; one that holds rows × columns = "
                              f"{rows * columns:,} bytes is at most {longest:,}")
