"""The hand-written baseline for bench/pacs.py: what a user writes with dicomweb-client in 30 lines.

    python bench/pacs_plain.py MODEL DICOMWEB_URL USER PASSWORD   # prints one JSON line: images, seconds

Search (QIDO-RS, Modality=DX), then for each instance: retrieve (WADO-RS), decode with pydicom, scale to the
model's input, and predict in batches of 32 with kdray's own Predictor (the same model and runtime as
jobs.score: the comparison is about the path around the model, not the model)."""

import json
import sys
import time

import numpy as np
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from PIL import Image

from kdray.predictor import load_predictor


def main(model: str, url: str, user: str, password: str) -> None:
    started = time.perf_counter()
    predictor = load_predictor(model)
    client = DICOMwebClient(url=url, session=create_session_from_user_pass(user, password))
    found = client.search_for_instances(search_filters={"Modality": "DX"}, get_remaining=True)
    batch, scored = [], 0
    for item in found:
        uids = [item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")]
        ds = client.retrieve_instance(*uids)
        pixels = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels
        pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0) * 255
        side = predictor.image_size
        batch.append(np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize((side, side))))
        if len(batch) == 32:
            scored += len(predictor.probabilities(np.stack(batch)))
            batch = []
    if batch:
        scored += len(predictor.probabilities(np.stack(batch)))
    print(json.dumps({"images": scored, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
