import os

import pyarrow as pa
import pytest

from kdray import KdrayError, storage


def test_local_round_trip_is_atomic(tmp_path):
    target = tmp_path / "a" / "b.json"
    storage.write_json(str(target), {"x": 1})
    assert storage.read_json(str(target)) == {"x": 1}
    assert storage.read_json("file://" + str(target)) == {"x": 1}
    assert os.listdir(target.parent) == ["b.json"]  # no temporary files left behind
    storage.write_parquet(str(target.parent / "c.parquet"), pa.table({"id": ["a"], "p": [0.5]}))
    assert storage.read_parquet(str(target.parent / "c.parquet")).to_pydict() == {"id": ["a"], "p": [0.5]}


@pytest.mark.parametrize("uri, message", [("", "empty"), ("gs://bucket/x", "unsupported URI scheme"),
                                          ("s3://", "needs a bucket")])
def test_resolve_rejects_bad_uris(uri, message):
    with pytest.raises(KdrayError, match=message):
        storage.resolve(uri)


def test_missing_local_paths(tmp_path):
    with pytest.raises(KdrayError, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope"))
    with pytest.raises(KdrayError, match="no such file or folder"):
        storage.list_files(storage.resolve(str(tmp_path / "nope")))


@pytest.mark.integration
def test_s3_round_trip_and_listing(local_s3, s3_bucket):
    base = f"s3://{s3_bucket}/storage-test"
    storage.write_bytes(f"{base}/x/1.bin", b"one")
    storage.write_json(f"{base}/x/2.json", {"two": 2})
    storage.write_parquet(f"{base}/x/3.parquet", pa.table({"id": ["a", "b"], "p": [0.25, 0.75]}))
    assert storage.read_bytes(f"{base}/x/1.bin") == b"one"
    assert storage.read_parquet(f"{base}/x/3.parquet").to_pydict() == {"id": ["a", "b"], "p": [0.25, 0.75]}
    files = storage.list_files(storage.resolve(base))
    assert [f.base_name for f in files] == ["1.bin", "2.json", "3.parquet"]
    assert storage.exists(f"{base}/x/2.json") and not storage.exists(f"{base}/x/3.json")


@pytest.mark.integration
def test_s3_missing_bucket_is_named(local_s3):
    with pytest.raises(KdrayError, match="bucket 'no-such-bucket' does not exist"):
        storage.list_files(storage.resolve("s3://no-such-bucket/data"))
    with pytest.raises(KdrayError, match="bucket 'no-such-bucket' does not exist"):
        storage.write_bytes("s3://no-such-bucket/x.bin", b"x")


@pytest.mark.integration
def test_s3_unreachable_endpoint(monkeypatch, local_s3):
    from kdray.local_s3 import port_is_free

    port = next(p for p in range(23000, 23100) if port_is_free(p))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(KdrayError, match="cannot reach S3"):
        storage.list_files(storage.resolve("s3://kdray-test/data"))
