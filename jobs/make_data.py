"""Write the synthetic 3-class chest-X-ray-like ImageFolder set (train/ and val/) to a folder or s3:// prefix.

    python -m jobs.make_data OUTPUT [--train-per-class 60] [--val-per-class 20] [--size 128] [--seed 0]
"""

from cluster.local.demo_data import make_dataset
from kdray.config import MakeDataJobConfig, load_config
from kdray.runner import run_job


def main(argv: list[str]) -> dict:
    cfg = load_config(MakeDataJobConfig, argv)
    counts = make_dataset(cfg.output, {"train": cfg.train_per_class, "val": cfg.val_per_class}, cfg.size, cfg.seed)
    print(f"wrote {sum(counts.values())} images to {cfg.output}")
    return counts


if __name__ == "__main__":
    run_job(main)
