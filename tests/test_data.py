import io

import numpy as np
import pytest
import torch
from PIL import Image

from kdray import KdrayError, storage
from kdray.config import AugmentConfig
from kdray.data import (IMAGENET_MEAN, IMAGENET_STD, augment, class_weights, decode_image, list_split, load_split,
                        sample_images, to_model_input, view_seeds)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_listing_is_stable_and_labelled(synthetic_dir):
    listing = list_split(synthetic_dir, "train")
    assert listing.classes == ["covid", "normal", "pneumonia"]
    assert len(listing) == 120 and listing.class_counts() == [40, 40, 40]
    assert listing.image_ids[0] == "train/covid/covid-train-0000.png"  # relative to the data root
    assert listing.signature() == list_split(synthetic_dir, "train").signature()
    assert len(list_split(synthetic_dir, "val", limit=7)) == 7


def test_manifest_listing_with_split_and_source(tmp_path, synthetic_dir):
    manifest = tmp_path / "manifest.csv"
    rows = ["path,label,split,source_repo"]
    for split in ("train", "val"):
        listing = list_split(synthetic_dir, split)
        for path, label in zip(listing.paths, listing.labels):
            rows.append(f"{path},{listing.classes[label]},{split},src-{label % 2}")
    manifest.write_text("\n".join(rows) + "\n")
    val = list_split(str(manifest), "val")
    assert len(val) == 60 and set(val.sources) == {"src-0", "src-1"}
    with pytest.raises(KdrayError, match="not among the configured classes"):
        list_split(str(manifest), "val", classes=["covid", "normal"])


def test_bad_data_roots(tmp_path):
    with pytest.raises(KdrayError, match="no such file or folder"):
        list_split(str(tmp_path / "missing"), "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(KdrayError, match="folder is empty"):
        list_split(str(tmp_path / "empty"), "train")
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    (flat / "a.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(KdrayError, match="no class folders"):
        list_split(str(tmp_path / "flat"), "train")
    bad_manifest = tmp_path / "m.csv"
    bad_manifest.write_text("file,class\nx.png,covid\n")
    with pytest.raises(KdrayError, match="manifest needs columns path,label"):
        list_split(str(bad_manifest), "train")


def test_decode_grayscale_crop_resize():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255  # pure red → luma 76
    out = decode_image(_png(rgb), 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 76) <= 1
    ramp16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    out16 = decode_image(_png(ramp16), 32)
    assert out16.min() <= 5 and out16.max() >= 250  # 16-bit windowed to the full 8-bit range
    with pytest.raises(Exception):
        decode_image(b"definitely not an image", 16)


def test_model_input_normalisation_and_channels():
    images = np.full((2, 8, 8), 255, np.uint8)
    x = to_model_input(images)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    for c in range(3):
        assert x[0, c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)


def test_seeded_augmentation_is_reproducible_and_view_zero_is_clean():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 32, 32), dtype=np.uint8)
    ids = [f"img{i}" for i in range(4)]
    cfg = AugmentConfig()
    seeds = view_seeds(ids, [1, 2, 1, 3])
    a, b = to_model_input(images, cfg, seeds), to_model_input(images, cfg, seeds)
    assert torch.equal(a, b)
    assert not torch.allclose(a, to_model_input(images))  # augmented views differ from the clean image
    clean_seeds = view_seeds(ids, [0, 0, 0, 0])
    assert (clean_seeds == -1).all()
    assert torch.allclose(to_model_input(images, cfg, clean_seeds), to_model_input(images), atol=1e-5)
    x = torch.rand(3, 1, 16, 16)
    assert augment(x, cfg).shape == x.shape and augment(x, cfg).min() >= 0


def test_class_weights_balance_the_loss():
    w = class_weights([100, 50, 50])
    assert w[1] == pytest.approx(2 * w[0]) and np.mean(w) == pytest.approx(1.0)


def test_sample_images_without_ray(synthetic_dir):
    images, labels = sample_images(synthetic_dir, "val", 32, 10)
    assert images.shape == (10, 32, 32) and set(labels) <= {0, 1, 2}


@pytest.mark.integration
def test_ray_reads_s3_and_skips_a_corrupt_file(synthetic_s3, ray_local):
    listing = list_split(synthetic_s3, "train")
    assert len(listing) == 121  # 120 good + 1 corrupt
    ds, skipped = load_split(listing, 32, shuffle_seed=0)
    assert ds.count() == 120
    assert len(skipped) == 1 and skipped[0]["path"].endswith("train/covid/zz-corrupt.png")
    assert "cannot decode image" in skipped[0]["reason"]
    row = ds.take(1)[0]
    assert row["image"].shape == (32, 32) and row["image"].dtype == np.uint8
    assert set(row) == {"image_id", "label", "image"}
    assert storage.exists(f"{synthetic_s3}/val/covid/covid-val-0000.png")
