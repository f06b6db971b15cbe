"""A small, learnable, 3-class synthetic chest-X-ray-like data set for tests, benchmarks and the embedded demo.

Each image is a dark frame with a bright body, two darker lung fields, ribs and noise.
- ``normal``: clear lungs.
- ``pneumonia``: one dense, sharply bounded consolidation in one lung.
- ``covid``: several faint, diffuse ground-glass patches in the outer lower parts of both lungs.
Positions, sizes, exposure and noise vary per image, so a model has to learn the pattern.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from kdray import storage

log = logging.getLogger(__name__)
CLASSES = ("covid", "normal", "pneumonia")


def _blob(yy, xx, cy, cx, ry, rx, sharp: float) -> np.ndarray:
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return 1 / (1 + np.exp(np.clip((d - 1) * sharp, -50, 50)))


def make_image(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shift_y, shift_x = rng.normal(0, 0.02, 2)
    body = _blob(yy, xx, 0.55 + shift_y, 0.5 + shift_x, 0.5, 0.42, 6) * rng.uniform(0.55, 0.7)
    lungs = np.zeros_like(yy)
    centres = []
    for side in (-1, 1):
        cy, cx = 0.5 + shift_y + rng.normal(0, 0.01), 0.5 + side * 0.17 + shift_x + rng.normal(0, 0.01)
        ry, rx = rng.uniform(0.25, 0.3), rng.uniform(0.11, 0.14)
        lungs += _blob(yy, xx, cy, cx, ry, rx, 8)
        centres.append((cy, cx, ry, rx))
    img = body - 0.35 * lungs
    ribs = 0.04 * (np.sin((yy + 0.02 * np.sin(xx * 9)) * rng.uniform(38, 44)) > 0.6) * lungs
    img += ribs
    if label == "pneumonia":
        cy, cx, ry, rx = centres[rng.integers(2)]
        img += 0.45 * lungs * _blob(yy, xx, cy + rng.uniform(-0.1, 0.15), cx + rng.uniform(-0.04, 0.04),
                                    rng.uniform(0.09, 0.13), rng.uniform(0.06, 0.09), 10)
    elif label == "covid":
        for cy, cx, ry, rx in centres:
            side = np.sign(cx - 0.5)
            for _ in range(rng.integers(2, 4)):
                img += 0.2 * lungs * _blob(yy, xx, cy + rng.uniform(0.02, 0.2), cx + side * rng.uniform(0.02, 0.08),
                                            rng.uniform(0.05, 0.09), rng.uniform(0.04, 0.06), 3)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_dataset(output: str, per_class: dict[str, int] | None = None, size: int = 128, seed: int = 0) -> dict:
    """Write an ImageFolder tree ``<output>/<split>/<class>/<n>.png``; ``per_class`` maps split → images per class."""
    per_class = per_class or {"train": 60, "val": 20}
    rng = np.random.default_rng(seed)
    storage.makedirs(output)
    counts = {}
    for split, n in per_class.items():
        for label in CLASSES:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(make_image(label, size, rng)).save(buf, format="PNG")
                storage.write_bytes(storage.join(output, split, label, f"{label}-{split}-{i:04d}.png"), buf.getvalue())
            counts[f"{split}/{label}"] = n
    log.info("wrote synthetic chest X-rays to %s: %s", output, counts)
    return counts


def demo_dataset(prefix: str, train_per_class: int, val_per_class: int, size: int) -> str:
    """The URI of the generated set of these settings under ``prefix``, written first unless an earlier run left
    one there (its ``val`` split, written after ``train``, is what is looked for)."""
    counts = {"train": train_per_class, "val": val_per_class}
    data = f"{prefix.rstrip('/')}/synthetic-{size}px-" + "-".join(map(str, counts.values()))
    if storage.exists(f"{data}/val"):
        log.info("using the generated data already in %s", data)
    else:
        make_dataset(data, counts, size)
    return data


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "CR", bits_stored: int = 12,
                **attributes) -> bytes:
    """A CR DICOM file (Explicit VR Little Endian) holding uint16 ``pixels``, [rows, cols] or [frames, rows, cols].

    Study/Series/SOP UIDs are fresh; ``attributes`` (e.g. ``PatientName``, ``WindowCenter``) are set as given."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
