"""Shortcut check per source: where the student's Grad-CAM mass falls, border against centre.

    python bench/explain.py --model runs/accuracy-quick-1/export/student \
        [--data ../shared/datasets/cxr] [--split val] [--output bench/results/explain.md]

For every image of the split (``manifest.csv``), the served artifact predicts and :mod:`kdray.explain`
computes the Grad-CAM map of the predicted class on the export's torch weights. The border is the outer
``--border`` (15%) of each side, 51% of the image's area; the centre, where the lungs are, is the rest. A map
spread evenly would put 0.51 of its mass in the border. The report gives per source, and per source and
true class: images, accuracy, the mean and median share of the mass in the border, and the share of images
whose map is mostly (> 0.51) in the border.

Example overlays (``--examples`` per source and class) are written only for images whose licence allows
redistribution with attribution (``CC BY 3.0``/``CC BY 4.0`` in the manifest's ``license`` column), with
``ATTRIBUTION.md`` beside them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy import short_source  # noqa: E402
from bench.machine import cpu_flags, machine  # noqa: E402
from kdray.evaluate import format_table  # noqa: E402
from kdray.explain import BORDER, Explainer, border_mask, border_mass  # noqa: E402
from kdray.images import load_image  # noqa: E402
from kdray.predictor import load_predictor, read_model_card  # noqa: E402

REDISTRIBUTABLE = ("CC BY 3.0", "CC BY 4.0")  # attribution only: no NC/SA/ND terms to carry along
BATCH = 16


def read_manifest(data: str, split: str) -> list[dict]:
    with open(os.path.join(data, "manifest.csv"), newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["split"] == split]


def measure(model: str, data: str, rows: list[dict], border: float) -> list[dict]:
    """Per image: prediction, explained class and the border share of its Grad-CAM mass."""
    predictor = load_predictor(model)
    explainer = Explainer.load(model)
    size = predictor.image_size
    out = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        images = np.stack([load_image(Path(data, r["path"]).read_bytes(), size).pixels for r in chunk])
        probs = predictor.probabilities(images)
        explanations = explainer.explain(images, probs.argmax(1))
        for row, image, e in zip(chunk, images, explanations):
            out.append({**row, "image": image, "explanation": e, "predicted": e.explained_class,
                        "border_share": border_mass(e.heatmap, border)})
        print(f"  {min(start + BATCH, len(rows))}/{len(rows)} images explained", flush=True)
    return out


def summarise(group: list[dict], area: float) -> dict:
    shares = np.array([r["border_share"] for r in group], float)
    shares = shares[~np.isnan(shares)]
    return {"images": len(group), "accuracy": float(np.mean([r["predicted"] == r["label"] for r in group])),
            "border share, mean": float(shares.mean()) if len(shares) else None,
            "border share, median": float(np.median(shares)) if len(shares) else None,
            f"maps mostly in the border (> {area:.2f})": float(np.mean(shares > area)) if len(shares) else None,
            "agrees with torch": float(np.mean([r["explanation"].agrees for r in group]))}


def tables(results: list[dict], area: float) -> tuple[list[dict], list[dict]]:
    by_source, by_class = defaultdict(list), defaultdict(list)
    for r in results:
        by_source[short_source(r["source_repo"])].append(r)
        by_class[(short_source(r["source_repo"]), r["label"])].append(r)
    per_source = [{"source": s, **summarise(g, area)} for s, g in sorted(by_source.items())]
    per_source.append({"source": "all", **summarise(results, area)})
    per_class = [{"source": s, "class": c, **summarise(g, area)} for (s, c), g in sorted(by_class.items())]
    return per_source, per_class


def write_examples(results: list[dict], folder: Path, per_group: int) -> list[dict]:
    """Up to ``per_group`` CC BY overlays per source and true class, plus ATTRIBUTION.md; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    chosen, counts = [], defaultdict(int)
    for r in results:
        key = (short_source(r["source_repo"]), r["label"])
        if r["license"].strip() not in REDISTRIBUTABLE or counts[key] >= per_group:
            continue
        counts[key] += 1
        slug = key[0].split()[0].split("/")[-1].lower().strip(".,")
        name = f"{slug}-{r['label']}-{counts[key]}.png"
        (folder / name).write_bytes(r["explanation"].overlay_png)
        chosen.append({"file": name, **r})
    lines = ["# Attribution of the example overlays", "",
             "Each picture is a chest X-ray from a public collection, centre-cropped, resized to the model's input "
             "size and overlaid with kdray's Grad-CAM heat map of the predicted class (a modified work). Only "
             "images under CC BY 3.0 or CC BY 4.0 are used; the licence is per image, from the dataset manifest.", "",
             "| file | true class | predicted | border share | source collection (snapshot) | file in the source | licence |",
             "|---|---|---|---|---|---|---|"]
    for c in chosen:
        lines.append(f"| {c['file']} | {c['label']} | {c['predicted']} | {c['border_share']:.2f} | "
                     f"{c['source_repo']} | {c['source_path']} | {c['license']} |")
    (folder / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the KD student's export folder (with model.weights.pt)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cxr"))
    p.add_argument("--split", default="val")
    p.add_argument("--border", type=float, default=BORDER)
    p.add_argument("--examples", type=int, default=2, help="overlays per source and class (CC BY only)")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "explain.md"))
    a = p.parse_args()

    started = time.time()
    card = read_model_card(a.model)
    rows = read_manifest(a.data, a.split)
    print(f"explaining {len(rows)} {a.split} images with {card.name} ({card.model_name}, {card.image_size} px)")
    results = measure(a.model, a.data, rows, a.border)
    size = card.image_size
    area = float(border_mask(size, a.border).mean())
    per_source, per_class = tables(results, area)
    examples_dir = Path(a.output).with_suffix("")
    examples = write_examples(results, examples_dir, a.examples)
    columns = ["images", "accuracy", "border share, mean", "border share, median",
               f"maps mostly in the border (> {area:.2f})", "agrees with torch"]
    report = [
        f"# Grad-CAM shortcut check per source ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
        f"- machine: {machine()}", f"- CPU flags: {cpu_flags()}",
        f"- command: `python bench/explain.py {' '.join(sys.argv[1:])}`",
        f"- model: {card.name} ({card.model_name}, {size} px, served {card.served_artifact}); source checkpoint "
        f"`{card.source_checkpoint}`",
        f"- data: {a.data}, split {a.split} ({len(rows)} images); {time.time() - started:.0f} s",
        f"- border: the outer {a.border:.0%} of each side = {area:.2f} of the {size}² input; a map spread evenly "
        f"puts {area:.2f} of its mass there. Grad-CAM of the served prediction, at MobileNetV2's last feature "
        f"block ({size // 32}×{size // 32} cells, upsampled).", "",
        "## Per source", "", format_table(per_source, ["source", *columns]), "",
        "## Per source and true class", "", format_table(per_class, ["source", "class", *columns]), "",
        f"## Example overlays ({len(examples)}, CC BY only; attribution in "
        f"[{examples_dir.name}/ATTRIBUTION.md]({examples_dir.name}/ATTRIBUTION.md))", "",
        *[f"- [{e['file']}]({examples_dir.name}/{e['file']}): {short_source(e['source_repo'])}, true "
          f"{e['label']}, predicted {e['predicted']}, border share {e['border_share']:.2f}" for e in examples], "",
    ]
    Path(a.output).write_text("\n".join(report))
    print("\n".join(report[:12]))
    print(format_table(per_source, ["source", *columns]))
    print(f"wrote {a.output} and {len(examples)} overlays in {examples_dir}")


if __name__ == "__main__":
    main()
