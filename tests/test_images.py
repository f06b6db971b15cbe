"""kdray.images: the one loader for untrusted images. Every file here is generated in the test."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps, JpegImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (UID, BasicTextSRStorage, ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian,
                         ExplicitVRLittleEndian, JPEG2000Lossless, MediaStorageDirectoryStorage, MPEG2MPML, RLELossless,
                         generate_uid)

from kdray import KdrayError
from kdray import images
from kdray.images import (DEFAULT_LIMITS, REASONS, ImageLimits, ImageRefused, LoadedImage, check_file_size,
                          load_image, sniff_format)

pytestmark = pytest.mark.unit

PATIENT = "Doe^Jane"
PATIENT_ID = "PID-31337"
BIRTH_DATE = "19700101"


# ----------------------------------------------------------------------------- generated files


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt, **save) if mode else Image.fromarray(array).save(
        buf, format=fmt, **save)
    return buf.getvalue()


def _png(array: np.ndarray, **save) -> bytes:
    return _encode(array, "PNG", **save)


def _noise(shape, seed=0, dtype=np.uint8, high=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _smooth(height: int, width: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    """An image with structure at several scales (noise alone makes JPEG comparisons meaningless)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = 128 + 60 * np.sin(6 * xx + 2 * yy) + 40 * np.cos(11 * yy) + rng.normal(0, 4, (height, width))
    if channels:
        base = np.stack([base, base * 0.8 + 20, 255 - base], -1)
    return np.clip(base, 0, 255).astype(np.uint8)


def _png_header_says(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width × height (decoding it for real would fail)."""
    data = bytearray(_png(np.zeros((40, 40), np.uint8)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _dicom_dataset(array: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                   modality: str | None = "CR", frames: int | None = None, signed: bool = False,
                   transfer_syntax: str = ExplicitVRLittleEndian, **attrs) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT, PATIENT_ID, BIRTH_DATE
    ds.InstitutionName = "St Elsewhere"
    if modality is not None:
        ds.Modality = modality
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    colour = array.ndim == 3 and array.shape[-1] == 3 and frames is None
    ds.Rows, ds.Columns = array.shape[-3:-1] if colour else array.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = array.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if frames is not None:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = array.tobytes()
    return ds


def _save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom(array: np.ndarray, **kw) -> bytes:
    return _save(_dicom_dataset(array, **kw))


def _ramp(height: int = 64, width: int = 64, top: int = 4096) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) * top // (height * width)).astype(np.uint16)


def _old_decode_image(data: bytes, size: int) -> np.ndarray:
    """kdray.data.decode_image before kdray.images existed (the reference for pixel parity)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = np.percentile(arr, (0.5, 99.5))
            arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255
            img = Image.fromarray(arr.astype(np.uint8))
        else:
            img = img.convert("L")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != size:
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(img, dtype=np.uint8)


def _refused(data: bytes, reason: str, size: int = 32, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(ImageRefused) as info:
        load_image(data, size, limits)
    exc = info.value
    assert exc.reason == reason, f"{exc.reason}: {exc}"
    message = str(exc)
    assert message and "\n" not in message and "object at 0x" not in message and len(message) <= 300
    for secret in (PATIENT, "Doe", "Jane", PATIENT_ID, BIRTH_DATE, "St Elsewhere"):
        assert secret not in message
    return message


# ----------------------------------------------------------------------------- formats by content


def test_sniff_format_by_magic_bytes():
    png, jpeg = _png(np.zeros((4, 4), np.uint8)), _encode(np.zeros((8, 8), np.uint8), "JPEG")
    assert sniff_format(png) == "png" and sniff_format(jpeg) == "jpeg"
    assert sniff_format(b"II*\x00" + bytes(10)) == sniff_format(b"MM\x00*" + bytes(10)) == "tiff"
    assert sniff_format(b"BM" + bytes(60)) == "bmp"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(bytes(128) + b"DICM") == "dicom"
    assert sniff_format(b"II*\x00" + bytes(124) + b"DICM") == "dicom"  # a TIFF-looking preamble is still DICOM
    for other in (b"", b"GIF89a", b"hello", b"<html>", b"%PDF-1.4", b"\xff\xd8", b"\x89PNG"):
        assert sniff_format(other) is None


def test_pixels_equal_the_old_decoder():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the pixels must be turned upright
    rgba = _noise((50, 70, 4), seed=3)
    cases = {
        "gray png": (_png(_noise((40, 60))), 16),
        "rgb png": (_png(_smooth(48, 64, 3)), 32),
        "rgba png": (_png(rgba), 32),
        "16-bit png": (_png(_ramp(64, 80, 65536) | _noise((64, 80), 1, np.uint16, 16)), 32),
        "exif-rotated jpeg": (_encode(_smooth(200, 300, 3), "JPEG", exif=exif), 224),  # too small for draft
        "gray jpeg": (_encode(_smooth(300, 250), "JPEG", quality=90), 224),
        "tiff": (_encode(_noise((48, 40)), "TIFF"), 32),
        "16-bit tiff": (_encode(_ramp(40, 48, 65536), "TIFF"), 32),
        "bmp": (_encode(_smooth(40, 52, 3), "BMP"), 32),
        "webp": (_encode(_smooth(64, 48, 3), "WEBP", lossless=True), 32),
    }
    for name, (data, size) in cases.items():
        loaded = load_image(data, size)
        assert loaded.pixels.dtype == np.uint8 and loaded.pixels.shape == (size, size), name
        assert np.array_equal(loaded.pixels, _old_decode_image(data, size)), name
        assert loaded.dicom == {} and loaded.frames == 1, name
    rotated = load_image(cases["exif-rotated jpeg"][0], 224)
    assert (rotated.format, rotated.width, rotated.height) == ("jpeg", 300, 200)
    assert load_image(cases["rgba png"][0], 32).format == "png"
    assert load_image(cases["webp"][0], 32).format == "webp"


def test_jpeg_draft_decodes_small_and_close(monkeypatch):
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    exif = Image.Exif()
    exif[0x0112] = 8
    for array, save in ((_smooth(768, 1024, 3), {}), (_smooth(1024, 700), {}), (_smooth(900, 1200, 3), {"exif": exif})):
        data = _encode(array, "JPEG", quality=92, **save)
        drafted.clear()
        fast, exact = load_image(data, 224), images._load_image(data, 224, DEFAULT_LIMITS, draft=False)
        assert len(drafted) == 1 and min(drafted[0]) >= 224 and min(drafted[0]) < min(array.shape[:2]) // 1.9
        assert np.array_equal(exact.pixels, _old_decode_image(data, 224))
        assert fast.pixels.shape == (224, 224)
        assert np.abs(fast.pixels.astype(int) - exact.pixels.astype(int)).mean() < 3
    drafted.clear()
    load_image(_encode(_smooth(300, 400, 3), "JPEG"), 224)  # shorter side < 2 × 224: no draft at all
    assert drafted == []


def test_multipage_tiff_and_animated_png_use_the_first_frame():
    pages = [Image.fromarray(_noise((48, 40), seed)) for seed in range(3)]
    for fmt in ("TIFF", "PNG"):
        buf = io.BytesIO()
        pages[0].save(buf, format=fmt, save_all=True, append_images=pages[1:])
        loaded = load_image(buf.getvalue(), 32)
        assert loaded.frames == 3, fmt
        assert np.array_equal(loaded.pixels, load_image(_encode(_noise((48, 40), 0), fmt), 32).pixels), fmt


# ----------------------------------------------------------------------------- refusals


def test_not_images_are_refused(tmp_path):
    html = tmp_path / "scan.png"
    html.write_text("<!DOCTYPE html><html><body>404 not found</body></html>")
    gif = io.BytesIO()
    Image.fromarray(_noise((64, 64))).save(gif, format="GIF")
    assert "empty" in _refused(b"", "not_an_image")
    assert "text" in _refused(b"patient notes, nothing to see\n" * 20, "not_an_image")
    assert "HTML" in _refused(html.read_bytes(), "not_an_image")
    assert "GIF" in _refused(gif.getvalue(), "not_an_image")
    _refused(bytes(range(256)) * 4, "not_an_image")


def test_pillow_only_opens_the_sniffed_format():
    gif = io.BytesIO()
    Image.fromarray(_noise((64, 64))).save(gif, format="GIF")
    # A GIF's bytes behind a PNG signature: Pillow must not fall back to its GIF plugin.
    _refused(b"\x89PNG\r\n\x1a\n" + gif.getvalue(), "corrupt")


def test_truncated_and_corrupt_files():
    png = _png(_noise((80, 120)))
    jpeg = _encode(_smooth(120, 160, 3), "JPEG")
    assert "cut off" in _refused(png[:len(png) // 2], "truncated")
    _refused(png[:60], "truncated")
    _refused(png[:40], "truncated")  # cut inside the header
    _refused(jpeg[:len(jpeg) // 2], "truncated")
    _refused(jpeg[:20], "truncated")
    _refused(b"\x89PNG\r\n\x1a\n this is not really a png", "corrupt")
    _refused(_encode(_noise((64, 64)), "WEBP")[:200], "truncated")
    _refused(_encode(_noise((64, 64)), "BMP")[:500], "truncated")
    broken = bytearray(jpeg)
    at = jpeg.index(b"\xff\xdb")
    broken[at:at + 2] = b"\x00\x00"  # no marker where the quantisation table's must be
    _refused(bytes(broken), "corrupt")


def test_size_limits_are_checked_from_the_header(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels decoded before the limits were checked")

    tiny, narrow = _png(np.zeros((1, 1), np.uint8)), _png(np.zeros((31, 400), np.uint8))
    big, huge, giant = _png_header_says(9000, 9000), _png_header_says(12000, 12000), _png_header_says(20000, 20000)
    jpeg = _encode(np.zeros((32, 32), np.uint8), "JPEG")
    load_image(narrow, 32, ImageLimits(min_side=16))
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", no_decoding)
    assert "1×1 pixels" in _refused(tiny, "too_small")
    _refused(narrow, "too_small")
    assert "81.0 MP" in _refused(big, "too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert "144.0 MP" in _refused(huge, "too_large")
        # Over Pillow's warning limit where our own cap would allow it: refused all the same.
        assert "Pillow" in _refused(huge, "too_large", limits=ImageLimits(max_pixels=10**10))
    with warnings.catch_warnings():  # where warning filters turn Pillow's warning into an exception
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert "Pillow" in _refused(huge, "too_large", limits=ImageLimits(max_pixels=10**10))
    # Over Pillow's own bomb limit (DecompressionBombError) even where our cap would allow it.
    assert "Pillow" in _refused(giant, "too_large", limits=ImageLimits(max_pixels=10**10))
    _refused(jpeg, "too_small", limits=ImageLimits(min_side=33))


def test_defaults_and_file_size_limit():
    assert DEFAULT_LIMITS == ImageLimits(32, 64_000_000, 512 * 2**20, ("CR", "DX"))
    assert 12000 * 12000 > DEFAULT_LIMITS.max_pixels >= 8000 * 8000
    check_file_size(512 * 2**20)
    with pytest.raises(ImageRefused) as info:
        check_file_size(512 * 2**20 + 1)
    assert info.value.reason == "file_too_large" and "512.0 MiB" in str(info.value)
    _refused(_png(np.zeros((40, 40), np.uint8)), "file_too_large", limits=ImageLimits(max_bytes=64))


def test_refusal_is_a_picklable_kdray_error():
    exc = ImageRefused("truncated", "PNG file <_io.BytesIO object at 0x7f00deadbeef> is\ncut off")
    assert isinstance(exc, KdrayError) and str(exc) == "PNG file is cut off"
    again = pickle.loads(pickle.dumps(exc))
    assert (again.reason, str(again)) == ("truncated", "PNG file is cut off")
    with pytest.raises(ValueError):
        ImageRefused("nonsense", "x")
    assert REASONS == ("not_an_image", "truncated", "too_small", "too_large", "file_too_large", "unsupported_dicom",
                       "no_pixels", "wrong_modality", "io_error", "corrupt", "missing", "forbidden", "outside_roots",
                       "not_a_file", "sparse_member")
    assert images.IO_ERROR == "io_error"


# ----------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_loads_with_its_identifiers_only():
    ds = _dicom_dataset(_ramp())
    loaded = load_image(_save(ds), 64)
    assert isinstance(loaded, LoadedImage) and loaded.pixels.shape == (64, 64) and loaded.pixels.dtype == np.uint8
    assert (loaded.format, loaded.width, loaded.height, loaded.frames) == ("dicom", 64, 64, 1)
    assert loaded.dicom == {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
                            "SOPInstanceUID": ds.SOPInstanceUID, "Modality": "CR", "BodyPartExamined": "CHEST",
                            "ViewPosition": "PA"}
    assert loaded.pixels[0, 0] == 0 and loaded.pixels[-1, -1] == 255  # window-less: percentile stretch
    rectangular = load_image(_dicom(_ramp(40, 90), modality="DX"), 32)
    assert (rectangular.width, rectangular.height) == (90, 40)


def test_dicom_without_window_matches_a_16_bit_png():
    pixels = (_ramp(64, 64, 4096) + _noise((64, 64), 2, np.uint16, 64)).astype(np.uint16)
    from_dicom = load_image(_dicom(pixels), 64).pixels.astype(int)
    from_png = load_image(_png(pixels), 64).pixels.astype(int)
    assert np.abs(from_dicom - from_png).max() <= 1


@pytest.mark.parametrize("case", ["unsigned", "signed-rescaled", "windowed", "png-16"])
def test_level_table_gives_the_same_pixels_as_mapping_every_pixel(monkeypatch, case):
    """Integer images are mapped once per stored level and looked up; that must equal mapping every pixel."""
    rng = np.random.default_rng(11)
    if case == "signed-rescaled":
        pixels = rng.normal(200, 900, (96, 80)).clip(-2048, 2047).astype(np.int16)
        data = _dicom(pixels, signed=True, bits_stored=12, RescaleSlope=2.5, RescaleIntercept=-1024)
    elif case == "png-16":
        data = _png(rng.normal(30000, 9000, (96, 80)).clip(0, 65535).astype(np.uint16))
    else:
        pixels = rng.normal(1800, 600, (96, 80)).clip(0, 4095).astype(np.uint16)
        data = _dicom(pixels, bits_stored=12, **(dict(WindowCenter=1500, WindowWidth=1200) if case == "windowed"
                                                 else {}))
    by_table = load_image(data, 64).pixels
    monkeypatch.setattr(images, "MAX_LEVEL_TABLE", 0)  # every image now too wide for a table
    by_pixel = load_image(data, 64).pixels
    assert by_table.std() > 10 and np.array_equal(by_table, by_pixel)


def test_monochrome1_is_inverted():
    pixels = _ramp() + _noise((64, 64), 5, np.uint16, 50)
    m2 = load_image(_dicom(pixels, photometric="MONOCHROME2"), 64).pixels
    m1 = load_image(_dicom(pixels, photometric="MONOCHROME1"), 64).pixels
    assert np.array_equal(m1, 255 - m2)
    windowed = dict(WindowCenter=2048, WindowWidth=2048)
    assert np.array_equal(load_image(_dicom(pixels, photometric="MONOCHROME1", **windowed), 64).pixels,
                          255 - load_image(_dicom(pixels, **windowed), 64).pixels)


def test_bits_stored_is_honoured():
    pixels = _ramp(64, 64, 4096)
    clean = load_image(_dicom(pixels, bits_stored=12), 32).pixels
    dirty = load_image(_dicom(pixels | 0xF000, bits_stored=12), 32).pixels  # garbage above bit 11
    assert np.array_equal(clean, dirty)
    assert np.array_equal(images._honour_bits_stored(pixels | 0xF000, 12, False), pixels)
    signed = np.array([[-2048, -1, 0, 2047]], np.int16)
    assert np.array_equal(images._honour_bits_stored((signed.view(np.uint16) & 0x0FFF).view(np.int16), 12, True),
                          signed)
    values = np.array([-1000, 0, 1000, 2000], np.int16).repeat(1024).reshape(64, 64)
    as_stored = (values.view(np.uint16) & 0x0FFF | 0x5000).view(np.int16)  # 12-bit two's complement, junk on top
    a = load_image(_dicom(values, signed=True, bits_stored=12), 64).pixels
    b = load_image(_dicom(as_stored, signed=True, bits_stored=12), 64).pixels
    assert np.array_equal(a, b) and a[0, 0] < a[-1, -1]


def test_voi_window_and_rescale_are_applied():
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # columns: 0, 64, ..., 4032
    out = load_image(_dicom(pixels, bits_stored=12, WindowCenter=1000, WindowWidth=500), 64).pixels
    column = out[0].astype(int)
    assert (column[pixels[0] <= 750] == 0).all() and (column[pixels[0] > 1250] == 255).all()
    inside = (pixels[0] > 760) & (pixels[0] < 1240)
    expected = ((pixels[0][inside] - 999.5) / 499 + 0.5) * 255
    assert np.abs(column[inside] - expected).max() <= 1.0
    assert not np.array_equal(out, load_image(_dicom(pixels, bits_stored=12), 64).pixels)  # not the percentile path
    # Rescale first: stored v means 2·v - 1000, and the window is in rescaled units.
    rescaled = load_image(_dicom(pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000, RescaleType="US",
                                 WindowCenter=1000, WindowWidth=1000), 64).pixels
    assert np.abs(rescaled.astype(int) - out).max() <= 1  # LINEAR's -0.5 / -1 are in rescaled units
    # An unusable window (LINEAR needs width >= 1) falls back to the percentile window instead of failing.
    assert load_image(_dicom(pixels, bits_stored=12, WindowCenter=10, WindowWidth=0), 64).pixels.max() == 255


def test_voi_lut_sequence_is_applied():
    pixels = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (64, 1))
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = [0] * 128 + [65535] * 128  # a step at 128
    item["LUTData"].VR = "US"
    out = load_image(_dicom(pixels, bits_stored=8, VOILUTSequence=[item]), 64).pixels
    assert (out[:, pixels[0] < 128] == 0).all() and (out[:, pixels[0] >= 128] == 255).all()


def test_multiframe_uses_the_first_frame():
    frames = np.stack([_ramp(), 4095 - _ramp(), _ramp() // 2])
    loaded = load_image(_dicom(frames, frames=3, bits_stored=12), 32)
    assert loaded.frames == 3 and (loaded.width, loaded.height) == (64, 64)
    assert np.array_equal(loaded.pixels, load_image(_dicom(frames[0], bits_stored=12), 32).pixels)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # pydicom, on the cut-off copy
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_dicom_decodes(syntax):
    pixels = _ramp() + _noise((64, 64), 9, np.uint16, 30)
    ds = _dicom_dataset(pixels, bits_stored=12)
    ds.compress(syntax)  # RLE: pydicom itself; JPEG 2000: pylibjpeg-openjpeg
    data = _save(ds)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_image(data, 48).pixels, load_image(_dicom(pixels, bits_stored=12), 48).pixels)
    _refused(data[:-500], "truncated")


def test_deflated_dicom_is_inflated_within_the_byte_limit():
    pixels = np.zeros((512, 512), np.uint16)
    pixels[::2] = 1000
    data = _dicom(pixels, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert len(data) < 20_000
    assert load_image(data, 32).pixels.shape == (32, 32)
    assert "inflates" in _refused(data, "too_large", limits=ImageLimits(max_bytes=100_000))


def test_colour_dicom_is_converted_to_luma():
    rgb = _smooth(48, 64, 3)
    loaded = load_image(_dicom(rgb, photometric="RGB"), 48)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))[:, 8:56]
    assert np.array_equal(loaded.pixels, expected)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, on the UID a cut-off file ends inside
def test_dicom_refusals_never_leak_patient_data(tmp_path):
    # Modality outside the allowed set; None accepts any.
    assert "modality CT" in _refused(_dicom(_ramp(), modality="CT"), "wrong_modality")
    _refused(_dicom(_ramp(), modality=None), "wrong_modality")
    assert load_image(_dicom(_ramp(), modality="CT"), 32, ImageLimits(modalities=None)).dicom["Modality"] == "CT"
    assert load_image(_dicom(_ramp(), modality="MG"), 32, ImageLimits(modalities=("MG",))).format == "dicom"
    # No pixel data: a structured report, a DICOMDIR-like file set.
    sr = _dicom_dataset(_ramp(), modality="SR")
    for key in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                "HighBit", "PixelRepresentation", "PixelData"):
        del sr[key]
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    assert "Basic Text SR" in _refused(_save(sr), "no_pixels")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MediaStorageDirectoryStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir = Dataset()
    dicomdir.file_meta = meta
    dicomdir.FileSetID, dicomdir.PatientName = "SCANS", PATIENT
    dicomdir.DirectoryRecordSequence = []
    buf = io.BytesIO()
    dicomdir.save_as(buf, enforce_file_format=True)
    _refused(buf.getvalue(), "no_pixels")
    # Too small, too large (from Rows/Columns: the 4-byte pixel data is never looked at), truncated.
    _refused(_dicom(_ramp(16, 16)), "too_small")
    huge = _dicom_dataset(_ramp(2, 2), Rows=9000, Columns=9000)
    assert "9000×9000" in _refused(_save(huge), "too_large")
    data = _dicom(_ramp())
    _refused(data[:-100], "truncated")
    _refused(data[:len(data) // 3], "truncated")
    _refused(data[:400], "truncated")
    # A transfer syntax nothing here can decode.
    video = _dicom_dataset(_ramp())
    video.file_meta.TransferSyntaxUID = MPEG2MPML
    video.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    video["PixelData"].VR = "OB"
    assert "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100)" in _refused(_save(video), "unsupported_dicom")
    private = _dicom_dataset(_ramp())
    private.file_meta.TransferSyntaxUID = UID("1.2.3.4.5.6")
    private.PixelData = pydicom.encaps.encapsulate([bytes(64)])
    private["PixelData"].VR = "OB"
    buf = io.BytesIO()
    private.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    assert "1.2.3.4.5.6" in _refused(buf.getvalue(), "unsupported_dicom")
    # Garbage in the pixel module.
    _refused(_dicom(_ramp(), photometric="CMYK"), "unsupported_dicom")


def test_dicom_named_png_is_read_as_dicom(tmp_path):
    path = tmp_path / "chest.png"
    path.write_bytes(_dicom(_ramp(), modality="DX"))
    loaded = load_image(path.read_bytes(), 32)
    assert loaded.format == "dicom" and loaded.dicom["Modality"] == "DX"


# ----------------------------------------------------------------------------- kdray.data goes through the loader


def test_decode_image_and_describe_decode_error_use_the_loader():
    from kdray.data import decode_image, describe_decode_error

    data = _png(_noise((40, 60)))
    assert np.array_equal(decode_image(data, 16), load_image(data, 16).pixels)
    assert np.array_equal(decode_image(_dicom(_ramp()), 32), load_image(_dicom(_ramp()), 32).pixels)
    with pytest.raises(ImageRefused) as info:
        decode_image(b"\x89PNG\r\n\x1a\n this is not really a png", 16)
    assert describe_decode_error(info.value).startswith("cannot decode image: corrupt: PNG header is damaged")
    with pytest.raises(ImageRefused) as info:
        decode_image(b"definitely not an image", 16)
    assert describe_decode_error(info.value).startswith("cannot decode image: not_an_image: not a recognised")
    read_error = OSError(f"cannot read {io.BytesIO()!r}\nsecond line")
    described = describe_decode_error(read_error)
    assert described.startswith("cannot decode image: io_error: OSError: cannot read")
    assert "object at 0x" not in described and "\n" not in described


# ----------------------------------------------------------------------------- the decode budget


def test_chunked_passes_give_the_pixels_of_one_whole_image_pass(monkeypatch):
    """The percentile window and the level counts run a chunk at a time (no full-size temporaries): the same
    result as the one-expression version, whatever the chunk."""
    values = np.random.default_rng(4).normal(1000, 300, (37, 53))
    lo, hi = np.percentile(values, (0.5, 99.5))
    expected = (np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    wide = (values * 40).astype(np.int32)
    whole = images._stored_levels(wide)
    monkeypatch.setattr(images, "_CHUNK", 100)
    assert np.array_equal(images._percentile_window(values), expected)
    chunked = images._stored_levels(wide)
    assert chunked[1] == whole[1] and np.array_equal(chunked[2], whole[2]) and np.array_equal(chunked[0], whole[0])


def test_serving_budget_is_tighter_than_scorings():
    from kdray.images import SERVING_LIMITS

    assert SERVING_LIMITS.max_decode_bytes < DEFAULT_LIMITS.max_decode_bytes
    assert SERVING_LIMITS.max_bytes < DEFAULT_LIMITS.max_bytes
    big = _png(_noise((3000, 3000), 2, np.uint16, 4096))  # 16-bit gray: about 18 bytes a pixel to decode
    loaded = load_image(big, 32)
    assert 3000 * 3000 * 10 < loaded.decode_bytes < 3000 * 3000 * 30
    assert "decode budget" in _refused(big, "too_large", limits=ImageLimits(max_decode_bytes=loaded.decode_bytes - 1))


def test_dicom_frames_over_the_cap_are_refused_and_the_first_is_scored_below_it():
    frames = np.stack([_ramp(), 4095 - _ramp(), _ramp() // 2])
    data = _dicom(frames, frames=3, bits_stored=12)
    assert load_image(data, 32, ImageLimits(max_frames=3)).frames == 3
    assert "3 frames" in _refused(data, "too_large", limits=ImageLimits(max_frames=2))


def test_rle_without_its_bounded_decoder_is_unsupported(monkeypatch):
    """RLE is decoded only by pylibjpeg-rle: pydicom's own RLE decoder grows with what a segment expands to."""
    from pydicom.pixels.decoders.base import RLELosslessDecoder

    pixels = _ramp()
    ds = _dicom_dataset(pixels, bits_stored=12)
    ds.compress(RLELossless)
    data = _save(ds)
    assert load_image(data, 32).format == "dicom"
    monkeypatch.setattr(type(RLELosslessDecoder), "available_plugins", property(lambda self: ("pydicom",)),
                        raising=False)
    _refused(data, "unsupported_dicom")
