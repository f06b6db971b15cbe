"""Typed contracts between stages: the model card, checkpoint meta and run summaries (pydantic).

Each is validated when it is written and when it is read. Unknown fields are refused and
required fields are required, so a card from another tool, a hand-edited file or an older
kdray fails with one clear line instead of a KeyError three modules later.

The model card (``metadata.json`` in an export folder) follows the MONAI bundle's
``metadata.json`` where its fields fit: ``network_data_format``, ``intended_use``,
``data_source``, ``eval_metrics`` and the versions of the software that wrote it. It carries
``schema_version``; a reader refuses any version other than :data:`MODEL_CARD_SCHEMA_VERSION`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdray import KdrayError
from kdray.pinning import plain_file_name

MODEL_CARD_SCHEMA_VERSION = 2  # 1: the untyped cards written before the schema existed
ArtifactKind = Literal["fp32", "int8", "torchscript"]
M = TypeVar("M", bound=BaseModel)
#: A file of an export, named as it sits in the folder: a card cannot point outside its export.
ExportFileName = Annotated[str, AfterValidator(plain_file_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


#: The networks kdray builds (kdray.models.build_model); config, checkpoints and model cards name one of these.
ModelName = Literal["teacher", "student", "tiny_teacher", "tiny_student"]


class Contract(BaseModel):
    """Base of every contract: unknown fields are an error, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def validation_message(exc: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one readable line: ``field.path: message; ...`` (no reprs of the input)."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse(model: type[M], data: Any, what: str) -> M:
    """``model`` validated from ``data``, or a one-line :class:`KdrayError` naming ``what``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KdrayError(f"{what}: invalid {model.__name__} ({validation_message(exc)})") from None


def dump(obj: BaseModel) -> dict:
    """JSON-ready dict of a contract, validated again on the way out."""
    return type(obj).model_validate(obj.model_dump()).model_dump(mode="json")


# ----------------------------------------------------------------------------- checkpoints and runs


class CheckpointMeta(Contract):
    """``meta.json`` of a training checkpoint folder (next to ``model.pt``)."""

    model_name: ModelName
    classes: list[str] = Field(min_length=2)
    image_size: int = Field(ge=8)
    dropout: float = 0.3
    epoch: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    kd: dict[str, Any] | None = None
    data_root: str | None = None
    ema_decay: float = 0.0
    training_data: dict[str, Any] | None = None
    # written by kdray.calibrate (torch logits of this checkpoint on a held-out split)
    temperature: float = Field(default=1.0, gt=0)
    covid_threshold: float | None = None
    calibration: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None


class ClassScores(Contract):
    precision: float | None  # None: never predicted
    recall: float | None  # None: absent from the labels
    f1: float | None
    support: int


class CovidScores(Contract):
    """The binary covid-vs-rest decision: argmax == covid, or P(covid) >= ``threshold`` when there is one."""

    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    threshold: float | None
    tp: int
    fp: int
    tn: int
    fn: int


class SourceScores(Contract):
    n: int
    accuracy: float
    macro_f1: float


class ClassificationMetrics(Contract):
    """What :func:`kdray.metrics.classification_metrics` computes for a model's probabilities on labelled images."""

    n: int
    accuracy: float
    macro_f1: float  # over the classes present in the labels or the predictions
    per_class: dict[str, ClassScores]
    classes: list[str]
    confusion_matrix: list[list[int]]  # rows = true, columns = predicted
    roc_auc_ovr: dict[str, float | None]  # None: the class is absent, or the only one
    macro_auc: float | None  # mean of the defined AUCs
    ece: float
    covid: CovidScores | None = None  # when a class is named covid
    per_source: dict[str, SourceScores] | None = None  # when the images' sources are known


class Evaluation(ClassificationMetrics):
    """A model's evaluation on a split: its metrics (calibrated probabilities) and how they were made; written
    to ``metrics.json`` by :func:`kdray.evaluate.evaluate_logits`."""

    model: str
    name: str
    data: str
    split: str
    image_size: int
    skipped_images: list[Any]
    eval_s: float
    eval_img_per_s: float
    backend: str
    temperature: float
    ece_uncalibrated: float  # before temperature scaling
    calibration: dict[str, Any] | None


class CalibrationReport(Contract):
    """Temperature scaling and the covid operating point fitted on one model's logits over a labelled split:
    in-sample, and 2-fold cross-fitted (fit on one half, measured on the other)."""

    temperature: float = Field(gt=0)
    covid_threshold: float | None  # None: no class named covid
    target_sensitivity: float
    n: int
    ece_before: float | None
    ece_after: float | None
    covid_at_threshold: dict[str, Any]
    cross_fitted: dict[str, float | None]
    split: str = ""  # where it was fitted (set by kdray.calibrate)
    data: str = ""


class ModelCost(Contract):
    """What a model costs: parameters (all, and of its backbones) and GFLOPs per image at ``image_size``."""

    params: int
    backbone_params: int
    gflops: float
    image_size: int


class RunSummary(Contract):
    """``result.json`` of a finished training run: what ``kdray.train.fit`` returns."""

    run_name: str
    run_uri: str
    best_checkpoint: str
    model_name: str
    classes: list[str]
    best_metrics: dict[str, Any] = Field(default_factory=dict)
    final_metrics: dict[str, Any] | None = None
    wall_s: float | None = None
    workers: int | None = None
    use_gpu: bool | None = None
    skipped_images: list[Any] = Field(default_factory=list)
    cost: ModelCost


class ScoreSummary(Contract):
    """``summary.json`` of a finished scoring run (written last: it marks the run finished), and what
    :func:`kdray.score.score_archive` returns."""

    model: str
    input: str
    output: str
    kind: Literal["folder", "manifest", "tar", "dicomweb"]
    backend: str
    engine: Literal["local", "ray"]
    images: int
    scored: int
    explained: int
    explain: str
    errors: int
    errors_by_reason: dict[str, int]
    hidden_skipped: int
    manifest_duplicates: int
    roots: list[str]
    shards: int
    shards_resumed: int
    images_this_run: int
    nodes: int
    wall_s: float
    img_per_s: float
    steady_img_per_s: float | None


# ----------------------------------------------------------------------------- the model card


class TensorSpec(Contract):
    type: Literal["image", "probabilities", "logits"]
    format: str
    dtype: Literal["uint8", "float32"]
    shape: list[int | str]
    name: str
    note: str = ""


class NetworkDataFormat(Contract):
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


class Artifact(Contract):
    file: ExportFileName
    format: Literal["onnx", "torchscript"]
    precision: Literal["fp32", "int8"]
    sha256: Sha256
    size_mb: float
    validated: bool
    quantization: dict[str, Any] | None = None


class TorchWeights(Contract):
    """The student's torch weights in an export (a ``state_dict``), for Grad-CAM explanations (kdray.explain).
    Predictions come from the served artifact; these weights only explain them."""

    file: ExportFileName
    sha256: Sha256
    size_mb: float
    model_name: str
    purpose: str = "explanations (Grad-CAM); predictions come from the served artifact"


class Parity(Contract):
    """One artifact against the fp32 torch model on the parity images."""

    n: int
    top1_agreement: float
    max_abs_prob_diff: float
    accuracy: float | None = None
    covid_suspect_agreement: float | None = None  # at the artifact's own temperature and threshold


class OperatingPoint(Contract):
    """Temperature and covid threshold fitted on one artifact's own logits over a labelled split."""

    artifact: ArtifactKind
    split: str
    n: int
    temperature: float = Field(gt=0)
    covid_threshold: float | None
    target_sensitivity: float
    ece_before: float | None = None
    ece_after: float | None = None
    covid_at_threshold: dict[str, Any] = Field(default_factory=dict)
    cross_fitted: dict[str, Any] = Field(default_factory=dict)


class Versions(Contract):
    kdray: str
    torch: str
    onnx: str
    onnxruntime: str
    numpy: str
    onnx_opset: int


class ModelCard(Contract):
    """``metadata.json`` of an export folder. Written last, it is also the folder's commit marker."""

    schema_version: int
    name: str
    version: str
    description: str
    created: str
    model_name: str
    classes: list[str] = Field(min_length=2)
    image_size: int = Field(ge=8)
    network_data_format: NetworkDataFormat
    preprocessing: dict[str, Any]
    artifacts: dict[ArtifactKind, Artifact] = Field(min_length=1)
    served_artifact: ArtifactKind
    parity: dict[ArtifactKind, Parity]
    parity_bars: dict[str, float]
    parity_reference: dict[str, Any] | None = None
    operating_points: dict[ArtifactKind, OperatingPoint]
    eval_metrics: dict[str, Any] = Field(default_factory=dict)  # the checkpoint's val metrics in training
    validation: dict[str, Any] | None = None
    data_source: dict[str, Any] | None = None
    source_checkpoint: str
    # sha256 of the source checkpoint's weights (model.pt); absent in exports written before it was recorded
    source_checkpoint_sha256: Sha256 | None = None
    torch_weights: TorchWeights | None = None  # absent in exports written before explanations existed
    intended_use: str
    known_biases: str
    versions: Versions

    @model_validator(mode="before")
    @classmethod
    def _version_first(cls, data: Any) -> Any:
        if isinstance(data, dict):
            version = data.get("schema_version")
            if version is None:
                raise ValueError(f"no schema_version: a card from kdray before schema {MODEL_CARD_SCHEMA_VERSION} "
                                 "or from another tool; export the model again with this kdray")
            if version != MODEL_CARD_SCHEMA_VERSION:
                raise ValueError(f"schema_version {version} is not supported (this kdray reads "
                                 f"{MODEL_CARD_SCHEMA_VERSION}); export the model again with this kdray")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if self.served_artifact not in self.artifacts:
            raise ValueError(f"served_artifact {self.served_artifact!r} is not among the artifacts")
        if not self.artifacts[self.served_artifact].validated:
            raise ValueError(f"served_artifact {self.served_artifact!r} did not pass its parity check")
        for kind in self.operating_points:
            if kind not in self.artifacts:
                raise ValueError(f"operating point for {kind!r}, which is not among the artifacts")
        if len(self.network_data_format.outputs) != 1:
            raise ValueError("network_data_format must name exactly one output")
        return self

    def operating_point(self, kind: str) -> OperatingPoint | None:
        return self.operating_points.get(kind)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------- the pipeline's summary


class KDSweepEntry(Contract):
    """One distilled student of the pipeline's KD sweep (``kd_sweep``; one entry without a sweep)."""

    label: str  # student_kd_a<alpha>-t<T>-k<views>
    model: str  # its name in the summary table: student_kd for the selected one, else the label
    alpha: float
    temperature: float
    views: int
    val_macro_f1: float | None
    selected: bool


class TrainedRun(Contract):
    run: str
    best_checkpoint: str
    train_s: float | None


class SummaryRow(Contract):
    """One model in the pipeline's summary table: accuracy, calibration, cost and speed on this machine."""

    model: str
    accuracy: float
    macro_f1: float
    covid_sensitivity: float | None
    covid_specificity: float | None
    covid_threshold: float | None
    macro_auc: float | None
    ece_before_ts: float | None
    ece: float | None
    per_source_accuracy: dict[str, float]
    image_size: int
    params_M: float
    gflops: float
    img_per_s: float
    runtime: str
    train_s: float | None
    kd: str | None = None  # the selected KD setting, for the distilled students


class ServeReply(Contract):
    """The one real HTTP request the pipeline sends to the deployed student."""

    url: str
    image: str
    true_label: str
    response: dict[str, Any]


class PipelineSummary(Contract):
    """What :func:`kdray.pipeline.run_pipeline` returns and writes to ``<output>/summary.json``."""

    data: str
    output: str
    logit_cache: str
    logit_cache_reused: bool
    runs: dict[str, TrainedRun]
    kd_sweep: list[KDSweepEntry]
    table: list[SummaryRow]
    export: ModelCard | None
    serve_reply: ServeReply | None
    score: ScoreSummary | None
    wall_s: float = 0.0
