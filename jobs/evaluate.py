"""Evaluate any checkpoint (teacher or student) or exported model on a split.

    python -m jobs.evaluate --model RUN_OR_CHECKPOINT --data ROOT [--split val] [--output URI]

Writes metrics.json (accuracy, per-class P/R/F1, macro-F1, COVID sensitivity/specificity/PPV,
one-vs-rest ROC AUC, ECE, confusion matrix, per-source breakdown), predictions.parquet (one row per
image: image_id, label, prediction, calibrated p_<class>, source) and confusion.png / roc.png.
"""

from kdray import storage
from kdray.runner import run_job
from kdray.config import EvalJobConfig, dump_yaml, load_config
from kdray.evaluate import evaluate_model
from kdray.pinning import parse_ref
from kdray.schemas import Evaluation


def main(argv: list[str]) -> Evaluation:
    cfg = load_config(EvalJobConfig, argv)
    output = cfg.output or storage.join(parse_ref(cfg.model).uri, f"eval-{cfg.split}")  # beside a pinned export too
    storage.makedirs(output)
    storage.write_text(storage.join(output, "args.yaml"), dump_yaml(cfg))
    m = evaluate_model(cfg.model, cfg.data.root, cfg.split, output, cfg.backend, cfg.batch_size, cfg.name,
                       cfg.data.limit)
    covid = m.covid
    print(f"{cfg.split}: accuracy {m.accuracy:.4f}  macro-F1 {m.macro_f1:.4f}  "
          f"COVID sensitivity {covid and covid.sensitivity}  specificity {covid and covid.specificity}\n"
          f"metrics and plots: {output}")
    return m


if __name__ == "__main__":
    run_job(main)
