"""Listing, decoding, preprocessing and augmentation of chest X-rays, and the Ray Datasets built from them.

There is exactly one preprocessing path, used by training, the logit cache, evaluation,
scoring, serving and ``kdray predict``:

    bytes --decode_image--> uint8 [S, S] grayscale --to_model_input--> float32 [N, 3, S, S]

``decode_image`` applies the EXIF orientation, converts to 8-bit grayscale (16-bit images are
windowed to their 0.5-99.5 percentiles), centre-crops to a square and resizes to S×S.
``to_model_input`` optionally augments (training only), repeats to three channels and
normalises with the ImageNet statistics so that ImageNet weights can be used as they are.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from kdray import KdrayError, storage
from kdray.config import AugmentConfig, DataConfig
from kdray.images import DECODER_VERSION, DEFAULT_LIMITS, IO_ERROR, ImageRefused, load_image
from kdray.inputs import read_named
from kdray.runner import kdray_errors_from_ray

log = logging.getLogger(__name__)

# which files of an ImageFolder tree are training images (the loader itself judges content, not names)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE_COLUMNS = ("source", "source_repo")


# ----------------------------------------------------------------------------- listing


@dataclass
class Listing:
    """The images of one split: what to read, their labels, and where they came from."""

    root: str
    split: str
    classes: list[str]
    image_ids: list[str]
    paths: list[str]  # paths inside ``fs`` (no scheme)
    labels: list[int]
    sources: list[str] | None = None
    fs: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self) -> list[dict]:
        out = [{"image_id": i, "path": p, "label": y} for i, p, y in zip(self.image_ids, self.paths, self.labels)]
        if self.sources is not None:
            for row, src in zip(out, self.sources):
                row["source"] = src
        return out

    def class_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes)).tolist()

    def signature(self) -> str:
        """A stable hash of what this listing contains (ids and labels), for fingerprints."""
        sha = hashlib.sha256(",".join(self.classes).encode())
        for image_id, label in sorted(zip(self.image_ids, self.labels)):
            sha.update(f"\n{image_id}\t{label}".encode())
        return sha.hexdigest()


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith((".csv", ".parquet"))


def _source_column(table: pa.Table) -> str | None:
    return next((c for c in SOURCE_COLUMNS if c in table.column_names), None)


def list_split(root: str, split: str, classes: list[str] | None = None, limit: int = 0) -> Listing:
    """List one split of an ImageFolder tree (``<root>/<split>/<class>/*``) or of a manifest.

    ``image_id`` is the image's path relative to the data root, so it is stable across
    machines and storage back ends; later stages join cached logits on it. A
    ``manifest.csv`` beside an ImageFolder tree contributes its source column, if any.
    """
    loc = storage.resolve(root)
    if _is_manifest(root):
        listing = _list_manifest(loc, split, classes)
    else:
        listing = _list_image_folder(loc, split, classes)
    if limit and len(listing) > limit:
        keep = np.random.default_rng(0).permutation(len(listing))[:limit]
        keep.sort()
        listing = _subset(listing, keep)
    log.info("%s/%s: %d images in %d classes %s", root, split, len(listing), len(listing.classes), listing.class_counts())
    return listing


def _subset(listing: Listing, keep: np.ndarray) -> Listing:
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return Listing(listing.root, listing.split, listing.classes, pick(listing.image_ids), pick(listing.paths),
                   pick(listing.labels), pick(listing.sources), listing.fs)


def _check_classes(found: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if not wanted:
        return sorted(found)
    missing = sorted(set(found) - set(wanted))
    if missing:
        raise KdrayError(f"{where}: labels {missing} are not among the configured classes {wanted}")
    return list(wanted)


def _list_image_folder(loc: storage.Location, split: str, classes: list[str] | None) -> Listing:
    split_loc = loc.join(split) if split else loc
    files = storage.list_files(split_loc)
    prefix = split_loc.path.rstrip("/") + "/"
    by_class: dict[str, list[str]] = {}
    for f in files:
        rel = f.path[len(prefix):]
        parts = rel.split("/")
        if len(parts) != 2 or not parts[1].lower().endswith(IMAGE_EXTENSIONS) or parts[1].startswith("."):
            continue
        by_class.setdefault(parts[0], []).append(f.path)
    if not files:
        raise KdrayError(f"{split_loc.uri}: folder is empty")
    if not by_class:
        raise KdrayError(f"{split_loc.uri}: no class folders with images (expected <split>/<class>/*.png|jpg)")
    classes = _check_classes(list(by_class), classes, split_loc.uri)
    root_prefix = loc.path.rstrip("/") + "/"
    paths = [p for c in sorted(by_class) for p in sorted(by_class[c])]
    labels = [classes.index(c) for c in sorted(by_class) for _ in by_class[c]]
    ids = [p[len(root_prefix):] for p in paths]
    sources = _sources_from_manifest(loc, ids)
    return Listing(loc.uri, split, classes, ids, paths, labels, sources, loc.fs)


def _sources_from_manifest(loc: storage.Location, image_ids: list[str]) -> list[str] | None:
    manifest = loc.join("manifest.csv")
    if not storage.exists(manifest):
        return None
    table = storage.read_table(manifest, "manifest")
    column = _source_column(table)
    if column is None or "path" not in table.column_names:
        return None
    by_path = dict(zip(table["path"].to_pylist(), table[column].to_pylist()))
    return [str(by_path.get(i, "unknown")) for i in image_ids]


def _list_manifest(loc: storage.Location, split: str, classes: list[str] | None) -> Listing:
    table = storage.read_table(loc, "manifest")
    for col in ("path", "label"):
        if col not in table.column_names:
            raise KdrayError(f"{loc.uri}: manifest needs columns path,label[,split]; found {table.column_names}")
    if split and "split" in table.column_names:
        table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise KdrayError(f"{loc.uri}: no rows for split {split!r}")
    base = posixpath.dirname(loc.path)
    rel_paths = [str(p) for p in table["path"].to_pylist()]
    paths = []
    for p in rel_paths:
        if p.startswith("s3://"):
            paths.append(p[len("s3://"):])
        else:
            paths.append(p if p.startswith("/") else posixpath.join(base, p))
    labels_raw = [str(x) for x in table["label"].to_pylist()]
    classes = _check_classes(list(set(labels_raw)), classes, loc.uri)
    column = _source_column(table)
    sources = [str(s) for s in table[column].to_pylist()] if column else None
    return Listing(loc.uri, split, classes, rel_paths, paths, [classes.index(x) for x in labels_raw], sources, loc.fs)


# ----------------------------------------------------------------------------- decoding and preprocessing


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes to a uint8 [size, size] grayscale array: :func:`kdray.images.load_image`'s pixels.

    Raises :class:`kdray.images.ImageRefused` (with a ``reason`` code) for anything it will not decode.
    """
    return load_image(data, size).pixels


def _read_checked(fs, path: str) -> bytes:
    """A file's bytes, read as scoring reads inputs (:func:`kdray.inputs.read_named`: a FIFO or device refused
    unopened, never more than the byte limit). An S3 that cannot be reached is retried, then
    :class:`storage.S3Unavailable`, which the callers let through: an outage stops the job instead of dropping
    the images it hides."""
    return read_named(path, DEFAULT_LIMITS, fs)


def describe_decode_error(exc: Exception) -> str:
    """One line for a failed read or decode: ``cannot decode image: <reason code>: <message>``.

    An :class:`ImageRefused` gives its own reason; any other exception (reading the bytes failed) is ``io_error``.
    """
    if isinstance(exc, ImageRefused):
        return f"cannot decode image: {exc.reason}: {exc}"
    detail = " ".join(re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>", "", str(exc)).split())
    return f"cannot decode image: {IO_ERROR}: {type(exc).__name__}" + (f": {detail}" if detail else "")[:300]


def view_seeds(image_ids, views) -> np.ndarray:
    """Deterministic augmentation seeds for (image_id, view) pairs; view 0 is the clean image (seed -1)."""
    return np.array([zlib.crc32(f"{i}#{int(v)}".encode()) if int(v) > 0 else -1 for i, v in zip(image_ids, views)],
                    dtype=np.int64)


def augment(x: torch.Tensor, cfg: AugmentConfig, seeds: np.ndarray | None = None) -> torch.Tensor:
    """Random affine + brightness/contrast on a float [N, 1, S, S] batch in [0, 1].

    With ``seeds`` each sample's parameters come from its own seed, so the same
    (image, seed) always gives the same view: the teacher and the student see identical
    augmented images under consistent teaching. Without seeds they are drawn fresh.
    """
    n = x.shape[0]
    if seeds is None:
        seeds = np.random.randint(0, 2**31 - 1, size=n)
    params = np.array([_augment_params(int(s), cfg) for s in seeds], dtype=np.float64)
    angle, tx, ty, scale, bright, contrast, flip = (torch.as_tensor(params[:, i], dtype=x.dtype, device=x.device)
                                                    for i in range(7))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip_sign = 1 - 2 * flip
    theta = torch.stack([torch.stack([cos * flip_sign, -sin, tx], 1), torch.stack([sin * flip_sign, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast.view(-1, 1, 1, 1) + mean + bright.view(-1, 1, 1, 1)
    return out.clamp_(0, 1)


IDENTITY_PARAMS = [0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def _augment_params(seed: int, cfg: AugmentConfig) -> list[float]:
    """Affine and intensity parameters for one sample; a negative seed means the clean (identity) view."""
    if seed < 0:
        return IDENTITY_PARAMS
    rng = np.random.default_rng(seed)
    return [
        np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)),
        rng.uniform(-cfg.translate, cfg.translate) * 2,  # affine_grid coordinates span [-1, 1]
        rng.uniform(-cfg.translate, cfg.translate) * 2,
        rng.uniform(cfg.scale_min, cfg.scale_max),
        rng.uniform(-cfg.brightness, cfg.brightness),
        rng.uniform(1 - cfg.contrast, 1 + cfg.contrast),
        float(cfg.hflip and rng.random() < 0.5),
    ]


def to_model_input(images, augment_cfg: AugmentConfig | None = None, seeds: np.ndarray | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, S, S] (numpy or torch) → normalised float32 [N, 3, S, S], optionally augmented."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.require(images, np.uint8, "W"))
    x = x.to(device, non_blocking=True)
    x = x.unsqueeze(1).float().div_(255.0)
    if augment_cfg is not None and augment_cfg.enabled:
        x = augment(x, augment_cfg, seeds)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def preprocess_config(size: int) -> dict:
    """What a consumer of an exported model needs to reproduce the preprocessing."""
    return {
        "decoder": DECODER_VERSION,
        "decode": "kdray.images.load_image: PNG/JPEG/TIFF/BMP/WebP/DICOM by content; EXIF orientation; 8-bit "
                  "grayscale (ITU-R 601 luma; 16-bit windowed to 0.5-99.5 pct; DICOM: modality LUT, VOI LUT or "
                  "window, MONOCHROME1 inverted); JPEG decoded at the smallest DCT scale >= the crop",
        "crop": "centre square", "resize": [size, size], "interpolation": "bilinear",
        "channels": "grayscale repeated to 3", "scale": "1/255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "layout": "NCHW float32",
    }


# ----------------------------------------------------------------------------- Ray Datasets


class DecodeBatch:
    """Ray Data map_batches callable: read each image's bytes and decode it; failures are flagged, not raised."""

    def __init__(self, fs, size: int):
        self.fs, self.size = fs, size

    def __call__(self, batch: dict) -> dict:
        images = np.zeros((len(batch["path"]), self.size, self.size), dtype=np.uint8)
        errors = []
        for i, path in enumerate(batch["path"]):
            try:
                images[i] = decode_image(_read_checked(self.fs, str(path)), self.size)
                errors.append("")
            except storage.S3Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped, never fatal
                reason = describe_decode_error(exc)
                log.warning("skipping unreadable image %s (%s)", path, reason)
                errors.append(reason)
        batch["image"] = images
        batch["error"] = np.array(errors, dtype=object)
        return batch


def decoded_dataset(listing: Listing, size: int, shuffle_seed: int | None = None, **ray_remote_args):
    """A Ray Dataset of the listing, decoded: image_id, path, label, [source], image (uint8 S×S), error.

    With ``shuffle_seed`` the rows are shuffled once, so that blocks (and training batches) mix classes.
    ``ray_remote_args`` go to the decode tasks (e.g. :func:`on_driver_node`).
    """
    import ray

    if len(listing) == 0:
        raise KdrayError(f"{listing.root}/{listing.split}: no images")
    rows = listing.rows()
    if shuffle_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
    blocks = max(1, min(64, len(rows) // 64))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return ds.map_batches(DecodeBatch(listing.fs, size), batch_size=64, batch_format="numpy", **ray_remote_args)


def on_driver_node() -> dict:
    """Ray remote args that run tasks, and so keep their output blocks, on this driver's node.

    A decoded split is materialised once and read for every epoch. Blocks spread over the cluster die with
    their node, and after a lost node Ray cannot rebuild them: their decode tasks would need CPUs that the
    restarted training workers hold, so the run hung in its first batch (docs/scaling.md). Kept on the driver's
    node (the head, for a submitted job), they outlive any worker node. Where
    that node offers no CPU (a ``num-cpus: 0`` head), the blocks spread as before, and a warning says so."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node and n["Alive"]), 0)
    if cpus < 1:
        log.warning("the driver's node has no CPU for Ray tasks: decoded training data is spread over the "
                    "cluster, and losing a node during training loses part of it")
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def load_split(listing: Listing, size: int, shuffle_seed: int | None = None):
    """Decode a split once into the object store of the driver's node (:func:`on_driver_node`), dropping and
    reporting unreadable files.

    Returns ``(dataset, skipped)`` where ``skipped`` is a list of ``{"path", "reason"}``.
    The dataset has columns image_id, label, image and, where known, source.
    """
    pinned = on_driver_node()
    with kdray_errors_from_ray():  # S3 away after the retry budget: one line, not Ray's traceback
        ds = decoded_dataset(listing, size, shuffle_seed, **pinned).materialize()
    bad = ds.filter(lambda row: row["error"] != "").select_columns(["path", "error"]).take_all()
    skipped = [{"path": r["path"], "reason": r["error"]} for r in bad]
    if skipped:
        log.warning("%s/%s: skipped %d unreadable image(s): %s", listing.root, listing.split, len(skipped),
                    ", ".join(s["path"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    good = ds.filter(lambda row: row["error"] == "", **pinned).drop_columns(["error", "path"], **pinned).materialize()
    if good.count() == 0:
        raise KdrayError(f"{listing.root}/{listing.split}: none of the {len(listing)} images could be read")
    return good, skipped


@dataclass(frozen=True)
class TrainingData:
    """The decoded train and val splits at one image size, with their listings.

    For distillation the caller adds a ``teacher_logits`` column to ``train`` (see
    :func:`kdray.logit_cache.with_teacher_logits`); training itself never opens the cache.
    """

    train_listing: Listing
    val_listing: Listing
    image_size: int
    train: Any  # ray.data.Dataset: image_id, label, image, [source]
    val: Any
    skipped_train: list = field(default_factory=list)  # files that could not be decoded: {"path", "reason"}
    skipped_val: list = field(default_factory=list)

    @property
    def has_teacher_logits(self) -> bool:
        return "teacher_logits" in self.train.schema().names


def list_training_splits(data: DataConfig) -> tuple[Listing, Listing]:
    """The train and val listings of a run; val is labelled with train's classes."""
    train = list_split(data.root, data.train_split, data.classes, data.limit)
    return train, list_split(data.root, data.val_split, train.classes, data.limit)


class TrainingSplits:
    """A run's train and val splits, listed once and decoded once per image size, for every stage to share."""

    def __init__(self, train_listing: Listing, val_listing: Listing, seed: int = 0):
        self.train_listing, self.val_listing, self.seed = train_listing, val_listing, seed
        self._decoded: dict[int, TrainingData] = {}

    def at(self, size: int) -> TrainingData:
        if size not in self._decoded:
            from kdray.raycluster import init_ray

            init_ray()
            train, skipped = load_split(self.train_listing, size, shuffle_seed=self.seed)
            val, skipped_val = load_split(self.val_listing, size)
            self._decoded[size] = TrainingData(self.train_listing, self.val_listing, size, train, val,
                                               skipped, skipped_val)
        return self._decoded[size]


def load_training_data(data: DataConfig, seed: int = 0) -> TrainingData:
    """List and decode the train and val splits of ``data`` at ``data.image_size`` (starting or joining Ray)."""
    return TrainingSplits(*list_training_splits(data), seed).at(data.image_size)


def take_images(ds, n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (0: all) images and labels of a decoded dataset: (uint8 [n, S, S], int64 [n])."""
    columns = ds.select_columns(["image", "label"])
    rows = columns.take(n) if n else columns.take_all()
    return np.stack([r["image"] for r in rows]), np.asarray([r["label"] for r in rows], dtype=np.int64)


def class_weights(counts: list[int]) -> list[float]:
    """Inverse-frequency weights, normalised to mean 1 (for class balancing)."""
    counts_arr = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    w = counts_arr.sum() / (len(counts_arr) * counts_arr)
    return (w / w.mean()).tolist()


def sample_images(root: str, split: str, size: int, n: int, classes: list[str] | None = None,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode up to ``n`` (0: all) readable images of a split in plain Python (no Ray): (uint8 [n, S, S], labels [n]).

    Used for small samples: export calibration and parity sets, throughput measurements.
    """
    listing = list_split(root, split, classes)
    order = np.random.default_rng(seed).permutation(len(listing))
    images, labels = [], []
    for i in order:
        if 0 < n <= len(images):
            break
        try:
            images.append(decode_image(_read_checked(listing.fs, listing.paths[i]), size))
            labels.append(listing.labels[i])
        except storage.S3Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("skipping unreadable image %s (%s)", listing.paths[i], describe_decode_error(exc))
    if not images:
        raise KdrayError(f"{root}/{split}: no readable images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)
