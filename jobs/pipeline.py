"""The main job: the whole pipeline end to end.

    python -m jobs.pipeline                       # embedded default: local S3 + generated data + local Ray
    python -m jobs.pipeline --data s3://bucket/cxr --output s3://bucket/runs/x   # real data
"""

import json

from kdray import storage
from kdray.cli import run_job
from kdray.config import PipelineConfig, load_config
from kdray.evaluate import format_table
from kdray.pipeline import SUMMARY_COLUMNS, run_pipeline


def main(argv: list[str]) -> dict:
    cfg = load_config(PipelineConfig, argv)
    summary = run_pipeline(cfg)
    print("\n" + format_table(summary["table"], SUMMARY_COLUMNS))
    card = summary.get("export") or {}
    if card.get("calibration"):
        c = card["calibration"]
        print(f"\nexported KD student: temperature {c['temperature']:.3f} (ECE on {c['split']} {c['ece_before']:.4f} -> "
              f"{c['ece_after']:.4f}), covid threshold {c['covid_threshold']} for sensitivity "
              f"{c['target_sensitivity']:.0%} on {c['split']}")
    if summary.get("serve_reply"):
        print(f"\nServe answered: {json.dumps(summary['serve_reply']['response'])}")
    if summary.get("score"):
        s = summary["score"]
        print(f"offline scoring: {s['scored']} images, {s['errors']} unreadable, {s['img_per_s']} img/s")
    print(f"logit cache: {summary['logit_cache']} ({'reused' if summary['logit_cache_reused'] else 'built'})")
    print(f"pipeline finished in {summary['wall_s']:.0f} s; summary: {storage.join(summary['output'], 'summary.json')}")
    return summary


if __name__ == "__main__":
    run_job(main)
