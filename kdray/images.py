"""The one loader for untrusted medical images: bytes → uint8 [S, S] grayscale, or a refusal with a reason code.

Everything that turns image bytes into pixels (training, the logit cache, evaluation, scoring,
serving, ``kdray predict``) goes through :func:`load_image`; ``kdray.data.decode_image`` is a thin
wrapper around it.

Formats are recognised by their content, never by the file name. Allowed: PNG, JPEG, TIFF, BMP,
WebP (decoded by Pillow, which is only ever offered the one plugin the magic bytes name) and DICOM
Part 10 files (``DICM`` at byte 128, decoded by pydicom). Anything else is refused. A file with
``DICM`` at byte 128 is DICOM whatever its first bytes say (a DICOM preamble may itself look like a
TIFF: such polyglots are read as DICOM only).

Pipeline, for every format: limits checked from the header before any pixel is decoded (file
bytes, shorter side, pixel count) → decode → 8-bit grayscale → centre square crop → bilinear
resize to S×S (``reducing_gap=2.0``).

* PNG, TIFF, BMP, WebP, JPEG: EXIF orientation applied; 16-bit and float images are windowed to
  their 0.5-99.5 percentiles; anything else is converted with ``convert("L")`` (ITU-R 601 luma;
  alpha is ignored). Multi-page TIFF, animated PNG/WebP: the first frame.
* JPEG: ``draft`` lets libjpeg decode at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side
  is still ≥ S, so the crop is never upscaled. Where it applies (shorter side ≥ 2·S) the pixels
  differ slightly from a full decode (colour JPEGs then keep libjpeg's Y channel as their gray);
  smaller JPEGs are decoded exactly as before.
* DICOM: first frame only (a multi-frame file reports ``frames``); Bits Stored honoured (bits above
  it are cleared, or sign-extended for signed data); Modality LUT or rescale; then the VOI LUT or
  window where the file has one, else the 0.5-99.5 percentile window as for 16-bit PNGs;
  MONOCHROME1 inverted; colour (RGB, YBR, palette) converted to luma. Compressed transfer syntaxes
  decode where an installed handler can (pydicom's RLE, Pillow, pylibjpeg); otherwise the file is
  refused as ``unsupported_dicom``. Deflated DICOM is inflated in bounded steps first, so that it
  cannot expand past ``max_bytes``.

Refusals raise :class:`ImageRefused` (a :class:`kdray.KdrayError`) with a stable ``reason`` (one of
:data:`REASONS`) and a one-line message that holds no object reprs and no DICOM tag values other
than those :class:`LoadedImage` reports (the dimensions, Modality and the transfer syntax's name).

A successful load returns :class:`LoadedImage`: the pixels, ``format`` (png, jpeg, tiff, bmp, webp,
dicom), the stored ``width`` and ``height`` (before orientation, crop and resize), ``frames``, and for
DICOM these identifiers where present, and nothing else from the header: StudyInstanceUID,
SeriesInstanceUID, SOPInstanceUID, Modality, BodyPartExamined, ViewPosition.

This module imports numpy, Pillow and pydicom only (no Ray, no torch).

:data:`DECODER_VERSION` changes whenever the pixels this module produces for the same bytes change;
logit-cache fingerprints and model cards carry it.
"""

from __future__ import annotations

import codecs
import io
import re
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from kdray import KdrayError
from kdray.codestreams import StreamError, j2k_geometry, jpeg_geometry, rle_segments
from kdray.config import ImageLimits  # a typed config (scoring's flags set it): defined with the others

__all__ = [
    "CORRUPT", "DEFAULT_LIMITS", "FILE_TOO_LARGE", "FORBIDDEN", "FORMATS", "IO_ERROR", "ImageLimits", "ImageRefused",
    "LoadedImage", "MISSING", "NOT_AN_IMAGE", "NOT_A_FILE", "NO_PIXELS", "OUTSIDE_ROOTS", "REASONS", "SERVING_LIMITS",
    "SPARSE_MEMBER", "TOO_LARGE", "TOO_SMALL", "TRUNCATED", "UNSUPPORTED_DICOM", "WRONG_MODALITY", "check_file_size",
    "dicom_decode_cost", "load_image", "pillow_decode_cost", "sniff_format",
]

# ----------------------------------------------------------------------------- reason codes (stable: callers store them)

NOT_AN_IMAGE = "not_an_image"  # none of the allowed formats (GIF, text, HTML, empty, ...)
TRUNCATED = "truncated"  # an allowed format, cut off before its end
TOO_SMALL = "too_small"  # shorter side below ImageLimits.min_side
TOO_LARGE = "too_large"  # more pixels than ImageLimits.max_pixels (or Pillow's bomb limit); read from the header
FILE_TOO_LARGE = "file_too_large"  # more bytes than ImageLimits.max_bytes
UNSUPPORTED_DICOM = "unsupported_dicom"  # a DICOM image this installation cannot decode (transfer syntax, layout)
NO_PIXELS = "no_pixels"  # a DICOM object without pixel data (DICOMDIR, SR, presentation state, ...)
WRONG_MODALITY = "wrong_modality"  # a DICOM modality outside ImageLimits.modalities
IO_ERROR = "io_error"  # reserved for callers: the bytes could not be read (transient: a re-run retries it)
CORRUPT = "corrupt"  # an allowed format whose content cannot be decoded, or whose parts disagree
# Reserved for readers of archives, folders and manifests (kdray.score); all of them terminal:
MISSING = "missing"  # listed, but not there (deleted since listing, a manifest typo)
FORBIDDEN = "forbidden"  # there, but the job's credentials may not read it
OUTSIDE_ROOTS = "outside_roots"  # a manifest row or link that points outside the input's root (--allowed-roots)
NOT_A_FILE = "not_a_file"  # a FIFO, device, socket, directory or (in a tar) link: never opened
SPARSE_MEMBER = "sparse_member"  # a sparse tar member: its holes would be read as zeros
DECODER_VERSION = "kdray.images/2"  # 2: percentiles in float64 through level tables; 1: JPEG draft, DICOM

REASONS = (NOT_AN_IMAGE, TRUNCATED, TOO_SMALL, TOO_LARGE, FILE_TOO_LARGE, UNSUPPORTED_DICOM, NO_PIXELS,
           WRONG_MODALITY, IO_ERROR, CORRUPT, MISSING, FORBIDDEN, OUTSIDE_ROOTS, NOT_A_FILE, SPARSE_MEMBER)

#: format name → the Pillow plugin allowed to open it (DICOM goes to pydicom).
FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP", "dicom": None}
_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "webp": "WebP", "dicom": "DICOM"}
#: The DICOM attributes a load reports (LoadedImage.dicom), by keyword, with the column name scoring stores each in.
DICOM_IDENTIFIERS = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid", "SOPInstanceUID": "sop_uid",
                     "Modality": "modality", "BodyPartExamined": "body_part", "ViewPosition": "view_position"}
_DEFLATED = b"1.2.840.10008.1.2.1.99"
_TIFF_PAGE_CAP = 1000


class ImageRefused(KdrayError):
    """An image that will not be decoded: ``reason`` is one of :data:`REASONS`, ``str(exc)`` a one-line message."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown image refusal reason {reason!r}")
        self.reason = reason
        self.message = _one_line(message)
        super().__init__(self.message)

    def __reduce__(self):  # picklable across processes (Ray workers) despite the two-argument constructor
        return type(self), (self.reason, self.message)


#: Scoring, training and ``kdray predict``: archives of large radiographs, a few decodes at a time per node.
DEFAULT_LIMITS = ImageLimits()
#: Serving: several requests decode at once on one replica; a 43 cm detector's 4300×4300 16-bit DICOM (37 MB,
#: about 300 MiB to decode) still passes.
SERVING_LIMITS = ImageLimits(max_bytes=64 * 2**20, max_decode_bytes=512 * 2**20, max_frames=16)
#: A progressive JPEG pays a pass over every coefficient per scan; encoders write about 10.
MAX_JPEG_SCANS = 100


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # uint8 [size, size]
    format: str  # png, jpeg, tiff, bmp, webp, dicom
    width: int  # as stored, before orientation, crop and resize
    height: int
    frames: int  # DICOM NumberOfFrames, TIFF pages (counted up to 1000), APNG/WebP frames; the first is used
    dicom: dict[str, str] = field(default_factory=dict)  # DICOM_IDENTIFIERS present in the file; {} otherwise
    decode_bytes: int = 0  # the decode's estimated peak memory, which the budget admitted (decode_cost)


# ----------------------------------------------------------------------------- public API


def sniff_format(data: bytes) -> str | None:
    """The allowed format that ``data`` starts like ("png", "jpeg", "tiff", "bmp", "webp", "dicom"), else None."""
    head = bytes(data[:132])
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return None


def check_file_size(nbytes: int, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Refuse (``file_too_large``) a file of ``nbytes``; readers call this before reading a file whole."""
    if nbytes > limits.max_bytes:
        raise ImageRefused(FILE_TOO_LARGE, f"file is {_mib(nbytes)}; at most {_mib(limits.max_bytes)} is accepted")


def load_image(data: bytes, size: int, limits: ImageLimits = DEFAULT_LIMITS) -> LoadedImage:
    """Decode untrusted image bytes to uint8 [size, size] grayscale, or raise :class:`ImageRefused`."""
    return _load_image(data, size, limits, draft=True)


# ----------------------------------------------------------------------------- the loader


def _load_image(data: bytes, size: int, limits: ImageLimits, *, draft: bool) -> LoadedImage:
    """:func:`load_image`; ``draft=False`` decodes JPEGs at full scale (benchmarks and parity tests)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, not {size!r}")
    if not isinstance(data, bytes):
        data = bytes(data)
    check_file_size(len(data), limits)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRefused(NOT_AN_IMAGE, f"not a recognised image format: {_what_is_it(data)}; accepted are PNG, "
                                         "JPEG, TIFF, BMP, WebP and DICOM, recognised by content, not by name")
    if fmt == "dicom":
        return _load_dicom(data, size, limits)
    return _load_pillow(data, fmt, size, limits, draft)


def _load_pillow(data: bytes, fmt: str, size: int, limits: ImageLimits, draft: bool) -> LoadedImage:
    name = _NAMES[fmt]
    try:
        img = Image.open(io.BytesIO(data), formats=[FORMATS[fmt]])  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning, where filters raise it
        raise ImageRefused(TOO_LARGE, f"{name} image is over Pillow's decompression-bomb limit of "
                                      f"{Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - plugins raise SyntaxError, struct.error, OSError, ...
        raise _pillow_failure(exc, fmt, data, "header") from None
    with img:
        width, height = img.size
        _check_dimensions(name, width, height, limits)
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            # Where Pillow would only warn (DecompressionBombWarning), refuse as well.
            raise ImageRefused(TOO_LARGE, f"{name} image is {_dims(width, height)}, over Pillow's "
                                          f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels")
        cost = _check_pillow_budget(img, fmt, data, size, limits, draft)
        try:
            frames = _frame_count(img, fmt)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                img = Image.fromarray(_wide_gray(np.asarray(img)))
            else:
                img = img.convert("L")  # RGB → ITU-R 601 luma
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _pillow_failure(exc, fmt, data, "image data") from None
        return LoadedImage(_crop_resize(img, size), fmt, width, height, frames, decode_bytes=cost)


def _check_pillow_budget(img: Image.Image, fmt: str, data: bytes, size: int, limits: ImageLimits,
                         draft: bool) -> int:
    """The decode's cost from the header (a JPEG's at the scale ``draft`` picks), refused over the budget."""
    name = _NAMES[fmt]
    width, height = img.size
    progressive = False
    if fmt == "jpeg":
        try:
            stream = jpeg_geometry(data)
        except StreamError as exc:
            raise ImageRefused(CORRUPT, f"JPEG header is damaged: {exc}") from None
        if stream.scans > MAX_JPEG_SCANS:
            raise ImageRefused(TOO_LARGE, f"JPEG has {stream.scans} scans; at most {MAX_JPEG_SCANS} are decoded "
                                          "(each one is a pass over the whole image)")
        progressive = stream.progressive
        if draft:
            _draft(img, size)
    cost = pillow_decode_cost(fmt, img.mode, img.size[0] * img.size[1], len(data))
    if progressive:  # libjpeg keeps every coefficient of a progressive image, at full scale, until the last scan
        cost += width * height * stream.components * 2
    _check_budget(name, cost, limits)
    return cost


def _draft(img: Image.Image, size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale where the shorter side stays ≥ ``size`` (never at 1/1).

    The requested size keeps the image's aspect ratio with its shorter side at ``size``; Pillow picks
    the largest power-of-two scale ≤ min(width // requested width, height // requested height) and
    rounds the scaled size up, so the shorter side of the decoded image is still ≥ ``size``.
    """
    width, height = img.size
    short = min(width, height)
    if short < 2 * size:
        return  # at scale 1/1 draft would only change the colour conversion, not the size
    request = (-(-size * width // short), -(-size * height // short))  # ceil: the shorter side is exactly `size`
    if min(width // request[0], height // request[1]) >= 2:
        img.draft("L", request)


def _frame_count(img: Image.Image, fmt: str) -> int:
    """Frames in the file (the first is decoded); TIFF pages are counted up to a cap (n_frames walks every IFD)."""
    if fmt != "tiff":
        try:
            return max(1, int(getattr(img, "n_frames", 1)))
        except Exception:  # noqa: BLE001 - a broken later frame does not matter: only the first is decoded
            return 1
    if not getattr(img, "is_animated", False):
        return 1
    pages = 1
    try:
        while pages < _TIFF_PAGE_CAP:
            img.seek(pages)
            pages += 1
    except Exception:  # noqa: BLE001 - EOFError after the last page; a broken later page does not matter
        pass
    img.seek(0)
    return pages


def _pillow_failure(exc: Exception, fmt: str, data: bytes, part: str) -> ImageRefused:
    name = _NAMES[fmt]
    detail = _one_line(str(exc))
    detail = re.sub(r"cannot identify image file\s*", "", detail).strip()
    if re.search(r"truncat", detail, re.IGNORECASE) or isinstance(exc, EOFError) or _looks_cut(fmt, data):
        return ImageRefused(TRUNCATED, f"{name} file is cut off: it ends before its image data does")
    if isinstance(exc, Image.UnidentifiedImageError):  # Pillow hides its reader's own error
        return ImageRefused(CORRUPT, f"{name} header is damaged: Pillow's {name} reader does not recognise it")
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return ImageRefused(CORRUPT, f"{name} {part} cannot be decoded ({detail[:160]})")


def _looks_cut(fmt: str, data: bytes) -> bool:
    """Whether the file's own structure says it ends early (only asked after the decoder failed)."""
    n = len(data)
    try:
        if fmt == "png":  # walk the chunks: one that runs past the end, or no IEND, means cut off
            pos = 8
            while pos + 8 <= n:
                length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
                if not ctype.isalpha():
                    return False  # garbage, not an early end
                pos += 12 + length
                if ctype == b"IEND":
                    return pos > n
            return True
        if fmt == "jpeg":  # walk the marker segments up to the scan; then the end-of-image marker must be there
            pos = 2
            while pos + 4 <= n:
                if data[pos] != 0xFF:
                    return False
                marker = data[pos + 1]
                if marker == 0xFF:
                    pos += 1
                    continue
                if marker in (0x01, *range(0xD0, 0xD8)):
                    pos += 2
                    continue
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                if marker == 0xDA:  # start of scan
                    return pos + 2 + length > n or data.rfind(b"\xff\xd9") < pos
                pos += 2 + length
            return True
        if fmt == "bmp":
            return n < 14 or n < int.from_bytes(data[2:6], "little") or n < int.from_bytes(data[10:14], "little")
        if fmt == "webp":
            return n < 8 + int.from_bytes(data[4:8], "little")
        if fmt == "tiff":
            return n < 8 or n < int.from_bytes(data[4:8], "little" if data[:2] == b"II" else "big")
    except (IndexError, struct.error, ValueError):
        return True
    return False


# ----------------------------------------------------------------------------- DICOM


def _load_dicom(data: bytes, size: int, limits: ImageLimits) -> LoadedImage:
    import pydicom
    from pydicom.pixels import get_decoder, pixel_array

    _check_deflated(data, limits)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - no exception text: it may quote tag values
        if isinstance(exc, EOFError):
            raise ImageRefused(TRUNCATED, "DICOM file is cut off: it ends inside its header") from None
        raise ImageRefused(CORRUPT, f"DICOM header cannot be read ({type(exc).__name__})") from None
    meta = _dicom_identifiers(ds)
    file_meta = getattr(ds, "file_meta", None)
    sop = _text(ds, "SOPClassUID") or (_text(file_meta, "MediaStorageSOPClassUID") if file_meta is not None else "")
    if "PixelData" not in ds:
        imageish = any(k in ds for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")) \
            or not sop or "Image Storage" in _uid_name(sop)
        if imageish:
            raise ImageRefused(TRUNCATED, "DICOM file is cut off: its pixel data is missing or incomplete")
        kind = f" (a {_uid_name(sop)} object)" if _uid_name(sop) else ""
        raise ImageRefused(NO_PIXELS, f"DICOM file has no pixel data{kind}: it is not an image")

    modality = meta.get("Modality", "")
    if limits.modalities is not None and modality.upper() not in {m.upper() for m in limits.modalities}:
        shown = f"modality {modality}" if re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality) else \
            "no modality" if not modality else "an invalid modality"
        raise ImageRefused(WRONG_MODALITY, f"DICOM image has {shown}; accepted are {', '.join(limits.modalities)}")

    tsyntax = _text(file_meta, "TransferSyntaxUID") if file_meta is not None else ""
    if not tsyntax:
        raise ImageRefused(CORRUPT, "DICOM file meta has no transfer syntax")
    ts_name = _transfer_syntax_name(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM transfer syntax {ts_name} cannot be decoded: pydicom has no "
                                              "pixel data handler for it") from None
    if not decoder.is_available:
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM transfer syntax {ts_name} cannot be decoded: none of its pixel "
                                              "data handlers is installed") from None

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored") or bits_allocated)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageRefused(CORRUPT, f"DICOM image pixel module is missing or invalid ({type(exc).__name__})") from None
    _check_dimensions("DICOM", cols, rows, limits)
    if frames > limits.max_frames:
        raise ImageRefused(TOO_LARGE, f"DICOM image has {frames:,} frames; at most {limits.max_frames} are accepted "
                                      "(the first frame is scored)")
    if bits_allocated not in (1, 8, 16, 32) or not 1 <= bits_stored <= bits_allocated:
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM image with {bits_allocated} bits allocated and {bits_stored} "
                                              "stored per sample is not supported (1, 8, 16 or 32 allocated)")
    monochrome = photometric in ("MONOCHROME1", "MONOCHROME2")
    supported = (monochrome or photometric == "PALETTE COLOR") and samples == 1 \
        or (photometric == "RGB" or photometric.startswith("YBR_")) and samples == 3
    if not supported:
        shown = photometric if re.fullmatch(r"[A-Z0-9_ ]{1,16}", photometric) else "an invalid value"
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM photometric interpretation {shown} with {samples} sample(s) per "
                                              "pixel is not supported")
    layout = _PixelLayout(rows, cols, frames, samples, bits_allocated)
    codec = _check_pixel_stream(ds, tsyntax, layout)
    plugin = _DECODING_PLUGIN.get(codec, {}).get("decoding_plugin")
    if plugin and plugin not in decoder.available_plugins:
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM transfer syntax {ts_name} is decoded only by its {plugin} "
                                              "plugin (a bounded decoder), which is not installed")
    cost = dicom_decode_cost(codec, rows * cols, samples, bits_allocated, len(data))
    _check_budget("DICOM", cost, limits)

    try:
        arr = pixel_array(ds, index=0, **_DECODING_PLUGIN.get(codec, {}))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - no exception text: it may quote tag values
        if isinstance(exc, EOFError) or "less than expected" in str(exc) or "ended unexpectedly" in str(exc):
            raise ImageRefused(TRUNCATED, "DICOM file is cut off: its pixel data is shorter than the image") from None
        raise ImageRefused(CORRUPT, f"DICOM pixel data ({ts_name}) cannot be decoded ({type(exc).__name__})") \
            from None
    try:
        gray = _dicom_gray(ds, arr, bits_stored, signed, photometric) if monochrome else \
            _dicom_colour(ds, arr, bits_stored, photometric)
    except MemoryError:
        raise
    except ImageRefused:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageRefused(CORRUPT, f"DICOM pixel values cannot be mapped to gray levels ({type(exc).__name__})") \
            from None
    return LoadedImage(_crop_resize(Image.fromarray(gray), size), "dicom", cols, rows, frames, meta, cost)


@dataclass(frozen=True)
class _PixelLayout:
    """What a DICOM header says its pixel data holds."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int


#: RLE through pylibjpeg-rle, which decodes a segment into exactly rows × columns bytes (pydicom's own RLE
#: decoder grows with whatever a segment expands to, and only warns).
_DECODING_PLUGIN = {"RLE": {"decoding_plugin": "pylibjpeg"}}


def _check_pixel_stream(ds, tsyntax: str, layout: _PixelLayout) -> str:
    """The codec of an encapsulated transfer syntax ("native" otherwise), once its first frame's own header has
    been read and found to match ``layout``: dimensions, components and precision (JPEG, JPEG-LS, JPEG 2000) or
    the segment table (RLE). Refused as ``corrupt`` otherwise, before any decoder sees the stream."""
    from pydicom import uid

    if tsyntax in uid.JPEGTransferSyntaxes or tsyntax in uid.JPEGLSTransferSyntaxes:
        codec = "JPEG"
    elif tsyntax in uid.JPEG2000TransferSyntaxes:
        codec = "JPEG 2000"
    elif tsyntax == uid.RLELossless:
        codec = "RLE"
    else:
        needed = -(-layout.rows * layout.columns * layout.bits_allocated // 8)
        if layout.samples == 1 and len(ds.PixelData) < needed:  # (pydicom's own check covers colour layouts)
            raise ImageRefused(TRUNCATED, f"DICOM pixel data is {len(ds.PixelData):,} bytes; the header's first "
                                          f"frame needs {needed:,}")
        return "native"
    try:
        from pydicom.encaps import get_frame

        frame = get_frame(ds.PixelData, 0, number_of_frames=layout.frames)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's message may quote bytes of the file
        raise ImageRefused(CORRUPT, f"DICOM encapsulated pixel data cannot be split into frames "
                                    f"({type(exc).__name__})") from None
    try:
        if codec == "RLE":
            rle_segments(frame, layout.rows, layout.columns, layout.samples * max(1, layout.bits_allocated // 8))
            return codec
        stream = j2k_geometry(frame) if codec == "JPEG 2000" else jpeg_geometry(frame)
    except StreamError as exc:
        raise ImageRefused(CORRUPT, f"DICOM {codec} pixel data: {exc}") from None
    if (stream.width, stream.height) != (layout.columns, layout.rows) or stream.components != layout.samples:
        raise ImageRefused(CORRUPT, f"DICOM {stream.codec} pixel data declares {_dims(stream.width, stream.height)} "
                                    f"with {stream.components} component(s), but the header says "
                                    f"{_dims(layout.columns, layout.rows)} with {layout.samples}")
    if stream.precision > max(8, layout.bits_allocated):
        raise ImageRefused(CORRUPT, f"DICOM {stream.codec} pixel data has {stream.precision}-bit samples, more than "
                                    f"the {layout.bits_allocated} bits the header allocates")
    if stream.tiles > 65535:  # the most a codestream may have (Isot is 16 bits); each costs the decoder a structure
        raise ImageRefused(CORRUPT, f"DICOM JPEG 2000 pixel data declares {stream.tiles:,} tiles")
    if stream.scans > MAX_JPEG_SCANS:
        raise ImageRefused(TOO_LARGE, f"DICOM {stream.codec} pixel data has {stream.scans} scans; at most "
                                      f"{MAX_JPEG_SCANS} are decoded")
    return "JPEG 2000" if codec == "JPEG 2000" else stream.codec


def _dicom_gray(ds, arr: np.ndarray, bits_stored: int, signed: bool, photometric: str) -> np.ndarray:
    if arr.ndim != 2:
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM frame has shape {arr.shape}, not rows × columns")
    arr = _honour_bits_stored(arr, bits_stored, signed)
    out = _through_levels(arr, lambda values, counts: _gray_of_values(ds, values, counts))
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _gray_of_values(ds, values: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """Stored values → uint8 gray: modality LUT (rescale), then the VOI LUT or window, else the percentile window.

    ``counts`` (how many pixels hold each value) is given when ``values`` are the distinct stored levels."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(values, ds)
    voi = ds.get("VOILUTSequence")
    has_lut = bool(voi) and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut or has_window:
        try:
            if has_lut:  # pydicom indexes the LUT in its own (16-bit) dtype: keep inputs inside the table
                descriptor = voi[0].LUTDescriptor
                entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
                table = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds, index=0)
                lo, hi = float(table.min()), float(table.max())
                src = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
            else:  # the window's output range: what it gives far below and far above it
                lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0))
                src = values
            if hi != lo:
                scaled = (apply_voi_lut(src, ds, index=0).astype(np.float64) - lo) / (hi - lo)
                return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
        except (ValueError, NotImplementedError, IndexError, TypeError, AttributeError, KeyError):
            pass  # an unusable window (e.g. width < 1) falls back to the percentile window
    return _percentile_window(np.asarray(values, dtype=np.float64), counts)


def _dicom_colour(ds, arr: np.ndarray, bits_stored: int, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = bits_stored
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageRefused(UNSUPPORTED_DICOM, f"DICOM colour frame has shape {arr.shape}, not rows × columns × 3")
    if arr.dtype != np.uint8 or bits != 8:
        arr = (np.clip(arr.astype(np.float64) / (2**bits - 1), 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr), "RGB").convert("L"))


def _honour_bits_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Clear the bits above Bits Stored (unsigned) or sign-extend from it (signed); pydicom does it too, make sure."""
    width = arr.dtype.itemsize * 8
    if arr.dtype.kind not in "iu" or not 0 < bits_stored < width:
        return arr
    if signed:
        as_signed = arr.astype(np.dtype(f"i{arr.dtype.itemsize}"), copy=True)
        shift = width - bits_stored
        return np.right_shift(np.left_shift(as_signed, shift), shift)
    return arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)


def _wide_gray(arr: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit and float Pillow images: the percentile window."""
    return _through_levels(arr, lambda values, counts: _percentile_window(np.asarray(values, np.float64), counts))


def _through_levels(arr: np.ndarray, to_gray) -> np.ndarray:
    """``to_gray(values, counts)`` → uint8 applied to an image. Integer images are mapped once per stored level
    (``counts[i]`` pixels hold ``values[i]``), then every pixel is looked up: the same result, about 5x faster.
    Float images, and ranges too wide for a table, are mapped pixel by pixel (``counts`` None)."""
    levels = _stored_levels(arr)
    if levels is None:
        return to_gray(arr, None)
    index, first, counts = levels
    return np.take(to_gray(np.arange(first, first + len(counts), dtype=np.int64), counts), index)


def _check_deflated(data: bytes, limits: ImageLimits) -> None:
    """A deflated DICOM may inflate a thousandfold; inflate it in bounded steps before pydicom inflates it whole."""
    if _DEFLATED not in data[132:132 + 65536]:
        return
    if data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        raise ImageRefused(UNSUPPORTED_DICOM, "deflated DICOM without a file meta group length cannot be checked "
                                              "before inflating, so it is not decoded")
    end = 144 + int.from_bytes(data[140:144], "little")
    if _DEFLATED not in data[132:end]:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunk = 0, data[end:]
    try:
        while chunk:
            total += len(inflater.decompress(chunk, 16 * 2**20))
            if total > limits.max_bytes:
                raise ImageRefused(TOO_LARGE, f"deflated DICOM inflates to more than {_mib(limits.max_bytes)}")
            chunk = inflater.unconsumed_tail
    except zlib.error:
        raise ImageRefused(CORRUPT, "deflated DICOM cannot be inflated") from None


def _dicom_identifiers(ds) -> dict[str, str]:
    out = {}
    for keyword in DICOM_IDENTIFIERS:
        value = _text(ds, keyword)
        if value:
            out[keyword] = value
    return out


def _text(ds, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is treated as absent
        return ""
    return "" if value is None else _one_line(str(value))[:64]


def _uid_name(uid) -> str:
    """pydicom's name for a registered UID (a fixed vocabulary, never file content), else ''."""
    from pydicom.uid import UID

    try:
        name = UID(str(uid)).name
    except Exception:  # noqa: BLE001
        return ""
    return "" if name == str(uid) else name


def _transfer_syntax_name(uid) -> str:
    uid = str(uid).strip()
    shown = uid if re.fullmatch(r"[0-9.]{1,64}", uid) else "(invalid UID)"
    name = _uid_name(uid)
    return f"{name} ({shown})" if name else shown


# ----------------------------------------------------------------------------- the decode budget

#: Peak bytes per pixel of a Pillow decode through to the S×S gray result, by the mode Pillow decodes to (it
#: keeps one band in one byte, 16-bit gray in two, 32-bit and float gray in four, and several bands in four):
#: the decoded image, the gray conversion and its tables, the crop. WebP always decodes through an RGBA buffer.
#: Upper bounds of measured peaks (docs/inputs.md); tests/test_hostile.py checks them against real decodes.
_PILLOW_BYTES_PER_PIXEL = {"1": 3, "L": 3, "P": 3, "I;16": 18, "I;16L": 18, "I;16B": 18, "I;16N": 18, "I": 32,
                           "F": 32}
_PILLOW_MULTIBAND_BYTES_PER_PIXEL = 12
_FORMAT_BYTES_PER_PIXEL = {"webp": 18}
#: DICOM: peak bytes per pixel per stored byte (samples × bytes allocated), by codec, and a fixed part per pixel
#: (the gray levels, the crop); the file itself is held about twice (the bytes, and pydicom's copy of the
#: pixel data element).
_DICOM_BYTES_PER_STORED_BYTE = {"native": 4, "RLE": 4, "JPEG": 6, "JPEG-LS": 6, "JPEG 2000": 6}
_DICOM_BYTES_PER_PIXEL = 5
_FILE_COPIES = 2
_FIXED_BYTES = 4 * 2**20  # what any decode allocates besides its pixels (interpreter objects, decoder state)


def pillow_decode_cost(fmt: str, mode: str, pixels: int, file_bytes: int) -> int:
    """Estimated peak memory (bytes) of decoding a PNG, JPEG, TIFF, BMP or WebP image of ``pixels`` pixels that
    Pillow opens in ``mode``."""
    per_pixel = _FORMAT_BYTES_PER_PIXEL.get(fmt) or _PILLOW_BYTES_PER_PIXEL.get(mode,
                                                                             _PILLOW_MULTIBAND_BYTES_PER_PIXEL)
    return pixels * per_pixel + _FILE_COPIES * file_bytes + _FIXED_BYTES


def dicom_decode_cost(codec: str, pixels: int, samples: int, bits_allocated: int, file_bytes: int) -> int:
    """Estimated peak memory (bytes) of decoding one frame of ``pixels`` pixels of a DICOM file whose pixel data
    is ``codec`` ("native", "RLE", "JPEG", "JPEG-LS", "JPEG 2000")."""
    stored = samples * max(1, bits_allocated // 8)
    return pixels * (stored * _DICOM_BYTES_PER_STORED_BYTE[codec] + _DICOM_BYTES_PER_PIXEL) \
        + _FILE_COPIES * file_bytes + _FIXED_BYTES


def _check_budget(name: str, cost: int, limits: ImageLimits) -> None:
    if cost > limits.max_decode_bytes:
        raise ImageRefused(TOO_LARGE, f"decoding this {name} image would take about {_mib(cost)} of memory; the "
                                      f"decode budget is {_mib(limits.max_decode_bytes)}")


# ----------------------------------------------------------------------------- shared steps


def _check_dimensions(name: str, width: int, height: int, limits: ImageLimits) -> None:
    if min(width, height) < limits.min_side:
        raise ImageRefused(TOO_SMALL, f"{name} image is {_dims(width, height)}; its shorter side must be at least "
                                      f"{limits.min_side} pixels")
    if width * height > limits.max_pixels:
        raise ImageRefused(TOO_LARGE, f"{name} image is {_dims(width, height)} ({width * height / 1e6:.1f} MP); at "
                                      f"most {limits.max_pixels / 1e6:.1f} MP is accepted")


MAX_LEVEL_TABLE = 1 << 20  # integer images spanning more stored levels than this are mapped pixel by pixel
_CHUNK = 1 << 20  # pixels per step of the whole-image passes that would otherwise make full-size temporaries


def _stored_levels(arr: np.ndarray) -> tuple[np.ndarray, int, np.ndarray] | None:
    """An integer image as (level index per pixel, first level, pixel count per level); None for float images
    or ones spanning more than MAX_LEVEL_TABLE levels."""
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return None
    first, last = int(arr.min()), int(arr.max())
    if last - first >= MAX_LEVEL_TABLE:
        return None
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 4:
        index = arr - arr.dtype.type(first) if first else arr  # no wrap-around: every pixel >= first
    else:  # signed, at most 32 bits: the difference fits in int32 (the range is < MAX_LEVEL_TABLE)
        index = arr.astype(np.int32)
        index -= np.int32(first)
    counts = np.zeros(last - first + 1, np.int64)
    flat = index.reshape(-1)
    for start in range(0, flat.size, _CHUNK):  # bincount widens its input to int64: a chunk at a time
        counts += np.bincount(flat[start:start + _CHUNK], minlength=len(counts))
    return index, first, counts


def _percentile_window(values: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """16-bit, float and window-less DICOM images: the 0.5-99.5 percentile range stretched to 0-255.

    With ``counts``, ``values`` are distinct levels and ``counts[i]`` pixels hold ``values[i]``; the
    percentiles are then those of the expanded image, as numpy's default (linear) method gives them."""
    if counts is None:
        lo, hi = np.percentile(values, (0.5, 99.5))
    else:
        lo, hi = _weighted_percentiles(values, counts, (0.5, 99.5))
    scale = max(hi - lo, 1e-6)
    out = np.empty(np.shape(values), np.uint8)
    flat, flat_out = np.ravel(values), out.reshape(-1)
    for start in range(0, flat.size, _CHUNK):  # the same arithmetic as one expression, without its temporaries
        part = flat[start:start + _CHUNK] - lo
        part /= scale
        np.clip(part, 0, 1, out=part)
        part *= 255
        flat_out[start:start + _CHUNK] = part  # truncates, as astype(np.uint8) does
    return out


def _weighted_percentiles(values: np.ndarray, counts: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    held = counts > 0
    order = np.argsort(values[held], kind="stable")
    ordered, cumulative = values[held][order], np.cumsum(counts[held][order])
    n = int(cumulative[-1])

    def kth(k: int) -> float:  # the k-th smallest pixel value (0-based)
        return float(ordered[np.searchsorted(cumulative, min(k, n - 1), side="right")])

    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        k = int(np.floor(position))
        below, above, t = kth(k), kth(k + 1), position - k
        out.append(above - (above - below) * (1 - t) if t >= 0.5 else below + (above - below) * t)  # numpy's lerp
    return out


def _crop_resize(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def _what_is_it(data: bytes) -> str:
    """A few words on what a refused file looks like (never its content)."""
    if not data:
        return "the file is empty"
    head = data[:512].lstrip().lower()
    for magic, kind in ((b"gif8", "GIF"), (b"%pdf", "PDF"), (b"pk\x03\x04", "ZIP archive"), (b"\x1f\x8b", "gzip"),
                        (b"<!doctype html", "HTML"), (b"<html", "HTML"), (b"<?xml", "XML"), (b"<svg", "SVG"),
                        (b"{", "JSON or text")):
        if head.startswith(magic):
            return f"it looks like {kind}"
    if data[:4] in (b"\x02\x00\x00\x00", b"\x08\x00\x05\x00", b"\x08\x00\x08\x00", b"\x08\x00\x16\x00"):
        return "it looks like DICOM without the 128-byte preamble and DICM prefix"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data[:512], final=False)
    except UnicodeDecodeError:
        return "unknown binary content"
    return "it looks like text"


def _one_line(text: str) -> str:
    """One line, no object reprs (``<_io.BytesIO object at 0x…>``), at most 300 characters."""
    text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>", "", str(text))
    return " ".join(text.split())[:300]


def _dims(width: int, height: int) -> str:
    return f"{width}×{height} pixels"


def _mib(nbytes: int) -> str:
    return f"{nbytes:,} bytes" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"
