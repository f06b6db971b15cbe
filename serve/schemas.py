"""The serving API's response bodies (pydantic): what /predict, /healthz and a refusal return."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ExplanationOut(BaseModel):
    explained_class: str = Field(description="the class the heat map explains: this prediction's label")
    torch_class: str = Field(description="the top class of the torch weights the heat map is computed on")
    agrees: bool = Field(description="explained_class == torch_class (false: the served artifact and the torch "
                                     "weights disagree on this image; the map still explains explained_class)")
    method: str
    layer: str
    size: int = Field(description="side of the heat map and the overlay: the model's input size")
    overlay_png: str = Field(description="base64 PNG: the Grad-CAM heat map over the image the model saw")
    image_png: str | None = Field(None, description="base64 PNG: the image the model saw (grey, size × size), "
                                                    "without the heat map")


class Prediction(BaseModel):
    label: str = Field(description="most probable class")
    probabilities: dict[str, float] = Field(description="class → probability (sums to 1)")
    covid_suspect: bool | None = Field(description="P(covid) >= the model's stored threshold; "
                                                    "null when the model has no threshold")
    model_id: str = Field(description="name:version@sha256:<12 hex of metadata.json>#<artifact>: what answered, "
                                      "never where it is stored")
    backend: str
    explanation: ExplanationOut | None = Field(None, description="with ?explain=true only")


class ModelCardOut(BaseModel):
    """What ``GET /model`` tells a person about the model answering: the essentials of its card."""

    name: str
    version: str
    model_id: str
    backend: str
    classes: list[str]
    image_size: int
    covid_threshold: float | None = Field(description="covid_suspect is P(covid) >= this; null: no threshold")
    target_sensitivity: float | None = Field(description="the sensitivity to covid the threshold was fitted for")
    threshold_fitted_on: str | None = Field(description="the labelled split it was fitted on, and its size")
    intended_use: str
    known_biases: str


class Health(BaseModel):
    status: str
    model_id: str
    backend: str
    classes: list[str]
    image_size: int
    threads: int
    batching: bool = Field(description="images grouped into batches (on a GPU), else one image per call")
    batches: int = Field(description="batches this replica has run")
    batched_images: int = Field(description="images this replica has classified")
    max_batch_size_seen: int = Field(description="largest batch this replica has run")
    explained: int = Field(description="images this replica has explained (Grad-CAM)")
    explain_refused: int = Field(description="explanation requests refused 503 (too many in flight)")


class Refusal(BaseModel):
    detail: str
    reason: str = Field(description="stable reason code (too_small, too_large, not_an_image, unsupported_dicom, "
                                    "body_too_large, unsupported_media_type, ...)")
