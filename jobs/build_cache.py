"""Run the teacher once over the training split and cache its logits as Parquet (Ray Data actor pool).

    python -m jobs.build_cache --teacher RUN_OR_CHECKPOINT --data ROOT [--views K] [--output URI]
"""

from kdray import logit_cache, storage
from kdray.runner import run_job
from kdray.config import CacheJobConfig, dump_yaml, load_config
from kdray.data import list_split


def main(argv: list[str]) -> tuple[str, bool]:
    cfg = load_config(CacheJobConfig, argv)
    listing = list_split(cfg.data.root, cfg.data.train_split, cfg.data.classes, cfg.data.limit)
    uri, reused = logit_cache.build(cfg.teacher, listing, cfg.data.image_size, cfg.output, cfg.views, cfg.augment,
                                    cfg.batch_size)
    storage.write_text(storage.join(uri, "args.yaml"), dump_yaml(cfg))
    print(f"logit cache: {uri} ({'reused' if reused else 'built'})")
    return uri, reused


if __name__ == "__main__":
    run_job(main)
