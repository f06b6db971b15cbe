"""Write the synthetic 3-class chest-X-ray-like ImageFolder set (train/ and val/) to a folder or s3:// prefix.

    python -m jobs.make_data OUTPUT [--train-per-class 60] [--val-per-class 20] [--size 128] [--seed 0]
"""

import argparse

from cluster.local.demo_data import make_dataset
from kdray.runner import run_job


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="kdray make-data", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="folder or s3://bucket/prefix")
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = make_dataset(a.output, {"train": a.train_per_class, "val": a.val_per_class}, a.size, a.seed)
    print(f"wrote {sum(counts.values())} images to {a.output}")
    return counts


if __name__ == "__main__":
    run_job(main)
