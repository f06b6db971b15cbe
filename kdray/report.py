"""``report.html``: a finished scoring run on one self-contained page, written beside ``summary.json``.

It opens from disk (or a downloaded S3 object) with no server: no script, no external URL, CSS inline, images as
``data:`` URIs, and a Content-Security-Policy that forbids loading anything else. It shows the run, its counts,
predictions by label, refusals in plain words (:mod:`kdray.reason_words`), a P(covid) histogram (SVG) with the
threshold, the largest studies (or folders) and a contact sheet of the most confident explained covid suspects.
The prediction parts are read one at a time, only the columns needed, and totalled as they are read: the page
never holds a row per image. Every value from the data is HTML-escaped (file names are hostile input). The page is
a view of the run and never keeps it from finishing: what cannot be read for it is left out with one log line;
only writing it fails like any other output write.
"""

from __future__ import annotations

import base64
import heapq
import io
import logging
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from kdray import KdrayError, first_line, storage
from kdray.metrics import covid_index
from kdray.predictor import model_info
from kdray.reason_words import PLAIN_WORDS
from kdray.schemas import ScoreSummary
from kdray.shard_scorer import PREDICTIONS_DIR

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"
BINS, TOP_GROUPS, SHEET_SIZE, THUMB_PX = 20, 50, 24, 192
MAX_OVERLAY_BYTES = 8 * 2**20  # an overlay is a PNG of the model's input size: far larger is not one
ROW_COLUMNS = ("path", "label", "covid_suspect", "model_id", "study_uid", "explanation")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Group:
    """One study's (or folder's) rows."""

    images: int = 0
    suspects: int = 0
    max_covid: float = float("nan")


@dataclass
class Totals:
    """What the page shows of the prediction rows, totalled part by part."""

    labels: Counter = field(default_factory=Counter)
    model_ids: Counter = field(default_factory=Counter)
    suspects: int = 0
    covid_class: str | None = None
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    studies: dict[str, Group] = field(default_factory=dict)
    folders: dict[str, Group] = field(default_factory=dict)
    without_study: int = 0
    sheet: list[tuple[float, str, str]] = field(default_factory=list)  # min-heap of (P(covid), path, overlay)
    unreadable_parts: int = 0


# ----------------------------------------------------------------------------- reading the run


def write_report(out: str | storage.Location, summary: ScoreSummary, base: str = "",
                 covid_threshold: float | None = None) -> str:
    """Build ``report.html`` from the run in ``out`` and write it there; returns its URI. ``base``: what the
    rows' paths are relative to (the plan's; default the input's folder), for the per-folder breakdown.
    ``covid_threshold``: default that of the run's model and backend, from its model card or checkpoint."""
    out = storage.resolve(out) if isinstance(out, str) else out
    threshold = covid_threshold_of(summary.model, summary.backend) if covid_threshold is None else covid_threshold
    try:
        totals = read_totals(out, base or posixpath.dirname(summary.input.rstrip("/")))
        thumbs = [(p, path, uri) for p, path, overlay in sorted(totals.sheet, reverse=True)  # most confident first
                  if (uri := thumbnail(out, overlay))]
    except storage.S3Unavailable:
        raise  # the store is away: writing the page would fail too, like every other output write
    except Exception as exc:  # noqa: BLE001 - a view of the run: whatever fails here must not keep it from finishing
        log.warning("report.html holds the summary only: its rows could not be read (%s)", first_line(exc))
        totals, thumbs = None, []
    loc = out.join(REPORT_FILE)
    storage.write_text(loc, render(summary, totals, threshold, thumbs))
    return loc.uri


def covid_threshold_of(model: str, backend: str) -> float | None:
    """The threshold the run's predictor used: its artifact's operating point in the export's card, or the
    checkpoint's own calibration (:func:`kdray.predictor.model_info`); None when it cannot be read."""
    try:
        return model_info(model, backend).covid_threshold
    except (KdrayError, OSError, ValueError) as exc:
        log.warning("report.html shows no covid threshold: cannot read the model's (%s)", first_line(exc))
        return None


def read_totals(out: storage.Location, base: str) -> Totals:
    totals = Totals()
    folder = out.join(PREDICTIONS_DIR)
    if storage.info(folder).type != pafs.FileType.Directory:
        return totals
    for f in storage.list_files(folder):
        if not (f.base_name.startswith("part-") and f.base_name.endswith(".parquet")):
            continue  # (a temporary file)
        loc = storage.Location(out.fs, f.path, storage.join(folder.uri, f.base_name))
        try:
            table = read_part(loc)
        except storage.S3Unavailable:
            raise
        except (KdrayError, OSError, pa.ArrowException) as exc:
            log.warning("report.html leaves out %s: %s", loc.uri, first_line(exc))
            totals.unreadable_parts += 1
            continue
        add_part(totals, table, base.rstrip("/"))
    return totals


def read_part(loc: storage.Location) -> pa.Table:
    """The columns the page needs of one prediction part: the row columns there are, and P(covid)."""
    part = pq.ParquetFile(pa.BufferReader(storage.read_bytes(loc)))
    names = part.schema_arrow.names
    classes = [n[len("p_"):] for n in names if n.startswith("p_")]
    index = covid_index(classes)
    covid = [] if index is None else [f"p_{classes[index]}"]
    return part.read(columns=[c for c in ROW_COLUMNS if c in names] + covid)


def _column(table: pa.Table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def add_part(totals: Totals, table: pa.Table, base: str) -> None:
    covid = next((n for n in table.column_names if n.startswith("p_")), None)  # (read_part reads only P(covid))
    totals.labels.update(_column(table, "label"))
    totals.model_ids.update(m for m in _column(table, "model_id") if m)
    p = np.full(table.num_rows, np.nan) if covid is None else \
        table[covid].cast(pa.float64()).fill_null(np.nan).to_numpy()
    if covid is not None:
        totals.covid_class = covid[len("p_"):]
        totals.histogram += np.histogram(p[np.isfinite(p)], BINS, (0.0, 1.0))[0]
    suspects = [bool(s) for s in _column(table, "covid_suspect")]
    totals.suspects += sum(suspects)
    rows = zip(_column(table, "path"), _column(table, "study_uid"), _column(table, "explanation"), p, suspects)
    for path, study, overlay, p_covid, suspect in rows:
        groups = [totals.folders.setdefault(folder_of(str(path), base), Group())]
        if study:
            groups.append(totals.studies.setdefault(study, Group()))
        else:
            totals.without_study += 1
        for group in groups:
            group.images += 1
            group.suspects += suspect
            if p_covid > group.max_covid or np.isnan(group.max_covid):  # (a nan never replaces a number)
                group.max_covid = float(p_covid)
        if suspect and overlay and np.isfinite(p_covid):
            entry = (float(p_covid), str(path), str(overlay))
            (heapq.heappush if len(totals.sheet) < SHEET_SIZE else heapq.heappushpop)(totals.sheet, entry)


def folder_of(path: str, base: str) -> str:
    """The first path component below ``base`` (a tar member's: its tar file; ``.`` for a file at the top); for a
    path elsewhere (a manifest row under another root), its own folder."""
    if base and path.startswith(base + "/"):
        head = re.split(r"[/#]", path[len(base) + 1:], maxsplit=1)
        return head[0] if len(head) > 1 else "."
    return posixpath.dirname(path.split("#", 1)[0]) or "."


def thumbnail(out: storage.Location, relative: str) -> str | None:
    """An overlay (a PNG inside the output) as a small JPEG ``data:`` URI, or None (logged)."""
    parts = relative.split("/")
    try:
        if relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise KdrayError("not a path inside the output")
        data = storage.read_bytes(out.join(*parts), MAX_OVERLAY_BYTES)
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
    except storage.S3Unavailable:
        raise
    except (KdrayError, OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("report.html leaves overlay %s out of the contact sheet: %s", relative[:200], first_line(exc))
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- the page


def _e(value) -> str:
    return escape(str(value), quote=True)


STYLE = ("body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}h1{font-size:1.5em}"
         "h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ccc}table{border-collapse:collapse}"
         "td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}.muted{color:#777}"
         "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.sheet{display:flex;flex-wrap:wrap;gap:.6em}"
         "figure{margin:0;width:192px;font-size:12px;word-break:break-all}svg rect{fill:#4a7ab5}"
         "svg text{font-size:10px;fill:#333}svg line.threshold{stroke:#c33;stroke-width:2}")


def render(summary: ScoreSummary, totals: Totals | None, threshold: float | None,
           thumbs: list[tuple[float, str, str]]) -> str:
    sections = [_run(summary, totals), _refusals(summary)]
    if totals is not None:
        sections[1:1] = [_labels(summary, totals, threshold)]
        sections += [_histogram(totals, threshold), _groups(totals), _sheet(summary, thumbs)]
    else:
        sections.append('<p class="muted">The rows could not be read for this page; see the log.</p>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<title>kdray scoring report: {_e(summary.output)}</title><style>{STYLE}</style></head><body>'
            f'<h1>Scoring report</h1>{"".join(sections)}</body></html>\n')


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs)


def _run(s: ScoreSummary, totals: Totals | None) -> str:
    ids = ", ".join(_e(m) for m in sorted(totals.model_ids)) if totals and totals.model_ids else "–"
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    run = [("model", _e(s.model)), ("model id", ids), ("input", _e(s.input)), ("output", _e(s.output)),
           ("kind", _e(s.kind)), ("backend", _e(s.backend)), ("engine", _e(s.engine)), ("explain", _e(s.explain)),
           ("written", written), ("wall time", f"{s.wall_s} s ({s.images_this_run} image(s) this run, "
                                               f"{s.img_per_s} img/s)")]
    counts = [(k, f'<span id="{k}">{v}</span>') for k, v in (
        ("images", s.images), ("scored", s.scored), ("errors", s.errors), ("explained", s.explained),
        ("shards", s.shards))]
    counts += [("shards resumed", s.shards_resumed), ("hidden files skipped", s.hidden_skipped),
               ("manifest duplicates", s.manifest_duplicates)]
    if totals and totals.unreadable_parts:
        counts.append(("unreadable parts", f"{totals.unreadable_parts} (left out of this page; see the log)"))
    return f"<h2>Run</h2><table>{_rows(run)}</table><h2>Counts</h2><table>{_rows(counts)}</table>"


def _labels(s: ScoreSummary, totals: Totals, threshold: float | None) -> str:
    rows = "".join(f'<tr><td>{_e(label)}</td><td class="n" data-label="{_e(label)}">{n}</td>'
                   f'<td class="n">{n / max(s.scored, 1):.1%}</td></tr>'
                   for label, n in sorted(totals.labels.items(), key=lambda kv: (-kv[1], str(kv[0]))))
    rule = f' at P(covid) ≥ <span id="covid-threshold">{threshold:.6g}</span>' if threshold is not None else ""
    return (f'<h2>Predictions by label</h2><table><tr><th>label</th><th class="n">images</th>'
            f'<th class="n">share</th></tr>{rows}</table>'
            f'<p>covid suspects{rule}: <span id="suspects">{totals.suspects}</span></p>')


def _refusals(s: ScoreSummary) -> str:
    if not s.errors_by_reason:
        return "<h2>Refusals</h2><p>None: every input was scored.</p>"
    rows = "".join(f'<tr><td><code>{_e(r)}</code></td><td class="n" data-reason="{_e(r)}">{n}</td>'
                   f'<td>{_e(PLAIN_WORDS.get(r, ""))}</td></tr>' for r, n in sorted(s.errors_by_reason.items()))
    return (f'<h2>Refusals</h2><table><tr><th>reason</th><th class="n">inputs</th><th>what it means</th></tr>'
            f'{rows}</table><p class="muted">Each refused input is a row of errors/ with its path and message.</p>')


def _histogram(totals: Totals, threshold: float | None) -> str:
    if totals.covid_class is None:
        return "<h2>P(covid)</h2><p>The model has no class named covid.</p>"
    width, height, pad = 640, 220, 28
    plot_w, plot_h = width - 2 * pad, height - 2 * pad
    bar = plot_w / BINS
    top = max(int(totals.histogram.max()), 1)
    parts = []
    for k, n in enumerate(int(c) for c in totals.histogram):
        h = plot_h * n / top
        x, y = pad + k * bar, height - pad - h
        parts.append(f'<rect data-bin="{k}" data-count="{n}" x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" '
                     f'height="{h:.1f}"><title>{k / BINS:.2f}–{(k + 1) / BINS:.2f}: {n}</title></rect>')
        if n:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">{n}</text>')
    parts += [f'<text x="{pad + t * plot_w:.1f}" y="{height - pad + 14}" text-anchor="middle">{t:g}</text>'
              for t in (0, 0.25, 0.5, 0.75, 1)]
    if threshold is not None:
        x = pad + min(max(threshold, 0.0), 1.0) * plot_w
        parts.append(f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{pad - 10}" y2="{height - pad}"/>'
                     f'<text x="{x + 4:.1f}" y="{pad - 12}">threshold {threshold:.3g}</text>')
    return (f'<h2>P({_e(totals.covid_class)}) over the scored images, {BINS} bins</h2>'
            f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="histogram of P(covid)"><line x1="{pad}" x2="{width - pad}" y1="{height - pad}" '
            f'y2="{height - pad}" stroke="#999"/>{"".join(parts)}</svg>')


def _rank(item: tuple[str, Group]) -> tuple:
    """The largest first; among equals, the most suspect."""
    key, g = item
    return -g.images, -g.suspects, -np.nan_to_num(g.max_covid, nan=-1.0), key


def _groups(totals: Totals) -> str:
    by_study = bool(totals.studies)
    groups, what = (totals.studies, "study") if by_study else (totals.folders, "folder")
    top = sorted(groups.items(), key=_rank)[:TOP_GROUPS]
    rows = "".join(f'<tr><td><code>{_e(key)}</code></td><td class="n">{g.images}</td><td class="n">{g.suspects}'
                   f'</td><td class="n">{g.max_covid:.3f}</td></tr>' for key, g in top)
    notes = [f"and {len(groups) - len(top)} more"] if len(groups) > len(top) else []
    if by_study and totals.without_study:
        notes.append(f"{totals.without_study} image(s) without a Study Instance UID are not in this table")
    key_name = "Study Instance UID" if by_study else "folder below the input"
    return (f'<h2>By {what} (the {min(len(groups), TOP_GROUPS)} largest of {len(groups)})</h2>'
            f'<table id="groups" data-by="{what}"><tr><th>{key_name}</th><th class="n">images</th>'
            f'<th class="n">suspects</th><th class="n">max P(covid)</th></tr>{rows}</table>'
            + "".join(f'<p class="muted">{n}</p>' for n in notes))


def _sheet(s: ScoreSummary, thumbs: list[tuple[float, str, str]]) -> str:
    title = "<h2>Most confident covid suspects</h2>"
    if s.explain == "none":
        return f"{title}<p>Explanations were off for this run (--explain none): no contact sheet.</p>"
    if not thumbs:
        return f"{title}<p>No explained covid suspect to show.</p>"
    figures = "".join(f'<figure title="{_e(path)}"><img src="{uri}" alt="Grad-CAM overlay">'
                      f'<figcaption>{_e(posixpath.basename(path))}<br>P(covid) {p:.3f}</figcaption></figure>'
                      for p, path, uri in thumbs)
    return f'{title}<p class="muted">Grad-CAM overlays, by P(covid).</p><div class="sheet">{figures}</div>'
