"""Score every image in an archive offline with Ray Data: resumable, exactly once, DICOM included.

    python -m jobs.score --model EXPORT_OR_CHECKPOINT --input URI --output URI [--shard_size 0 (auto)]
                         [--explain none|covid_suspect|all] [--dicom_results true] [--dicom_store DICOMWEB_ROOT]
                         [--allowed_roots URI,URI] [--report true|false]

``--input``: a folder or s3:// prefix (recursive; files judged by content), a CSV/Parquet manifest with
a ``path`` column, WebDataset ``.tar`` shards, or a PACS: ``dicomweb+http://host:port/dicom-web?Modality=DX``
(QIDO-RS filters; credentials in ``KDRAY_DICOMWEB_USER`` / ``KDRAY_DICOMWEB_PASSWORD``; :mod:`kdray.dicomweb`). Inputs are read only inside the input's own folder or prefix
(a manifest's folder) and ``--allowed_roots``; a row or link elsewhere is listed as ``outside_roots`` and never
opened. ``--output`` receives ``predictions/`` and ``errors/`` (Parquet, one file per shard), ``args.yaml`` and,
last, ``summary.json``; one run at a time holds it (``_lock.json``), and a second is refused. Killed or
interrupted, the same command run again resumes: finished shards are skipped and nothing is scored twice.

``report.html``, written just before ``summary.json`` (none with ``--report false``), is the run on one self-contained
page: counts, refusals, a P(covid) histogram, studies or folders, explained suspects (:mod:`kdray.report`).

``--explain covid_suspect|all`` also writes a Grad-CAM overlay (PNG) for those rows under
``explanations/part-NNNNN/``; the row's ``explanation`` column holds its path relative to ``--output``.

``--dicom_results``: each DICOM row also gets its DICOM SR (:mod:`kdray.dicom_results`), and with ``--explain`` its
overlay as a Secondary Capture, under ``dicom/part-NNNNN/<SOP Instance UID>.dcm`` (columns ``dicom_sr`` and
``dicom_overlay``); their UIDs come from the source's, so a re-run writes the same files again, never new ones.
``--dicom_store dicomweb+http://host:port/dicom-web`` also stores them in a PACS by STOW-RS (same credentials
variables), each shard's before its marker: a PACS that refuses or stays away stops the job, and the same
command resumes. A re-run of a PACS query finishes the instances its first run listed.
"""

from kdray import storage
from kdray.config import ScoreJobConfig, dump_yaml, load_config
from kdray.report import REPORT_FILE
from kdray.runner import run_job
from kdray.schemas import ScoreSummary
from kdray.score import score_archive


def main(argv: list[str]) -> ScoreSummary:
    cfg = load_config(ScoreJobConfig, argv)
    summary = score_archive(cfg.model, cfg.input, cfg.output, cfg.backend, cfg.batch_size, cfg.overwrite,
                            cfg.shard_size, cfg.limits, explain=cfg.explain, allowed_roots=cfg.allowed_roots,
                            engine=cfg.engine, dicom_results=cfg.dicom_results,
                            dicom_store=cfg.dicom_store, report=cfg.report)
    storage.write_text(storage.join(cfg.output, "args.yaml"), dump_yaml(cfg))
    reasons = ", ".join(f"{k} {v}" for k, v in summary.errors_by_reason.items()) or "none"
    print(f"scored {summary.scored} of {summary.images} input(s) with {summary.backend} ({summary.engine} engine); "
          f"refused {summary.errors} ({reasons}); {summary.hidden_skipped} hidden file(s) skipped\n"
          f"this run: {summary.images_this_run} in {summary.wall_s} s ({summary.img_per_s} img/s, "
          f"steady {summary.steady_img_per_s} img/s); {summary.shards_resumed} shard(s) were already done\n"
          f"predictions: {storage.join(cfg.output, 'predictions')}  errors: {storage.join(cfg.output, 'errors')}"
          + (f"\nexplained {summary.explained} row(s) ({cfg.explain}): "
             f"{storage.join(cfg.output, 'explanations')}" if cfg.explain != "none" else "")
          + (f"\nDICOM results (SR per DICOM row): {storage.join(cfg.output, 'dicom')}"
             if cfg.dicom_results or cfg.dicom_store else "")
          + (f", also stored in the PACS at {cfg.dicom_store}" if cfg.dicom_store else "")
          + (f"\nreport: {storage.join(cfg.output, REPORT_FILE)}" if cfg.report else ""))
    return summary


if __name__ == "__main__":
    run_job(main)
