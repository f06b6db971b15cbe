"""The second anchor for bench/serve.py: LitServe (a side install, not a project dependency), 2 workers.

    pip install --no-deps --target /tmp/litserve-side litserve pyzmq
    KDRAY_ANCHOR_MODEL=/path/to/export PYTHONPATH=/tmp/litserve-side python bench/serve_litserve.py PORT

Same loader (``kdray.images.load_image``) and same ``Predictor`` (one inference thread per worker) as the Serve
app and the uvicorn anchor. LitServe decodes JSON or forms only: POST the image as multipart field ``file``.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litserve as ls  # noqa: E402
import numpy as np  # noqa: E402

from kdray.images import load_image  # noqa: E402
from kdray.predictor import load_predictor  # noqa: E402


class CxrAPI(ls.LitAPI):
    def setup(self, device):
        self.predictor = load_predictor(os.environ["KDRAY_ANCHOR_MODEL"], threads=1)

    def decode_request(self, request):
        return request["file"].file.read()

    def predict(self, data: bytes) -> dict:
        predictor = self.predictor
        probs = predictor.probabilities(load_image(data, predictor.image_size).pixels[None])[0]
        return {"label": predictor.classes[int(np.argmax(probs))],
                "probabilities": dict(zip(predictor.classes, map(float, probs)))}

    def encode_response(self, output: dict) -> dict:
        return output


if __name__ == "__main__":
    ls.LitServer(CxrAPI(), accelerator="cpu", workers_per_device=2, timeout=30).run(
        host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False, log_level="warning")
