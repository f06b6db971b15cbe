"""The main job: the whole pipeline end to end.

    python -m jobs.pipeline                       # embedded default: local S3 + generated data + local Ray
    python -m jobs.pipeline --data s3://bucket/cxr --output s3://bucket/runs/x   # real data
"""

import json

from kdray import storage
from kdray.runner import run_job
from kdray.config import PipelineConfig, load_config
from kdray.evaluate import format_table
from kdray.pipeline import SUMMARY_COLUMNS, run_pipeline


def main(argv: list[str]) -> dict:
    cfg = load_config(PipelineConfig, argv)
    from serve.deploy import deploy  # imported here: Ray Serve loads only when the pipeline runs

    summary = run_pipeline(cfg, deploy=deploy)
    print("\n" + format_table(summary["table"], SUMMARY_COLUMNS))
    card = summary.get("export")
    if card:
        op = card["operating_points"][card["served_artifact"]]
        print(f"\nexported KD student, served as {card['served_artifact']}: temperature {op['temperature']:.3f} "
              f"(ECE on {op['split']} {op['ece_before']:.4f} -> {op['ece_after']:.4f}), covid threshold "
              f"{op['covid_threshold']} for sensitivity {op['target_sensitivity']:.0%}, fitted on its own logits")
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
