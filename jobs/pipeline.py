"""The main job: the whole pipeline end to end.

    python -m jobs.pipeline                       # embedded default: local S3 + generated data + local Ray
    python -m jobs.pipeline --data s3://bucket/cxr --output s3://bucket/runs/x   # real data

Without ``--data`` it runs on the embedded default: a local SeaweedFS S3 on loopback (its files in
``--demo.s3_dir``, so that the outputs outlive the run), holding a generated 3-class data set. The S3 is
stopped at the end, like the Ray the pipeline starts.
"""

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator

from kdray import storage
from kdray.runner import local_state_path, run_job
from kdray.config import PipelineConfig, load_config
from kdray.evaluate import format_table
from kdray.pipeline import SUMMARY_COLUMNS, run_pipeline
from kdray.schemas import PipelineSummary

DEMO_BUCKET = "kdray-demo"
log = logging.getLogger("kdray.pipeline")  # the pipeline's own logger: its lines reach the quiet console


@contextlib.contextmanager
def data_and_output(cfg: PipelineConfig) -> Iterator[tuple[str, str]]:
    """(data root, output root): the user's, or the embedded default's, whose S3 runs while the block does."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if cfg.data.root:
        yield cfg.data.root, cfg.run.output or local_state_path(os.path.join("runs", f"pipeline-{stamp}"))
        return
    from cluster.local.demo_data import demo_dataset
    from cluster.local.s3 import LocalS3

    s3_dir = local_state_path(cfg.demo.s3_dir)
    with LocalS3(s3_dir) as s3:
        s3.create_bucket(DEMO_BUCKET)
        # The one change to the environment, before storage or Ray first read it: kdray.storage takes its S3
        # settings from AWS_*. A local Ray inherits them; on a cluster the workers get the endpoint through the
        # runtime_env and the keys through a private file, never through Ray (kdray.raycluster.write_driver_keys).
        os.environ.update(s3.env())
        demo = cfg.demo
        data = demo_dataset(f"s3://{DEMO_BUCKET}/data", demo.train_per_class, demo.val_per_class, demo.source_size)
        log.info("local S3 at %s (data in %s); generated data in %s", s3.endpoint_url, s3_dir, data)
        yield data, cfg.run.output or f"s3://{DEMO_BUCKET}/runs/pipeline-{stamp}"


def main(argv: list[str]) -> PipelineSummary:
    cfg = load_config(PipelineConfig, argv)
    from serve.deploy import deploy  # imported here: Ray Serve loads only when the pipeline runs

    with data_and_output(cfg) as (data, out):
        summary = run_pipeline(cfg, data, out, deploy=deploy)
    print("\n" + format_table([row.model_dump() for row in summary.table], SUMMARY_COLUMNS))
    card = summary.export
    if card:
        op = card.operating_point(card.served_artifact)
        print(f"\nexported KD student, served as {card.served_artifact}: temperature {op.temperature:.3f} "
              f"(ECE on {op.split} {op.ece_before:.4f} -> {op.ece_after:.4f}), covid threshold "
              f"{op.covid_threshold} for sensitivity {op.target_sensitivity:.0%}, fitted on its own logits")
    if summary.serve_reply:
        print(f"\nServe answered: {json.dumps(summary.serve_reply.response)}")
    if summary.score:
        s = summary.score
        print(f"offline scoring: {s.scored} images, {s.errors} unreadable, {s.img_per_s} img/s")
    print(f"logit cache: {summary.logit_cache} ({'reused' if summary.logit_cache_reused else 'built'})")
    print(f"pipeline finished in {summary.wall_s:.0f} s; summary: {storage.join(summary.output, 'summary.json')}")
    return summary

if __name__ == "__main__":
    run_job(main)
