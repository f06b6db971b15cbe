"""Score every image under a folder or S3 prefix offline with Ray Data.

    python -m jobs.score --model EXPORT_OR_CHECKPOINT --input URI --output URI [--backend auto]
"""

from kdray import storage
from kdray.runner import run_job
from kdray.config import ScoreJobConfig, dump_yaml, load_config
from kdray.score import score_archive


def main(argv: list[str]) -> dict:
    cfg = load_config(ScoreJobConfig, argv)
    summary = score_archive(cfg.model, cfg.input, cfg.output, cfg.backend, cfg.batch_size, cfg.overwrite)
    storage.write_text(storage.join(cfg.output, "args.yaml"), dump_yaml(cfg))
    print(f"scored {summary['scored']} image(s), {summary['errors']} unreadable, {summary['img_per_s']} img/s\n"
          f"predictions: {storage.join(cfg.output, 'predictions')}")
    return summary


if __name__ == "__main__":
    run_job(main)
