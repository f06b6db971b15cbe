"""report.html: one self-contained page per finished scoring run, its numbers those of the run's own files."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from kdray import storage
from kdray.reason_words import PLAIN_WORDS
from kdray.report import REPORT_FILE, SHEET_SIZE, write_report
from kdray.schemas import ScoreSummary
from test_score import LIMITS, exported_student, png, read_rows, write_tree  # noqa: F401 - exported_student: a fixture

HOSTILE = "a/<script>alert(1)</script>.png"
CLASSES = ("covid", "normal", "pneumonia")


# ----------------------------------------------------------------------------- reading the page


class Page(HTMLParser):
    """The page's data hooks, and every URL-bearing attribute."""

    def __init__(self, text: str):
        super().__init__()
        self.labels, self.reasons, self.bins, self.ids, self.refs = {}, {}, {}, {}, []
        self.images, self._hook = 0, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "xlink:href") and v]
        if tag == "img":
            self.images += 1
        if tag == "rect" and "data-bin" in a:
            self.bins[int(a["data-bin"])] = int(a["data-count"])
        for key, target in (("data-label", self.labels), ("data-reason", self.reasons), ("id", self.ids)):
            if key in a:
                self._hook = (target, a[key])

    def handle_data(self, data):
        if self._hook is not None:
            target, key = self._hook
            target[key] = data.strip()
            self._hook = None


def count(page: Page, hook: str) -> int:
    return int(page.ids[hook])


def assert_self_contained(text: str, page: Page) -> None:
    assert "http://" not in text and "https://" not in text and 'src="/' not in text and "<script" not in text
    assert all(ref.startswith("data:image/") for ref in page.refs), page.refs
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


# ----------------------------------------------------------------------------- a fake finished run


def overlay_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def prediction_part(rows: list[dict]) -> pa.Table:
    columns = {"path": [r["path"] for r in rows], "label": [CLASSES[int(np.argmax(r["p"]))] for r in rows]}
    for k, name in enumerate(CLASSES):
        columns[f"p_{name}"] = pa.array([r["p"][k] for r in rows], pa.float32())
    columns["covid_suspect"] = pa.array([r["p"][0] >= 0.5 for r in rows])
    columns["model_id"] = ["kdray-student:0.1.0:int8"] * len(rows)
    columns["study_uid"] = pa.array([r.get("study") for r in rows], pa.string())
    columns["explanation"] = pa.array([r.get("overlay") for r in rows], pa.string())
    return pa.table(columns)


def fake_run(root: Path, explain: str = "covid_suspect") -> tuple[ScoreSummary, list[dict]]:
    """Two prediction parts (40 rows: half with a study UID, the suspects explained), one errors part."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        p = rng.dirichlet((1, 1, 1))
        path = HOSTILE if i == 0 else f"{root}/in/{'ab'[i % 2]}/{i:02d}.png"
        row = {"path": path if i else f"{root}/in/{path}", "p": p if i else np.array([0.99, 0.005, 0.005])}
        if i % 2:
            row["study"] = f"1.2.3.{i % 5}" if i != 1 else "<b>1.2</b>"
        if row["p"][0] >= 0.5 and explain != "none":
            row["overlay"] = f"explanations/part-{i // 20:05d}/{i:02d}.png"
            storage.write_bytes(str(root / "out" / row["overlay"]), overlay_png(i))
        rows.append(row)
    for shard in range(2):
        storage.write_parquet(str(root / "out" / "predictions" / f"part-{shard:05d}.parquet"),
                              prediction_part(rows[shard * 20:(shard + 1) * 20]))
    errors = {"path": [f"{root}/in/c/x.txt", f"{root}/in/c/y.png", f"{root}/in/c/z.png"],
              "reason": ["not_an_image", "too_small", "too_small"], "message": ["m"] * 3}
    storage.write_parquet(str(root / "out" / "errors" / "part-00000.parquet"), pa.table(errors))
    summary = ScoreSummary(
        model=str(root / "no-model"), input=f"{root}/in", output=str(root / "out"), kind="folder", backend="onnx-int8",
        engine="local", images=43, scored=40, explained=sum(1 for r in rows if r.get("overlay")), explain=explain,
        errors=3, errors_by_reason={"not_an_image": 1, "too_small": 2}, hidden_skipped=0, manifest_duplicates=0,
        roots=[f"{root}/in"], shards=2, shards_resumed=0, images_this_run=43, nodes=1, wall_s=1.5, img_per_s=28.7,
        steady_img_per_s=None)
    return summary, rows


def suspects_with_overlays(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if r.get("overlay")), key=lambda r: -r["p"][0])


# ----------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_the_page_holds_the_runs_numbers_and_nothing_external(tmp_path):
    summary, rows = fake_run(tmp_path)
    uri = write_report(str(tmp_path / "out"), summary, f"{tmp_path}/in", covid_threshold=0.5)
    text = Path(uri).read_text()
    page = Page(text)
    assert uri == str(tmp_path / "out" / REPORT_FILE)
    assert_self_contained(text, page)
    for hook in ("images", "scored", "errors", "explained", "shards"):
        assert count(page, hook) == getattr(summary, hook)
    assert count(page, "suspects") == sum(1 for r in rows if r["p"][0] >= 0.5)
    assert page.ids["covid-threshold"] == "0.5"
    labels = Counter(CLASSES[int(np.argmax(r["p"]))] for r in rows)
    assert {k: int(v) for k, v in page.labels.items()} == dict(labels)
    assert {k: int(v) for k, v in page.reasons.items()} == {"not_an_image": 1, "too_small": 2}
    assert escape(PLAIN_WORDS["too_small"]) in text  # the reason in plain words
    assert sorted(page.bins) == list(range(20)) and sum(page.bins.values()) == summary.scored == 40
    assert page.bins[19] >= 1  # the hostile row: P(covid) 0.99
    assert page.images == min(SHEET_SIZE, len(suspects_with_overlays(rows)))
    assert 'data-by="study"' in text and "1.2.3.3" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;1.2&lt;/b&gt;" in text  # escaped only


@pytest.mark.unit
def test_the_contact_sheet_is_the_most_confident_suspects_first(tmp_path):
    summary, rows = fake_run(tmp_path)
    text = Path(write_report(str(tmp_path / "out"), summary, f"{tmp_path}/in", covid_threshold=0.5)).read_text()
    shown = [float(p) for p in re.findall(r"<br>P\(covid\) ([0-9.]+)</figcaption>", text)]
    expected = [round(float(r["p"][0]), 3) for r in suspects_with_overlays(rows)][:SHEET_SIZE]
    assert shown == pytest.approx(expected, abs=1e-3) and shown[0] == 0.99
    for uri in re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', text):
        import base64

        thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 192


@pytest.mark.unit
def test_a_missing_or_corrupt_overlay_leaves_only_that_row_out(tmp_path, caplog):
    summary, rows = fake_run(tmp_path)
    suspects = suspects_with_overlays(rows)
    (tmp_path / "out" / suspects[0]["overlay"]).unlink()
    (tmp_path / "out" / suspects[1]["overlay"]).write_bytes(b"not a png")
    page = Page(Path(write_report(str(tmp_path / "out"), summary, f"{tmp_path}/in", 0.5)).read_text())
    assert page.images == len(suspects) - 2 and count(page, "scored") == 40
    assert sum("leaves overlay" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.unit
def test_without_explanations_or_studies_the_page_says_so_and_counts_folders(tmp_path):
    summary, rows = fake_run(tmp_path, explain="none")
    for shard in range(2):  # the same rows without study UIDs
        part = prediction_part([{k: v for k, v in r.items() if k != "study"} for r in rows[shard * 20:][:20]])
        storage.write_parquet(str(tmp_path / "out" / "predictions" / f"part-{shard:05d}.parquet"), part)
    text = Path(write_report(str(tmp_path / "out"), summary, f"{tmp_path}/in", 0.5)).read_text()
    assert "Explanations were off for this run" in text and Page(text).images == 0
    folders = dict(re.findall(r'<tr><td><code>([^<]+)</code></td><td class="n">(\d+)</td>', text))
    assert 'data-by="folder"' in text and folders == {"a": "20", "b": "20"}  # (the hostile row is below a/)


@pytest.mark.unit
def test_an_unreadable_model_or_part_costs_only_that_part_of_the_page(tmp_path):
    summary, _ = fake_run(tmp_path)
    (tmp_path / "out" / "predictions" / "part-00001.parquet").write_bytes(b"not parquet")
    text = Path(write_report(str(tmp_path / "out"), summary, f"{tmp_path}/in")).read_text()  # the model: none
    page = Page(text)
    assert "covid-threshold" not in page.ids and sum(page.bins.values()) == 20
    assert "unreadable parts" in text and count(page, "images") == 43


# ----------------------------------------------------------------------------- integration


def _score(model: str, inputs: Path, out: Path, *flags: str):
    from jobs.score import main

    return main(["--model", model, "--input", str(inputs), "--output", str(out), "--shard_size", "3",
                 "--engine", "local", "--min_side", str(LIMITS.min_side), "--max_pixels", str(LIMITS.max_pixels),
                 *flags])


@pytest.mark.integration
def test_jobs_score_writes_the_report_next_to_the_summary(tmp_path, exported_student, capsys):
    files = {f"s/{i:02d}.png": (png(seed=i), None) for i in range(7)}
    files.update({"s/bad.png": (b"not an image", "not_an_image"), "s/tiny.png": (png(side=1), "too_small")})
    write_tree(tmp_path / "in", files)
    out = tmp_path / "out"
    summary = _score(exported_student, tmp_path / "in", out, "--explain", "all")
    assert f"report: {out / REPORT_FILE}" in capsys.readouterr().out
    text = (out / REPORT_FILE).read_text()
    page = Page(text)
    assert_self_contained(text, page)
    stored = json.loads((out / "summary.json").read_text())
    assert stored == summary.model_dump(mode="json")
    for hook in ("images", "scored", "errors", "explained"):
        assert count(page, hook) == stored[hook]
    assert stored["scored"] == 7 and stored["errors"] == 2
    predictions = read_rows(str(out), "predictions")
    assert {k: int(v) for k, v in page.labels.items()} == dict(Counter(predictions["label"].to_pylist()))
    assert {k: int(v) for k, v in page.reasons.items()} == stored["errors_by_reason"]
    assert sum(page.bins.values()) == 7
    suspects = sum(predictions["covid_suspect"].fill_null(False).to_pylist())
    assert count(page, "suspects") == suspects and page.images == min(suspects, SHEET_SIZE)
    assert "covid-threshold" in page.ids  # the export's operating point


@pytest.mark.integration
def test_the_page_of_a_run_on_s3_is_the_same(tmp_path, s3_bucket):
    summary, rows = fake_run(tmp_path)
    local = Path(write_report(str(tmp_path / "out"), summary, f"{tmp_path}/in", 0.5)).read_text()
    (tmp_path / "out" / REPORT_FILE).unlink()
    storage.copy_dir(str(tmp_path / "out"), f"s3://{s3_bucket}/report-run")
    uri = write_report(f"s3://{s3_bucket}/report-run", summary, f"{tmp_path}/in", 0.5)
    assert uri == f"s3://{s3_bucket}/report-run/{REPORT_FILE}"
    on_s3 = storage.read_bytes(uri).decode()
    written = re.compile(r"<th>written</th><td>[^<]*</td>")
    assert written.sub("", on_s3) == written.sub("", local)


@pytest.mark.integration
def test_report_false_writes_none(tmp_path, exported_student, capsys):
    write_tree(tmp_path / "in", {f"s/{i}.png": (png(seed=i), None) for i in range(2)})
    _score(exported_student, tmp_path / "in", tmp_path / "out", "--report", "false")
    assert (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / REPORT_FILE).exists()
    assert "report:" not in capsys.readouterr().out


@pytest.mark.integration
def test_the_report_opens_in_a_browser_with_the_summarys_numbers(tmp_path, exported_student):
    """The page of a small real run, opened from disk in headless Chromium: what a person sees (the rendered text,
    not the HTML) holds summary.json's numbers, the thumbnails are drawn, and the page loaded nothing else.
    ``KDRAY_SCREENSHOTS=docs`` refreshes docs/report.png."""
    from browser import chromium, keep_screenshot

    files = {f"ward-{i % 2}/{i:02d}.png": (png(seed=i), None) for i in range(10)}
    files.update({"ward-0/bad.png": (b"not an image", "not_an_image"), "ward-1/tiny.png": (png(side=1), "too_small")})
    write_tree(tmp_path / "in", files)
    out = tmp_path / "out"
    _score(exported_student, tmp_path / "in", out, "--explain", "all")
    stored = json.loads((out / "summary.json").read_text())
    with chromium() as driver:
        driver.get((out / REPORT_FILE).as_uri())
        seen = driver.execute_script("""
            const text = (id) => document.getElementById(id).innerText.trim();
            const cells = (hook) => Object.fromEntries([...document.querySelectorAll(`[data-${hook}]`)]
                .map(e => [e.dataset[hook], parseInt(e.innerText)]));
            return {images: text('images'), scored: text('scored'), errors: text('errors'),
                    explained: text('explained'), labels: cells('label'), reasons: cells('reason'),
                    drawn: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
                    thumbnails: document.images.length,
                    loaded: performance.getEntriesByType('resource').map(r => r.name)};""")
        keep_screenshot(driver, tmp_path / "report.png", "report.png")
    assert [int(seen[k]) for k in ("images", "scored", "errors", "explained")] == \
        [stored[k] for k in ("images", "scored", "errors", "explained")]
    predictions = read_rows(str(out), "predictions")
    assert seen["labels"] == dict(Counter(predictions["label"].to_pylist()))
    assert seen["reasons"] == stored["errors_by_reason"] == {"not_an_image": 1, "too_small": 1}
    assert seen["drawn"] == seen["thumbnails"] and seen["loaded"] == []  # only data: images, nothing fetched
