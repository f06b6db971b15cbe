"""The plain server kdray Serve is measured against: what a user writes in about 30 lines, no Ray.

    KDRAY_ANCHOR_MODEL=/path/to/export uvicorn bench.serve_anchor:app --workers 2 --host 127.0.0.1 --port 8100

Same loader (``kdray.images.load_image``) and same ``Predictor`` (one inference thread per worker) as the
Serve app; POST the image as the raw body to ``/predict``.
"""

import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from kdray.images import ImageRefused, load_image
from kdray.predictor import load_predictor

predictor = load_predictor(os.environ["KDRAY_ANCHOR_MODEL"], threads=1)
app = FastAPI()


def classify(data: bytes) -> dict:
    probs = predictor.probabilities(load_image(data, predictor.image_size).pixels[None])[0]
    return {"label": predictor.classes[int(np.argmax(probs))],
            "probabilities": dict(zip(predictor.classes, map(float, probs)))}


@app.post("/predict")
async def predict(request: Request):
    try:
        return await run_in_threadpool(classify, await request.body())
    except ImageRefused as exc:
        return JSONResponse({"detail": str(exc), "reason": exc.reason}, status_code=400)
