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
    except LocalS3Error as exc:
        pytest.skip(str(exc))
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
