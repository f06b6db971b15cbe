"""kdray.codestreams: the geometry a compressed stream declares, read without decoding it."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from kdray.codestreams import StreamError, j2k_geometry, jpeg_geometry, rle_segments

pytestmark = pytest.mark.unit


def _jpeg(width: int = 48, height: int = 32, mode: str = "L", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buf, "JPEG", **save)
    return buf.getvalue()


def _siz(width: int, height: int, components: int = 1, tile: int = 0, precision: int = 12, offset: int = 0) -> bytes:
    tile = tile or max(width, height)
    body = struct.pack(">HHIIIIIIIIH", 38 + 3 * components, 0, width + offset, height + offset, offset, offset,
                       tile, tile, 0, 0, components) + bytes([precision - 1, 1, 1]) * components
    return b"\xff\x4f\xff\x51" + body + b"\xff\x52\x00\x02"


def test_jpeg_frame_header_scans_and_progression():
    baseline = jpeg_geometry(_jpeg(48, 32))
    assert (baseline.codec, baseline.width, baseline.height, baseline.components) == ("JPEG", 48, 32, 1)
    assert baseline.precision == 8 and baseline.scans == 1 and not baseline.progressive
    progressive = jpeg_geometry(_jpeg(64, 64, "RGB", progressive=True))
    assert progressive.progressive and progressive.components == 3 and progressive.scans > 1


def test_jpeg_without_a_usable_frame_header_is_an_error():
    data = bytearray(_jpeg())
    pos = data.find(b"\xff\xc0")
    struct.pack_into(">H", data, pos + 5, 0)  # height 0: left to a DNL marker
    with pytest.raises(StreamError, match="DNL"):
        jpeg_geometry(bytes(data))
    with pytest.raises(StreamError, match="start-of-image"):
        jpeg_geometry(b"\x00" * 32)
    with pytest.raises(StreamError, match="cut off"):
        jpeg_geometry(_jpeg()[:pos + 6])


def test_j2k_siz_bare_or_in_a_jp2_box_with_offsets_and_tiles():
    assert j2k_geometry(_siz(640, 480, 3)).__dict__ | {} == {
        "codec": "JPEG 2000", "width": 640, "height": 480, "components": 3, "precision": 12, "scans": 1,
        "progressive": False, "tiles": 1}
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40 + b"jp2c" + _siz(100, 50, offset=7)
    geometry = j2k_geometry(jp2)
    assert (geometry.width, geometry.height) == (100, 50)
    assert j2k_geometry(_siz(1024, 1024, tile=1)).tiles == 1024 * 1024
    with pytest.raises(StreamError):
        j2k_geometry(b"\x00" * 100)
    with pytest.raises(StreamError, match="inconsistent"):
        j2k_geometry(_siz(64, 64)[:4] + b"\x00\x30" + _siz(64, 64)[6:])  # Lsiz says 48 bytes for 1 component


def test_rle_segment_table_matches_the_layout():
    segment = b"\x81\x00" * 8  # 8 runs of 128 zeros: 1024 bytes
    frame = struct.pack("<16I", 1, 64, *[0] * 14) + segment
    rle_segments(frame, 32, 32, 1)
    with pytest.raises(StreamError, match="needs 2"):
        rle_segments(frame, 32, 32, 2)
    bomb = struct.pack("<16I", 1, 64, *[0] * 14) + b"\x81\x00" * 4096
    with pytest.raises(StreamError, match="at most"):
        rle_segments(bomb, 32, 32, 1)
    backwards = struct.pack("<16I", 2, 80, 64, *[0] * 13) + segment
    with pytest.raises(StreamError, match="out of order"):
        rle_segments(backwards, 4, 4, 2)
    with pytest.raises(StreamError, match="shorter"):
        rle_segments(b"\x01", 1, 1, 1)
