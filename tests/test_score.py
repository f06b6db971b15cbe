"""Offline scoring: every input exactly once in predictions ∪ errors, by content, resumable."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from kdray import KdrayError, storage
from kdray.data import sample_images
from kdray.images import ImageLimits
from kdray.score import ReadPolicy, score_archive
from kdray.synthetic import dicom_bytes

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- files


def png(side: int = 64, mode: str = "L", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16))
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 255, (side, side, 4), dtype=np.uint8), "RGBA")
    else:
        img = Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (side, side), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, "GIF")
    return buf.getvalue()


def dicom(side: int = 64, photometric: str = "MONOCHROME2", frames: int = 1, modality: str = "CR") -> bytes:
    pixels = np.random.default_rng(5).integers(0, 4095, (frames, side, side), dtype=np.uint16)
    return dicom_bytes(pixels if frames > 1 else pixels[0], photometric, modality, PatientName="Doe^Jane")


#: name → (bytes, expected reason or None for a prediction)
def mixed_files() -> dict[str, tuple[bytes, str | None]]:
    good_png = png()
    return {
        "a/ok-1.png": (good_png, None), "a/ok-2.png": (png(seed=1), None), "a/photo.jpg": (jpeg(), None),
        "a/sixteen.png": (png(mode="I;16"), None), "a/rgba.png": (png(mode="RGBA"), None),
        "b/mono1.dcm": (dicom(photometric="MONOCHROME1"), None), "b/mono2.dcm": (dicom(), None),
        "b/dicom-named.png": (dicom(), None), "b/multiframe.dcm": (dicom(frames=3), None),
        "c/empty.png": (b"", "not_an_image"), "c/truncated.png": (good_png[: len(good_png) // 2], "truncated"),
        "c/truncated.jpg": (jpeg()[:200], "truncated"), "c/notes.txt": (b"just some text\n", "not_an_image"),
        "c/page.png": (b"<html><body>not a png</body></html>", "not_an_image"), "c/anim.gif": (gif(), "not_an_image"),
        "c/tiny.png": (png(side=1), "too_small"), "c/huge.png": (png(side=120), "too_large"),
        "c/ct.dcm": (dicom(modality="CT"), "wrong_modality"),
    }


def write_tree(root: Path, files: dict[str, tuple[bytes, str | None]]) -> None:
    for name, (data, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def read_rows(out: str, sub: str) -> pa.Table:
    loc = storage.resolve(storage.join(out, sub))
    if storage.info(loc).type == 0:  # pafs.FileType.NotFound
        return pa.table({"path": pa.array([], pa.string())})
    return pads.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table()


def assert_exactly_once(out: str, expected: set[str]) -> tuple[pa.Table, pa.Table]:
    """Counted on the raw Parquet files: rows == distinct inputs, no de-duplication on read."""
    predictions, errors = read_rows(out, "predictions"), read_rows(out, "errors")
    paths = predictions["path"].to_pylist() + errors["path"].to_pylist()
    assert len(paths) == len(set(paths)), "an input appears twice"
    assert set(paths) == expected
    return predictions, errors


LIMITS = ImageLimits(min_side=32, max_pixels=100 * 100)


@pytest.fixture(scope="module")
def exported_student(tmp_path_factory, synthetic_dir):
    from conftest import make_checkpoint
    from kdray.export import export_student

    root = tmp_path_factory.mktemp("student")
    ckpt = make_checkpoint(root / "ckpt", "tiny_student", image_size=32)
    calib, _ = sample_images(synthetic_dir, "train", 32, 32)
    val, labels = sample_images(synthetic_dir, "val", 32, 0)
    export_student(ckpt, str(root / "export"), calib, val, labels, strict=False)
    return str(root / "export")


# ----------------------------------------------------------------------------- one node, shared Ray


@pytest.mark.integration
def test_mixed_folder_every_file_scored_or_refused_with_its_reason(tmp_path, exported_student, ray_local):
    files = mixed_files()
    write_tree(tmp_path / "in", files)
    (tmp_path / "in" / ".hidden.png").write_bytes(png())
    out = str(tmp_path / "out")
    summary = score_archive(exported_student, str(tmp_path / "in"), out, shard_size=4, limits=LIMITS)
    inputs = {str(tmp_path / "in" / name) for name in files}
    predictions, errors = assert_exactly_once(out, inputs)
    reasons = dict(zip(errors["path"].to_pylist(), errors["reason"].to_pylist()))
    expected = {str(tmp_path / "in" / n): r for n, (_, r) in files.items() if r}
    assert reasons == expected
    assert summary["images"] == len(files) and summary["scored"] == predictions.num_rows
    assert summary["hidden_skipped"] == 1 and summary["errors_by_reason"]["not_an_image"] == 4
    assert not any("Doe" in m for m in errors["message"].to_pylist())
    rows = {Path(p).name: r for p, r in zip(predictions["path"].to_pylist(), predictions.to_pylist())}
    assert rows["mono1.dcm"]["format"] == "dicom" and rows["dicom-named.png"]["format"] == "dicom"
    assert rows["mono1.dcm"]["sop_uid"] and rows["mono1.dcm"]["modality"] == "CR"
    assert rows["ok-1.png"]["sop_uid"] is None
    probs = np.stack([predictions[f"p_{c}"].to_numpy() for c in ("covid", "normal", "pneumonia")], 1)
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    with pytest.raises(KdrayError, match="already holds a finished scoring run"):
        score_archive(exported_student, str(tmp_path / "in"), out)


@pytest.mark.integration
def test_s3_prefix_and_the_served_artifact(synthetic_s3, s3_bucket, exported_student, ray_local):
    out = f"s3://{s3_bucket}/scored-{time.time_ns()}"
    summary = score_archive(exported_student, f"{synthetic_s3}/train/covid", out)
    assert summary["images"] == 41 and summary["scored"] == 40 and summary["errors_by_reason"] == {"corrupt": 1}  # a PNG signature, then junk
    card = json.loads(Path(exported_student, "metadata.json").read_text())
    assert summary["backend"] == f"onnx-{card['served_artifact']}"


@pytest.mark.integration
def test_manifest_scores_a_duplicate_once(tmp_path, exported_student, ray_local):
    write_tree(tmp_path / "in", {"x/1.png": (png(), None), "x/2.png": (png(seed=2), None)})
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text(f"path\nx/1.png\nx/2.png\nx/1.png\n{tmp_path / 'in' / 'x' / '2.png'}\n")
    summary = score_archive(exported_student, str(manifest), str(tmp_path / "out"), limits=LIMITS)
    assert summary["manifest_duplicates"] == 2 and summary["images"] == 2  # x/2.png named relative and absolute
    predictions, _ = assert_exactly_once(str(tmp_path / "out"), {
        str(tmp_path / "in" / "x" / "1.png"), str(tmp_path / "in" / "x" / "2.png")})
    assert predictions.num_rows == 2


@pytest.mark.integration
def test_webdataset_tar_shards(tmp_path, exported_student, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    for t in range(2):
        with tarfile.open(shards / f"shard-{t:04d}.tar", "w") as tar:
            for key, ext, data in ((f"{t}000", "png", png(seed=t)), (f"{t}000", "json", b"{}"),
                                   (f"{t}001", "dcm", dicom()), (f"{t}002", "png", b"broken")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    summary = score_archive(exported_student, str(shards), out, limits=LIMITS)
    expected = {f"{shards}/shard-{t:04d}.tar#{t}{k}" for t in range(2) for k in ("000.png", "001.dcm", "002.png")}
    predictions, errors = assert_exactly_once(out, expected)
    assert predictions.num_rows == 4 and errors.num_rows == 2 and summary["kind"] == "tar"


@pytest.mark.integration
def test_resume_skips_finished_shards_and_counts_exactly_once(tmp_path, exported_student, ray_local):
    files = {f"d/{i:02d}.png": (png(seed=i), None) for i in range(10)}
    write_tree(tmp_path / "in", files)
    out = tmp_path / "out"
    first = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=2, limits=LIMITS)
    assert first["images_this_run"] == 10
    # as if killed: no summary, two shards without their marker, one of them without its predictions
    (out / "summary.json").unlink()
    (out / "_done" / "part-00001.json").unlink()
    (out / "_done" / "part-00003.json").unlink()
    (out / "predictions" / "part-00003.parquet").unlink()
    second = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=2, limits=LIMITS)
    assert second["images_this_run"] == 4 and second["shards_resumed"] == 3 and second["images"] == 10
    assert_exactly_once(str(out), {str(tmp_path / "in" / n) for n in files})


@pytest.mark.integration
def test_explain_writes_overlays_that_join_their_rows_and_resumes(tmp_path, exported_student, ray_local):
    files = {f"e/{i:02d}.png": (png(seed=i), None) for i in range(6)}
    files["e/bad.png"] = (b"not an image", "not_an_image")
    write_tree(tmp_path / "in", files)
    plain_out, out = tmp_path / "plain", tmp_path / "explained"
    score_archive(exported_student, str(tmp_path / "in"), str(plain_out), shard_size=3, limits=LIMITS)
    summary = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS,
                            explain="all")
    predictions, _ = assert_exactly_once(str(out), {str(tmp_path / "in" / n) for n in files})
    plain = read_rows(str(plain_out), "predictions").sort_by("path")
    predictions = predictions.sort_by("path")
    for column in ("path", "label", "p_covid", "p_normal", "p_pneumonia"):  # explaining changes no prediction
        assert predictions[column].to_pylist() == plain[column].to_pylist()
    overlays = predictions["explanation"].to_pylist()
    assert summary["explained"] == len(overlays) == 6 and len(set(overlays)) == 6
    for path, overlay in zip(predictions["path"].to_pylist(), overlays):
        assert overlay.startswith("explanations/part-") and Image.open(out / overlay).format == "PNG"
    assert sorted(str(p.relative_to(out)) for p in (out / "explanations").rglob("*.png")) == sorted(overlays)
    # a resumed shard writes the same overlay names again; another --explain is another run
    (out / "summary.json").unlink()
    (out / "_done" / "part-00001.json").unlink()
    again = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS,
                          explain="all")
    assert again["images_this_run"] == 3 and again["explained"] == 6
    assert sorted(read_rows(str(out), "predictions")["explanation"].to_pylist()) == sorted(overlays)
    (out / "summary.json").unlink()
    with pytest.raises(KdrayError, match="unfinished scoring run"):
        score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS,
                      explain="covid_suspect")


@pytest.mark.integration
def test_io_errors_are_retried_never_done_and_resumed(tmp_path, exported_student, ray_local):
    write_tree(tmp_path / "in", {"1.png": (png(), None)})
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path\n{tmp_path / 'in' / '1.png'}\n{tmp_path / 'in' / 'later.png'}\n")
    out = str(tmp_path / "out")
    with pytest.raises(KdrayError, match="could not be read .*Re-run the same command"):
        score_archive(exported_student, str(manifest), out, limits=LIMITS)
    assert not (tmp_path / "out" / "summary.json").exists()
    errors = read_rows(out, "errors")
    assert errors["reason"].to_pylist() == ["io_error"]
    (tmp_path / "in" / "later.png").write_bytes(png(seed=9))
    summary = score_archive(exported_student, str(manifest), out, limits=LIMITS)
    assert summary["scored"] == 2 and summary["errors"] == 0
    assert_exactly_once(out, {str(tmp_path / "in" / "1.png"), str(tmp_path / "in" / "later.png")})


@pytest.mark.integration
def test_many_read_failures_in_a_row_stop_the_job(tmp_path, exported_student, ray_local):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n" + "".join(f"{tmp_path}/missing-{i}.png\n" for i in range(12)))
    with pytest.raises(KdrayError, match="reads failed in a row") as exc_info:
        score_archive(exported_student, str(manifest), str(tmp_path / "out"),
                      policy=ReadPolicy(max_consecutive_io_errors=5))
    assert "\n" not in str(exc_info.value)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_empty_input_is_a_clear_error(tmp_path, exported_student):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / ".DS_Store").write_text("hidden")
    with pytest.raises(KdrayError, match="no files to score .*1 hidden"):
        score_archive(exported_student, str(tmp_path / "in"), str(tmp_path / "out"))


# ----------------------------------------------------------------------------- kill -9, its own Ray


def _score_command(model: str, inputs: str, out: str) -> list[str]:
    return [sys.executable, "-m", "jobs.score", "--model", model, "--input", inputs, "--output", out,
            "--shard_size", "8"]


def _wait_for(predicate, timeout: float = 240.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.e2e
@pytest.mark.parametrize("moment", ["after_a_shard", "during_a_write", "early"])
def test_kill_9_then_rerun_finishes_exactly_once(tmp_path, exported_student, moment):
    write_tree(tmp_path / "in", {f"d/{i:03d}.png": (png(seed=i), None) for i in range(96)})
    out = tmp_path / "out"
    env = {**os.environ, "KDRAY_LOG_DIR": str(tmp_path / "logs"),
           "KDRAY_FAULT_WRITE_DELAY_S": "0.5" if moment == "during_a_write" else "0"}
    cmd = _score_command(exported_student, str(tmp_path / "in"), str(out))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = out / "_done"
    if moment == "after_a_shard":
        assert _wait_for(lambda: done.exists() and len(list(done.iterdir())) >= 1)
    elif moment == "during_a_write":
        assert _wait_for(lambda: any(p.name.startswith(".tmp-") for d in ("predictions", "errors", "_done")
                                     if (out / d).exists() for p in (out / d).iterdir()))
    else:
        assert _wait_for(lambda: (out / "plan.json").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    shards_done_before = len([p for p in done.iterdir() if p.name.startswith("part-")]) if done.exists() else 0
    rerun = subprocess.run(cmd, cwd=REPO, env={**env, "KDRAY_FAULT_WRITE_DELAY_S": "0"}, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # a worker of the killed job may still finish the write it was in: at least the shards seen done are skipped
    assert summary["images"] == 96 and summary["shards_resumed"] >= shards_done_before
    assert summary["images_this_run"] == 96 - 8 * summary["shards_resumed"]
    if moment == "after_a_shard":
        assert summary["images_this_run"] < 96
    assert_exactly_once(str(out), {str(tmp_path / "in" / "d" / f"{i:03d}.png") for i in range(96)})
    assert not [p for p in out.rglob(".tmp-*")], "a half-written file survived the re-run"


@pytest.mark.parametrize("gpus, cpus, expected", [(0, 2, ({"num_cpus": 0.5}, 2)), (0, 16, ({"num_cpus": 0.5}, 16)),
                                                   (2, 16, ({"num_gpus": 1, "num_cpus": 1}, 2))])
def test_scoring_pool_takes_gpus_when_the_cluster_has_them(monkeypatch, gpus, cpus, expected):
    """Checked with fake cluster resources only: no GPU here. With GPUs, one actor per GPU runs torch."""
    import kdray.score as score

    monkeypatch.setattr(score, "cluster_gpus", lambda: float(gpus))
    monkeypatch.setattr(score, "cluster_cpus", lambda: float(cpus))
    compute, resources, threads = score.scoring_pool(use_gpu=True)
    assert (resources, compute.max_size) == expected and threads == 1
    assert compute.min_size == compute.max_size  # the whole pool from the start
    assert score.scoring_pool(use_gpu=True, shards=1)[0].max_size == 1  # never more actors than shards


@pytest.mark.unit
def test_unreachable_output_store_stops_with_one_line_and_starts_nothing(tmp_path, monkeypatch):
    """An output store nobody answers for: a one-line error before Ray starts (the unit tier's tripwire would
    fail the test if it did), and no plan, marker or summary anywhere."""
    from conftest import make_checkpoint
    from kdray.raycluster import free_loopback_port

    port = free_loopback_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kdray")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "kdray")
    monkeypatch.setenv("KDRAY_S3_RETRY_S", "0.5")
    model = make_checkpoint(tmp_path / "ckpt", image_size=32)
    write_tree(tmp_path / "in", {"a.png": (png(), None), "b.png": (png(seed=1), None)})
    with pytest.raises(KdrayError) as err:
        score_archive(model, str(tmp_path / "in"), "s3://kdray-out/run")
    message = str(err.value)
    assert "\n" not in message and "s3://kdray-out/run" in message and f"127.0.0.1:{port}" in message
    assert "after retrying for" in message
