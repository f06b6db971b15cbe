"""Offline scoring: every input exactly once in predictions ∪ errors, by content, resumable."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from kdray import KdrayError, storage
from kdray.data import sample_images
from kdray import inputs, score
from kdray.images import ImageLimits
from kdray.score import ReadPolicy, score_archive
from kdray.shard_scorer import ShardScorer
from cluster.local.demo_data import dicom_bytes
from fault_hooks import slow_writes_env
import hostile
from hostile import add_member, hostile_tar

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
    assert summary.images == len(files) and summary.scored == predictions.num_rows
    assert summary.hidden_skipped == 1 and summary.errors_by_reason["not_an_image"] == 4
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
    assert summary.images == 41 and summary.scored == 40 and summary.errors_by_reason == {"corrupt": 1}  # a PNG signature, then junk
    card = json.loads(Path(exported_student, "metadata.json").read_text())
    assert summary.backend == f"onnx-{card['served_artifact']}"


@pytest.mark.integration
def test_manifest_scores_a_duplicate_once(tmp_path, exported_student, ray_local):
    write_tree(tmp_path / "in", {"x/1.png": (png(), None), "x/2.png": (png(seed=2), None)})
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text(f"path\nx/1.png\nx/2.png\nx/1.png\n{tmp_path / 'in' / 'x' / '2.png'}\n")
    summary = score_archive(exported_student, str(manifest), str(tmp_path / "out"), limits=LIMITS)
    assert summary.manifest_duplicates == 2 and summary.images == 2  # x/2.png named relative and absolute
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
    assert predictions.num_rows == 4 and errors.num_rows == 2 and summary.kind == "tar"


@pytest.mark.integration
def test_resume_skips_finished_shards_and_counts_exactly_once(tmp_path, exported_student, ray_local):
    files = {f"d/{i:02d}.png": (png(seed=i), None) for i in range(10)}
    write_tree(tmp_path / "in", files)
    out = tmp_path / "out"
    first = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=2, limits=LIMITS)
    assert first.images_this_run == 10
    # as if killed: no summary, two shards without their marker, one of them without its predictions
    (out / "summary.json").unlink()
    (out / "_done" / "part-00001.json").unlink()
    (out / "_done" / "part-00003.json").unlink()
    (out / "predictions" / "part-00003.parquet").unlink()
    # and a marker whose part file is gone: not trusted, its shard is scored again
    (out / "predictions" / "part-00004.parquet").unlink()
    second = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=2, limits=LIMITS)
    assert second.images_this_run == 6 and second.shards_resumed == 2 and second.images == 10
    assert_exactly_once(str(out), {str(tmp_path / "in" / n) for n in files})
    marker = json.loads((out / "_done" / "part-00004.json").read_text())
    assert marker["parts"]["predictions"]["bytes"] == (out / "predictions" / "part-00004.parquet").stat().st_size


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
    assert summary.explained == len(overlays) == 6 and len(set(overlays)) == 6
    for path, overlay in zip(predictions["path"].to_pylist(), overlays):
        assert overlay.startswith("explanations/part-") and Image.open(out / overlay).format == "PNG"
    assert sorted(str(p.relative_to(out)) for p in (out / "explanations").rglob("*.png")) == sorted(overlays)
    # a resumed shard writes the same overlay names again; another --explain is another run
    (out / "summary.json").unlink()
    (out / "_done" / "part-00001.json").unlink()
    again = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS,
                          explain="all")
    assert again.images_this_run == 3 and again.explained == 6
    assert sorted(read_rows(str(out), "predictions")["explanation"].to_pylist()) == sorted(overlays)
    (out / "summary.json").unlink()
    with pytest.raises(KdrayError, match="unfinished scoring run"):
        score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS,
                      explain="covid_suspect")


@pytest.mark.integration
def test_a_read_failing_with_eio_leaves_its_shard_unfinished(tmp_path, exported_student, ray_local):
    """A genuine EIO from the kernel (reading /proc/self/mem at offset 0) is io_error: no marker for its shard and
    no summary, so that a re-run retries it (and the other shard stays done)."""
    write_tree(tmp_path / "in", {"1.png": (png(), None)})
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text("path\n1.png\n/proc/self/mem\n")
    out = tmp_path / "out"
    with pytest.raises(KdrayError, match="could not be read .*Re-run the same command") as err:
        score_archive(exported_student, str(manifest), str(out), shard_size=1, limits=LIMITS,
                      allowed_roots=["/proc"])
    assert "\n" not in str(err.value) and not (out / "summary.json").exists()
    assert dict(zip(*read_rows(str(out), "errors").select(["path", "reason"]).to_pydict().values())) == {
        "/proc/self/mem": "io_error"}
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["part-00000.json"]
    assert not (out / "_lock.json").exists()  # released on the way out


# ----------------------------------------------------------------------------- hostile inputs, through Ray


def _hostile_tree(tmp_path: Path) -> tuple[Path, Path]:
    """An input folder and a folder beside it (outside its root), each holding one good PNG."""
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    write_tree(root, {"ok.png": (png(), None)})
    write_tree(elsewhere, {"x.png": (png(seed=1), None), "y.png": (png(seed=2), None)})
    return root, elsewhere


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_manifest_reads_only_inside_its_roots_and_always_finishes(tmp_path, exported_student, ray_local):
    root, elsewhere = _hostile_tree(tmp_path)
    write_tree(tmp_path / "extra", {"z.png": (png(seed=3), None)})
    (root / "link-out.png").symlink_to(elsewhere / "y.png")
    os.mkfifo(root / "pipe.png")  # opened for reading, a FIFO would wait for a writer forever
    (root / "sub").mkdir()
    rows = {"ok.png": None, "/etc/hostname": "outside_roots", f"file://{elsewhere}/x.png": "outside_roots",
            "../elsewhere/y.png": "outside_roots", "s3://other-bucket/x.png": "outside_roots",
            "link-out.png": "outside_roots", f"{tmp_path}/extra/z.png": None, "gone.png": "missing",
            "pipe.png": "not_a_file", "sub": "not_a_file"}
    manifest = root / "list.csv"
    manifest.write_text("path\n" + "".join(f"{row}\n" for row in rows))
    out = str(tmp_path / "out")
    summary = score_archive(exported_student, str(manifest), out, limits=LIMITS,
                            allowed_roots=[str(tmp_path / "extra")])
    named = {row: storage.canonical_uri(row if "://" in row or row.startswith("/") else f"{root}/{row}")
             for row in rows}
    predictions, errors = assert_exactly_once(out, set(named.values()))
    reasons = dict(zip(errors["path"].to_pylist(), errors["reason"].to_pylist()))
    assert reasons == {named[row]: reason for row, reason in rows.items() if reason}
    assert summary.scored == 2 and summary.errors_by_reason["outside_roots"] == 5
    assert not any(str(elsewhere) in m or "hostname" in m for m in errors["message"].to_pylist())


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_hostile_corpus_in_a_folder_scores_each_file_once_with_its_reason(tmp_path, exported_student,
                                                                              ray_local):
    """tests/hostile.py's corpus mixed with good PNGs, a FIFO and a link loop: the run finishes, every input once,
    each corpus file refused with the reason load_image gives it (under the serving budget, to keep it small)."""
    from kdray.images import SERVING_LIMITS

    root = tmp_path / "in"
    write_tree(root, {f"good/{i}.png": (png(seed=i), None) for i in range(8)})
    for case in hostile.CASES:
        (root / "corpus" / case.name).parent.mkdir(parents=True, exist_ok=True)
        (root / "corpus" / case.name).write_bytes(case.make())
    os.mkfifo(root / "pipe.png")
    os.symlink("..", root / "good" / "loop")
    out = str(tmp_path / "out")
    summary = score_archive(exported_student, str(root), out, limits=SERVING_LIMITS)
    expected = {str(root / "corpus" / c.name): c.expect["serving"] for c in hostile.CASES}
    expected |= {str(root / "good" / f"{i}.png"): hostile.OK for i in range(8)} | {str(root / "pipe.png"): "not_a_file"}
    predictions, errors = assert_exactly_once(out, set(expected))
    outcome = dict.fromkeys(predictions["path"].to_pylist(), hostile.OK)
    outcome |= dict(zip(errors["path"].to_pylist(), errors["reason"].to_pylist()))
    assert outcome == expected and summary.images == len(expected)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_folder_with_link_loops_scores_each_real_file_once_and_finishes(tmp_path, exported_student, ray_local):
    root, elsewhere = _hostile_tree(tmp_path)
    write_tree(root, {"a/b/deep.png": (png(seed=4), None)})
    (root / "a" / "loop").symlink_to("..")
    (root / "a" / "b" / "loop").symlink_to("../..")  # two loops: 2^depth copies when links are followed
    (root / "again.png").symlink_to("ok.png")
    (root / "out.png").symlink_to(elsewhere / "x.png")
    (root / "outdir").symlink_to(elsewhere)
    (root / "broken.png").symlink_to(root / "nowhere.png")
    os.mkfifo(root / "pipe.png")
    out = str(tmp_path / "out")
    score_archive(exported_student, str(root), out, limits=LIMITS)
    expected = {"ok.png": None, "a/b/deep.png": None, "out.png": "outside_roots", "outdir": "outside_roots",
                "broken.png": "missing", "pipe.png": "not_a_file"}
    predictions, errors = assert_exactly_once(out, {f"{root}/{name}" for name in expected})
    assert dict(zip(errors["path"].to_pylist(), errors["reason"].to_pylist())) == {
        f"{root}/{name}": reason for name, reason in expected.items() if reason}


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_tar_shards_refuse_hostile_members_without_reading_them(tmp_path, exported_student, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    limits = dataclasses.replace(LIMITS, max_bytes=50_000)
    hostile_tar(shards / "a.tar", png())
    with tarfile.open(shards / "b.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "first.png", png(seed=5))
        add_member(tar, "commented.png", png(seed=6), pax_headers={"comment": "x" * (2 * 2**20)})
    out = str(tmp_path / "out")
    summary = score_archive(exported_student, str(shards), out, limits=limits)
    expected = {"a.tar#ok.png": None, "a.tar#sparse.png": "sparse_member", "a.tar#link.png": "not_a_file",
                "a.tar#pipe.png": "not_a_file", "a.tar#big.png": "file_too_large", "b.tar#first.png": None,
                "b.tar": "corrupt"}
    predictions, errors = assert_exactly_once(out, {f"{shards}/{name}" for name in expected})
    assert dict(zip(errors["path"].to_pylist(), errors["reason"].to_pylist())) == {
        f"{shards}/{name}": reason for name, reason in expected.items() if reason}
    assert summary.kind == "tar" and summary.scored == 2


@pytest.mark.integration
def test_two_runs_on_one_output_the_second_is_refused(tmp_path, exported_student, ray_local):
    write_tree(tmp_path / "in", {f"{i}.png": (png(seed=i), None) for i in range(4)})
    out = tmp_path / "out"
    first: dict = {}

    def run_first():
        try:
            first["summary"] = score_archive(exported_student, str(tmp_path / "in"), str(out), limits=LIMITS)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            first["error"] = exc

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert _wait_for(lambda: (out / "_lock.json").exists() or not thread.is_alive(), 60)
        for overwrite in (False, True):  # --overwrite deletes nothing while another run holds the output
            with pytest.raises(storage.OutputLocked) as err:
                score_archive(exported_student, str(tmp_path / "in"), str(out), limits=LIMITS, overwrite=overwrite)
            message = str(err.value)
            assert "\n" not in message and "in use by another scoring run" in message, message
            assert json.loads((out / "_lock.json").read_text())["run"] in message
    finally:
        thread.join(180)
    assert "error" not in first and first["summary"].images == 4
    assert_exactly_once(str(out), {str(tmp_path / "in" / f"{i}.png") for i in range(4)})
    assert not (out / "_lock.json").exists()


# ----------------------------------------------------------------------------- planning and the lock, no Ray


@pytest.mark.parametrize("row", ["/etc/hostname", "file:///etc/hostname", "../outside.png", "s3://other-bucket/x.png",
                                 "sub/../../outside.png"])
def test_manifest_rows_outside_its_folder_are_found_at_planning(tmp_path, row):
    (tmp_path / "in").mkdir()
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text(f"path\nok.png\n{row}\n")
    plan = score.plan_inputs(str(manifest), "model")
    assert plan.outside_roots == 1 and plan.roots == [str((tmp_path / "in").resolve())]
    entry = plan.shards[0][1]
    assert "://" not in entry or entry.startswith("s3://")  # one spelling: file:// dropped, '..' resolved
    if not row.startswith("s3://"):
        assert score.plan_inputs(str(manifest), "model", allowed_roots=[os.path.dirname(entry)]).outside_roots == 0


def test_only_io_errors_count_toward_the_stop_and_leave_the_shard_for_a_rerun(tmp_path, exported_student, monkeypatch):
    """Twelve missing inputs are terminal rows of a finished shard; a transient EIO leaves its shard without a
    marker, and the next attempt (a re-run) scores it; five EIOs in a row stop the job."""
    root = tmp_path.resolve()
    write_tree(root / "in", {f"{i}.png": (png(seed=i), None) for i in range(6)})
    scorer = ShardScorer(exported_student, str(root / "out"), limits=dataclasses.asdict(LIMITS),
                               policy=dataclasses.asdict(ReadPolicy(max_consecutive_io_errors=5)),
                               roots=[str(root)], fingerprint="f")

    def shard(number: int, entries: list[str]) -> dict:
        return {k: v[0] for k, v in scorer({"shard": [number], "entries": [entries]}).items()}

    missing = shard(0, [f"{root}/gone-{i}.png" for i in range(12)])
    assert missing["done"] and not missing["fatal"] and json.loads(missing["errors"]) == {"missing": 12}
    real_read, failing = inputs.read_local, {f"{root}/in/1.png"}

    def flaky_read(path, limits):
        if path in failing:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(path, limits)

    monkeypatch.setattr(inputs, "read_local", flaky_read)
    entries = [f"{root}/in/{i}.png" for i in range(3)]
    first = shard(1, entries)
    assert not first["done"] and first["io_errors"] == 1 and not (root / "out" / "_done" / "part-00001.json").exists()
    failing.clear()  # the disk recovered
    again = shard(1, entries)
    assert again["done"] and again["scored"] == 3
    assert json.loads((root / "out" / "_done" / "part-00001.json").read_text())["fingerprint"] == "f"
    failing.update(f"{root}/in/{i}.png" for i in range(6))
    stopped = shard(2, [f"{root}/in/{i}.png" for i in range(6)])
    assert "5 reads failed in a row" in stopped["fatal"] and "\n" not in stopped["fatal"]


def test_a_run_that_was_taken_over_marks_no_shard_done(tmp_path, exported_student):
    """Fencing: an actor writes a shard's marker only while the output's lock names its run."""
    root = tmp_path.resolve()
    write_tree(root / "in", {"a.png": (png(), None)})
    storage.write_json(str(root / "out" / "_lock.json"), {"run": "the-new-run", "host": "h", "heartbeat": time.time()})
    scorer = ShardScorer(exported_student, str(root / "out"), limits=dataclasses.asdict(LIMITS),
                               roots=[str(root)], run_id="the-old-run", fingerprint="f")
    row = scorer({"shard": [0], "entries": [[f"{root}/in/a.png"]]})
    assert "another run took over" in row["fatal"][0] and "the-new-run" in row["fatal"][0]
    assert not (root / "out" / "_done").exists()


def test_a_marker_counts_only_with_its_part_files(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    for shard in range(3):
        parts = {}
        for sub in ("predictions", "errors"):
            size = storage.write_parquet(out.join(sub, f"part-{shard:05d}.parquet"), pa.table({"path": ["x"]}))
            parts[sub] = {"file": f"{sub}/part-{shard:05d}.parquet", "bytes": size, "rows": 1}
        storage.write_json(out.join("_done", f"part-{shard:05d}.json"), {"fingerprint": "f", "parts": parts})
    storage.write_json(out.join("_done", "part-00003.json"), {"fingerprint": "f"})  # an older kdray's marker
    (tmp_path / "out" / "predictions" / "part-00001.parquet").unlink()
    (tmp_path / "out" / "errors" / "part-00002.parquet").write_bytes(b"another file")
    assert sorted(score.valid_markers(out, "f")) == [0]
    assert sorted(p.name for p in (tmp_path / "out" / "_done").iterdir()) == ["part-00000.json"]  # the others gone
    assert score.valid_markers(out, "another plan") == {}


def test_a_lock_held_by_a_live_run_refuses_scoring_and_overwrite(tmp_path, exported_student):
    """Before Ray starts, and before anything in the output is deleted."""
    write_tree(tmp_path / "in", {"a.png": (png(), None)})
    out = tmp_path / "out"
    write_tree(out, {"summary.json": (b"{}", None)})
    with storage.OutputLock(storage.resolve(str(out / "_lock.json")), settle_s=0) as held:
        with pytest.raises(storage.OutputLocked, match=f"run {held.run_id}, host "):
            score_archive(exported_student, str(tmp_path / "in"), str(out), overwrite=True)
    assert (out / "summary.json").exists()


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
    env = {**os.environ, "KDRAY_LOG_DIR": str(tmp_path / "logs")}
    cmd = _score_command(exported_student, str(tmp_path / "in"), str(out))
    # every write of the first run is slowed: on one machine the local engine scores 96 images faster than
    # a poll can see the first marker and kill, so without it the run could finish before the kill
    first_env = slow_writes_env(env, tmp_path / "slow-writes", 0.5)
    proc = subprocess.Popen(cmd, cwd=REPO, env=first_env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = out / "_done"
    if moment == "after_a_shard":
        assert _wait_for(lambda: done.exists() and any(p.name.startswith("part-") for p in done.iterdir()))
    elif moment == "during_a_write":
        assert _wait_for(lambda: any(p.name.startswith(".tmp-") for d in ("predictions", "errors", "_done")
                                     if (out / d).exists() for p in (out / d).iterdir()))
    else:
        assert _wait_for(lambda: (out / "plan.json").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    shards_done_before = len([p for p in done.iterdir() if p.name.startswith("part-")]) if done.exists() else 0
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # a worker of the killed job may still finish the write it was in: at least the shards seen done are skipped
    assert summary["images"] == 96 and summary["shards_resumed"] >= shards_done_before
    assert summary["images_this_run"] == 96 - 8 * summary["shards_resumed"]
    if moment == "after_a_shard":
        assert summary["images_this_run"] < 96
    assert_exactly_once(str(out), {str(tmp_path / "in" / "d" / f"{i:03d}.png") for i in range(96)})
    assert not [p for p in out.rglob(".tmp-*")], "a half-written file survived the re-run"


SPREAD = {"scheduling_strategy": "SPREAD"}  # the scorers over the nodes, not packed onto one


@pytest.mark.parametrize("gpus, cpus, expected", [(0, 2, ({"num_cpus": 0.5, **SPREAD}, 2)),
                                                   (0, 16, ({"num_cpus": 0.5, **SPREAD}, 16)),
                                                   (2, 16, ({"num_gpus": 1, "num_cpus": 1, **SPREAD}, 2))])
def test_scoring_pool_takes_gpus_when_the_cluster_has_them(monkeypatch, gpus, cpus, expected):
    """Checked with fake cluster resources only: no GPU here. With GPUs, one actor per GPU runs torch."""
    from kdray import raycluster
    from kdray.scoring_engines import scoring_pool

    monkeypatch.setattr(raycluster, "cluster_gpus", lambda: float(gpus))
    monkeypatch.setattr(raycluster, "cluster_cpus", lambda: float(cpus))
    compute, resources, threads = scoring_pool(use_gpu=True)
    assert (resources, compute.max_size) == expected and threads == 1
    assert compute.min_size == compute.max_size  # the whole pool from the start
    assert scoring_pool(use_gpu=True, shards=1)[0].max_size == 1  # never more actors than shards


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


@pytest.mark.integration
def test_dicom_results_beside_the_rows_same_files_on_a_rerun(tmp_path, exported_student):
    """--dicom_results: each DICOM row's SR (and, explained, its overlay SC) under dicom/, named by its own UID;
    PNG rows get none; a resumed shard rewrites the same files, never new ones."""
    import pydicom

    rng = np.random.default_rng(5)
    files = {f"d/{i}.dcm": (dicom_bytes(rng.integers(0, 4095, (64, 64)), modality="DX", PatientID=f"P{i}"), None)
             for i in range(4)}
    files.update({f"d/{i}.png": (png(seed=i), None) for i in range(2)})
    with pytest.warns(UserWarning):  # a header no result can copy: predicted, no DICOM result, no crash
        files["d/bad.dcm"] = (dicom_bytes(rng.integers(0, 4095, (64, 64)), PatientBirthDate="not-a-date"), None)
    write_tree(tmp_path / "in", files)
    out = tmp_path / "out"
    score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS, explain="all",
                  engine="local", dicom_results=True)
    rows = read_rows(str(out), "predictions").to_pylist()
    written = sorted(str(p.relative_to(out)) for p in (out / "dicom").rglob("*.dcm"))
    assert len(written) == 8  # 4 SRs, 4 overlays
    for row in rows:
        if row["path"].endswith((".png", "bad.dcm")):
            assert row["dicom_sr"] is None and row["dicom_overlay"] is None
            continue
        sr = pydicom.dcmread(out / row["dicom_sr"])
        assert sr.Modality == "SR" and sr.StudyInstanceUID == row["study_uid"]
        refs = [str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
        assert row["sop_uid"] in refs
        numbers = [float(e.value) for e in sr.iterall() if e.keyword == "NumericValue"]
        assert numbers == pytest.approx([row["p_covid"], row["p_normal"], row["p_pneumonia"]], abs=1e-6)
        assert pydicom.dcmread(out / row["dicom_overlay"]).Modality == "OT"
    (out / "summary.json").unlink()
    (out / "_done" / "part-00000.json").unlink()
    again = score_archive(exported_student, str(tmp_path / "in"), str(out), shard_size=3, limits=LIMITS,
                          explain="all", engine="local", dicom_results=True)
    assert again.images_this_run == 3 and len(rows) == 7
    assert sorted(str(p.relative_to(out)) for p in (out / "dicom").rglob("*.dcm")) == written
