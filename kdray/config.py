"""Typed configuration of every job and its parts: frozen pydantic dataclasses.

A field carries its type (an enum is a ``Literal``), its range (``Field(ge=...)``) and its description; pydantic
checks them when a config is built, ``dataclasses.replace`` checks again, and ``--help`` is written from them.
A job's class may name ``ALIASES`` (short flags), ``REQUIRED`` keys (with what they are, for the message) and a
``POSITIONAL`` field. :func:`load_config` reads a class from defaults < job defaults < YAML < flags, and
:func:`dump_yaml` writes what a job resolved (``args.yaml``): both in :mod:`kdray.config_cli`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

from kdray import KdrayError
from kdray.config_cli import dump_yaml, from_dict, load_config, to_dict  # noqa: F401 - the jobs' one import

#: Every config class: unknown keys are errors; a YAML number may stand for a string (``name: 7``).
CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True, defer_build=True)


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic alone would read YAML ``epochs: true`` as 1
        raise ValueError("a bool is not a number")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
ModelName = Literal["teacher", "student", "tiny_teacher", "tiny_student"]  # kdray.models.MODEL_NAMES
Optimizer = Literal["adamw", "sgd"]
UseGpu = Literal["auto"] | bool
Backend = Literal["auto", "torch", "onnx-fp32", "onnx-int8"]  # kdray.predictor.BACKENDS
ExplainMode = Literal["none", "covid_suspect", "all"]  # kdray.explain.EXPLAIN_MODES
ScoringEngine = Literal["auto", "local", "ray"]  # kdray.scoring_engines.ENGINES


@dataclass(frozen=True, config=CONFIG)
class ImageLimits:
    """What :func:`kdray.images.load_image` accepts; the defaults are scoring's (``kdray.images.DEFAULT_LIMITS``).
    The decode budget is the memory one decode may take at its peak, estimated from the headers (the file's and,
    for compressed DICOM, its pixel stream's) before any decoder runs."""

    min_side: Int = Field(32, ge=1, description="images with a shorter side are refused as too_small")
    max_pixels: Int = Field(64_000_000, ge=1, description="more pixels (from the header) = too_large; 8000 x 8000")
    max_bytes: Int = Field(512 * 2**20, ge=1, description="larger files are refused as file_too_large, unread")
    modalities: Annotated[tuple[str, ...] | None, AfterValidator(lambda v: v or None)] = Field(
        ("CR", "DX"), description="DICOM Modality allowed (empty or none = any)")
    max_decode_bytes: Int = Field(2**30, ge=1, description="the decode budget: a costlier decode is too_large")
    max_frames: Int = Field(64, ge=1, description="DICOMs with more frames are too_large; else the first is read")


@dataclass(frozen=True, config=CONFIG)
class DataConfig:
    root: str = Field("", description="ImageFolder tree (<root>/<split>/<class>/*.png) or manifest (.csv/.parquet); "
                                      "folder or s3://")
    train_split: str = "train"
    val_split: str = "val"
    image_size: Int = Field(64, ge=8)
    classes: list[str] | None = Field(None, description="default: the class folders / labels found in the data")
    limit: Int = Field(0, ge=0, description="at most this many images per split (0 = all); for smoke runs")


@dataclass(frozen=True, config=CONFIG)
class AugmentConfig:
    """On-the-fly augmentation for radiographs (see docs/recipe.md for the reasoning)."""

    enabled: bool = True
    rotate_deg: Float = Field(7.0, ge=0, le=180, description="patient positioning varies by a few degrees")
    translate: Float = Field(0.06, ge=0, lt=1, description="fraction of the side")
    scale_min: Float = Field(0.9, gt=0)
    scale_max: Float = Field(1.1, gt=0)
    brightness: Float = Field(0.1, ge=0, le=1, description="exposure differs between machines")
    contrast: Float = Field(0.2, ge=0, le=1)
    hflip: bool = Field(False, description="off: the heart is on the left; a flip makes impossible anatomy")


@dataclass(frozen=True, config=CONFIG)
class ModelConfig:
    name: ModelName = "teacher"
    weights: str | None = Field(None, description="backbone weights: torchvision name (DEFAULT), local path or URI")
    dropout: Float = Field(0.3, ge=0, lt=1)


@dataclass(frozen=True, config=CONFIG)
class OptimConfig:
    optimizer: Optimizer = "adamw"
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(1e-4, ge=0)
    epochs: Int = Field(3, ge=1)
    batch_size: Int = Field(32, ge=1, description="per worker")
    warmup_epochs: Float = Field(0.0, ge=0)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    class_balance: bool = Field(False, description="weight the loss by inverse class frequency")
    early_stop_patience: Int = Field(0, ge=0, description="epochs without val macro-F1 gain before stopping; 0 = never")
    bn_recalibrate_batches: Int = Field(8, ge=0, description="before each validation, re-estimate BatchNorm statistics "
                                        "on this many clean training batches (precise BN); 0 = the running averages")
    ema_decay: Float = Field(0.0, ge=0, lt=1, description="> 0: validate and checkpoint an EMA of the weights")


@dataclass(frozen=True, config=CONFIG)
class KDConfig:
    alpha: Float = Field(0.0, ge=0, le=1, description="weight of the KD term; 0 = plain cross-entropy (no-KD baseline)")
    temperature: Float = Field(4.0, gt=0)
    cache: str | None = Field(None, description="URI of a logit cache built by jobs.build_cache")
    views: Int = Field(1, ge=0, description="teacher views per image (view 0 clean, 1.. seeded augmentations): the "
                       "pipeline caches this many; training uses the cache's first this many (0 = all)")


@dataclass(frozen=True, config=CONFIG)
class RunConfig:
    output: str = Field("runs", description="folder or s3:// prefix; each run writes to <output>/<name>")
    name: str | None = Field(None, description="default: the model and a timestamp; reuse a name to resume")
    num_workers: Int = Field(0, ge=0, description="Ray Train workers (0 = one per CPU, up to 2 on a small box; "
                             "GPUs when present)")
    use_gpu: UseGpu = Field("auto", description="auto = when the cluster has GPUs")
    seed: Int = Field(0, ge=0)
    # Ray 2.60's default, 0, fails a whole run on its first dead worker; 3 rides out a lost node or two
    # without looping forever on a run that fails every time.
    max_failures: Int = Field(3, ge=0, description="worker-group restarts from the run's latest checkpoint after "
                              "a worker or its node dies")


@dataclass(frozen=True, config=CONFIG)
class TrainJobConfig:
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    ALIASES: ClassVar[dict[str, str]] = {"data": "data.root", "output": "run.output", "name": "run.name"}


@dataclass(frozen=True, config=CONFIG)
class CacheJobConfig:
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="for views 1..K-1")
    teacher: str = Field("", description="teacher checkpoint or run folder")
    views: Int = Field(1, ge=1, description="1 = one clean view per image; K > 1 adds K-1 seeded augmented views")
    output: str = Field("runs", description="the cache goes to <output>/logit_cache/<fingerprint>/")
    batch_size: Int = Field(32, ge=1)

    ALIASES: ClassVar[dict[str, str]] = {"data": "data.root", "model": "teacher"}
    REQUIRED: ClassVar[dict[str, str]] = {"teacher": "a teacher checkpoint or run folder"}


@dataclass(frozen=True, config=CONFIG)
class EvalJobConfig:
    model: str = Field("", description="checkpoint, run folder or exported model folder")
    data: DataConfig = Field(default_factory=DataConfig)
    split: str = "val"
    output: str = Field("", description="default: <model>/eval-<split>")
    backend: Backend = "auto"
    batch_size: Int = Field(64, ge=1)
    name: str = Field("", description="a label for tables and plot titles")

    ALIASES: ClassVar[dict[str, str]] = {"data": "data.root"}
    REQUIRED: ClassVar[dict[str, str]] = {"model": "a checkpoint, run folder or exported model"}


@dataclass(frozen=True, config=CONFIG)
class ScoreJobConfig:
    model: str = Field("", description="exported model folder (ONNX Runtime) or a checkpoint / run folder (torch)")
    input: str = Field("", description="folder or s3:// prefix; every image below it is scored")
    output: str = Field("", description="folder or s3:// prefix for predictions/, errors/ and summary.json")
    limits: ImageLimits = Field(default_factory=ImageLimits, description="what an input may be and cost")
    backend: Backend = Field("auto", description="auto = the export's served artifact; torch = its checkpoint")
    batch_size: Int = Field(32, ge=1)
    overwrite: bool = Field(False, description="true: delete a previous run's results in --output, start again")
    shard_size: Int = Field(0, ge=0, description="inputs per output file (0 = about 16 shards, 32 to 256 inputs "
                            "each); a re-run after a crash redoes only unfinished shards")
    explain: ExplainMode = Field("none", description="Grad-CAM overlays under explanations/ for these rows")
    dicom_results: bool = Field(False, description="DICOM inputs also get their result as DICOM under dicom/: an "
                                "SR per row (and, with --explain, the overlay as Secondary Capture)")
    dicom_store: str = Field("", description="a DICOMweb root (dicomweb+http://host:port/dicom-web) where those "
                             "DICOM results are also stored by STOW-RS; implies --dicom_results")
    engine: ScoringEngine = Field("auto", description="ray: Ray Data actors; local: threads of this process; "
                                  "auto: ray on a cluster")
    allowed_roots: list[str] = Field(default_factory=list, description="folders or s3:// prefixes inputs may also "
                                     "be read from (default: the input's own; rows elsewhere are outside_roots)")
    report: bool = Field(True, description="report.html next to summary.json: counts, refusals, a P(covid) "
                         "histogram, a contact sheet of explained suspects")

    ALIASES: ClassVar[dict[str, str]] = {k: f"limits.{k}" for k in (
        "min_side", "max_pixels", "max_bytes", "max_decode_bytes", "max_frames", "modalities")}
    REQUIRED: ClassVar[dict[str, str]] = {
        "model": "an exported model folder, a checkpoint or a run folder",
        "input": "a folder or s3:// prefix of images", "output": "a folder or s3:// prefix for the results"}


@dataclass(frozen=True, config=CONFIG)
class ExportJobConfig:
    """``python -m jobs.export``: which checkpoint, which data for calibration/parity, where to write."""

    model: str = Field("", description="checkpoint folder or finished run folder (local or s3://)")
    data: str = Field("", description="data root (ImageFolder tree or manifest) for calibration and parity images")
    output: str = Field("", description="export folder (local or s3://)")
    train_split: str = Field("train", description="calibration images come from here")
    val_split: str = Field("val", description="parity images come from here")
    calibration: Int = Field(128, ge=1, description="number of calibration images for int8")
    parity: Int = Field(0, ge=0, description="val images for parity and the operating point (0 = all of val)")
    target_sensitivity: Float = Field(0.95, gt=0, le=1, description="the covid threshold is the largest that "
                                      "reaches this on val")
    int8: bool = True
    torchscript: bool = False
    strict: bool = Field(True, description="false: an int8/TorchScript artifact below its bar is kept as "
                         "validated=false, no error")
    name: str = Field("", description="model-card name (default: kdray-<model_name>)")
    version: str = Field("", description="model-card version (default: the kdray version)")

    REQUIRED: ClassVar[dict[str, str]] = {"model": "a training checkpoint or run folder",
                                          "data": "the data root, for calibration and parity images",
                                          "output": "the export folder"}


@dataclass(frozen=True, config=CONFIG)
class PredictJobConfig:
    """``kdray predict``: classify image files with an exported student, without Ray."""

    images: list[str] = Field(default_factory=list, description="image files (local paths or s3:// URIs)")
    model: str = Field("", description="export folder (jobs.export) or a checkpoint")
    backend: Backend = "auto"
    threads: Int | None = Field(None, ge=1, description="inference threads (default: all available CPUs)")

    POSITIONAL: ClassVar[str] = "images"
    REQUIRED: ClassVar[dict[str, str]] = {"images": "image files", "model": "an export folder or a checkpoint"}


@dataclass(frozen=True, config=CONFIG)
class ServeJobConfig:
    """``jobs.serve``: serve an export on this machine (a local Ray on 127.0.0.1, HAProxy in front) until stopped."""

    model: str = Field("", description="export folder (jobs.export), its pinned reference, or a checkpoint")
    port: Int = Field(8000, ge=1, le=65535, description="the HTTP port on 127.0.0.1 (HAProxy, every replica behind it)")
    backend: Backend = "auto"
    replicas: Int | None = Field(None, ge=1, description="a fixed replica count (default: autoscaling)")
    auth_tokens_file: str = Field("", description="bearer tokens, one a line (default: authentication off)")

    REQUIRED: ClassVar[dict[str, str]] = {"model": "an export folder or a checkpoint"}


@dataclass(frozen=True, config=CONFIG)
class ExplainJobConfig:
    """``kdray explain``: Grad-CAM overlay PNGs of the served model's predictions, without Ray."""

    images: list[str] = Field(default_factory=list, description="image files (local paths or s3:// URIs)")
    model: str = Field("", description="export folder (jobs.export) or a training checkpoint")
    output: str = Field("", description="folder for the overlay PNGs (local or s3://)")
    backend: Backend = Field("auto", description="the model whose predictions are explained")
    threads: Int | None = Field(None, ge=1, description="CPU threads (default: all available)")

    POSITIONAL: ClassVar[str] = "images"
    REQUIRED: ClassVar[dict[str, str]] = {"images": "image files", "model": "an export folder or a checkpoint",
                                          "output": "a folder for the overlays"}


@dataclass(frozen=True, config=CONFIG)
class MakeDataJobConfig:
    """``kdray make-data``: the synthetic 3-class ImageFolder set (train/ and val/)."""

    output: str = Field("", description="folder or s3://bucket/prefix")
    train_per_class: Int = Field(60, ge=1)
    val_per_class: Int = Field(20, ge=1)
    size: Int = Field(128, ge=8, description="image side in pixels")
    seed: Int = Field(0, ge=0)

    POSITIONAL: ClassVar[str] = "output"
    REQUIRED: ClassVar[dict[str, str]] = {"output": "a folder or s3:// prefix"}


def _zero_or_at_least(value: int, low: int) -> int:
    if value and value < low:
        raise ValueError(f"must be 0 or >= {low}")
    return value


@dataclass(frozen=True, config=CONFIG)
class StageConfig:
    """The model and optimiser of one training stage of the pipeline."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    image_size: Annotated[Int, AfterValidator(lambda v: _zero_or_at_least(v, 8))] = Field(
        0, description="0 = data.image_size, else >= 8; the teacher may run at another size than the student")


@dataclass(frozen=True, config=CONFIG)
class CalibrateConfig:
    """Temperature scaling and the COVID operating point, fitted on a held-out split after training."""

    enabled: bool = True
    split: str = "val"
    target_sensitivity: Float = Field(0.95, gt=0, le=1, description="the covid threshold is the largest one that "
                                      "reaches this sensitivity")


@dataclass(frozen=True, config=CONFIG)
class CalibrateJobConfig:
    model: str = Field("", description="a training checkpoint or run folder; its meta.json gets T and the threshold")
    data: DataConfig = Field(default_factory=DataConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)

    ALIASES: ClassVar[dict[str, str]] = {"data": "data.root"}
    REQUIRED: ClassVar[dict[str, str]] = {"model": "a training checkpoint or run folder"}


@dataclass(frozen=True, config=CONFIG)
class DemoConfig:
    """What the pipeline does around training: the generated data set, export, serving and scoring."""

    train_per_class: Int = Field(60, ge=1, description="generated images per class when --data is not given")
    val_per_class: Int = Field(20, ge=1)
    source_size: Int = Field(128, ge=8, description="side of the generated PNGs")
    export: bool = True
    serve: bool = True
    score: bool = True
    serve_port: Int = Field(0, ge=0, le=65535, description="0 = a free port on 127.0.0.1")
    s3_dir: str = Field(".kdray/s3", description="where the embedded local S3 keeps its data (outlives the run)")


def parse_kd_setting(entry: str, base: KDConfig) -> KDConfig:
    """ "0.5/4/4" → KDConfig(alpha=0.5, temperature=4.0, views=4), other fields from ``base``."""
    parts = str(entry).split("/")
    try:
        if len(parts) != 3:
            raise ValueError
        alpha, temperature, views = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise KdrayError(f"kd_sweep entry {entry!r}: expected alpha/temperature/views, e.g. 0.5/4/4") from None
    if not (0 < alpha <= 1 and temperature > 0 and views >= 1):
        raise KdrayError(f"kd_sweep entry {entry!r}: need 0 < alpha <= 1, temperature > 0 and views >= 1")
    return dataclasses.replace(base, alpha=alpha, temperature=temperature, views=views)


def _kd_setting(entry: str) -> str:
    """A ``kd_sweep`` entry, checked when the config is loaded."""
    try:
        parse_kd_setting(entry, KDConfig())
    except KdrayError as exc:
        raise ValueError(str(exc).partition(": ")[2]) from None
    return entry


@dataclass(frozen=True, config=CONFIG)
class PipelineConfig:
    data: DataConfig = Field(default_factory=DataConfig, description="empty root = generated data in a local S3")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    teacher: StageConfig = Field(default_factory=lambda: StageConfig(
        ModelConfig(name="teacher"), OptimConfig(epochs=4, lr=1e-3, batch_size=16, warmup_epochs=0.5)))
    student: StageConfig = Field(default_factory=lambda: StageConfig(
        ModelConfig(name="student", dropout=0.2), OptimConfig(epochs=12, lr=5e-3, batch_size=16, warmup_epochs=0.5)))
    kd: KDConfig = Field(default_factory=lambda: KDConfig(alpha=0.5, temperature=4.0))
    run: RunConfig = Field(default_factory=lambda: RunConfig(output=""))
    demo: DemoConfig = Field(default_factory=DemoConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    teacher_run: str = Field("", description="an existing teacher run or checkpoint: skip teacher training, use it")
    kd_sweep: list[Annotated[str, AfterValidator(_kd_setting)]] = Field(
        default_factory=list, description="KD settings alpha/temperature/views to train instead of kd's; the best "
        "by val macro-F1 becomes student_kd (T and alpha chosen on val)")

    ALIASES: ClassVar[dict[str, str]] = {"data": "data.root", "output": "run.output", "image_size": "data.image_size"}

    def stage(self, which: str, alpha: float, name: str, cache: str | None = None,
              kd: KDConfig | None = None) -> TrainJobConfig:
        """The TrainJobConfig of one pipeline stage (``kd``: a setting from ``kd_settings``, else ``self.kd``)."""
        stage = getattr(self, which)
        kd = dataclasses.replace(kd or self.kd, alpha=alpha, cache=cache)
        run = dataclasses.replace(self.run, name=name)
        data = dataclasses.replace(self.data, image_size=stage.image_size or self.data.image_size)
        return TrainJobConfig(data, self.augment, stage.model, stage.optim, kd, run)

    def image_size(self, which: str) -> int:
        return getattr(self, which).image_size or self.data.image_size

    def kd_settings(self) -> list[KDConfig]:
        """The KD settings to train: ``kd`` itself, or one per ``kd_sweep`` entry ("alpha/temperature/views")."""
        return [parse_kd_setting(entry, self.kd) for entry in self.kd_sweep] or [self.kd]




@dataclass(frozen=True, config=CONFIG)
class ListenJobConfig:
    """``jobs.listen``: a DICOM C-STORE SCP (an "AI node"): CR/DX instances pushed to it are queued on disk before
    they are acknowledged, scored in batches, and each one's SR is C-STOREd to ``destination``. Grad-CAM overlays
    are not built here: SR only."""

    model: str = Field("", description="export folder (jobs.export), its pinned reference, or a checkpoint")
    ae_title: Annotated[str, AfterValidator(lambda v: ListenJobConfig.ae_title_of(v))] = Field(
        "KDRAY", description="this node's AE title (the called AE its senders use)")
    host: str = Field("127.0.0.1", min_length=1, description="the address to listen on (one interface; the "
                      "local PACS reaches this host at its KDRAY_PACS_PEER address)")
    port: Int = Field(11112, ge=0, le=65535, description="the DICOM port (0 = any free one, logged)")
    accepted_calling_aes: list[Annotated[str, AfterValidator(lambda v: ListenJobConfig.ae_title_of(v))]] = Field(
        default_factory=list, description="the calling AE titles whose associations are accepted; any other is "
        "refused (required: an AI node takes images from the senders it knows only)")
    destination: Annotated[str, AfterValidator(lambda v: ListenJobConfig.checked_destination(v))] = Field(
        "", description="where the SRs are C-STOREd: AET@host:port (the local PACS: KDRAYPACS@<its address>:4242)")
    queue_dir: str = Field(".kdray/listen", min_length=1, description="the on-disk queue: queue/ (received, not "
                           "yet stored), refused/ (with a .reason file each), incoming/ (being written)")
    batch_size: Int = Field(16, ge=1, le=256, description="instances scored together (one association per batch)")
    max_wait_s: Float = Field(2.0, gt=0, le=3600, description="a smaller batch is scored once its oldest "
                              "instance has waited this long")
    max_queued: Int = Field(10_000, ge=1, description="instances waiting in queue/; more are refused (out of "
                            "resources, 0xA700) until scoring catches up")
    max_associations: Int = Field(4, ge=1, le=64, description="simultaneous associations accepted; more are "
                                  "rejected (local limit exceeded)")
    max_pdu: Int = Field(116_794, ge=4096, le=4 * 2**20, description="the largest PDU a sender may send (bytes)")
    network_timeout_s: Float = Field(30.0, gt=0, le=3600, description="ACSE, DIMSE and network timeout")
    limits: ImageLimits = Field(default_factory=lambda: ImageLimits(max_bytes=128 * 2**20), description="what an "
                                "instance may be and cost (max_bytes: larger instances are refused as received)")
    backend: Backend = "auto"
    threads: Int | None = Field(None, ge=1, description="CPU threads for inference (default: all available)")

    REQUIRED: ClassVar[dict[str, str]] = {
        "model": "an export folder or a checkpoint",
        "accepted_calling_aes": "the AE titles allowed to send, e.g. --accepted_calling_aes KDRAYPACS",
        "destination": "where the SRs go, AET@host:port"}

    @staticmethod
    def ae_title_of(value: str) -> str:
        """An AE title: 1 to 16 printable ASCII characters, no backslash (PS3.5 6.2), spaces around insignificant."""
        title = value.strip(" ")
        if not 0 < len(title) <= 16 or not all(" " <= c <= "~" and c != "\\" for c in title):
            raise ValueError("an AE title is 1 to 16 printable ASCII characters without a backslash")
        return title

    @staticmethod
    def checked_destination(value: str) -> str:
        ListenJobConfig.destination_of(value)
        return value

    @staticmethod
    def destination_of(value: str) -> tuple[str, str, int] | None:
        """``AET@host:port`` as (AE title, host, port); None for "" (unset)."""
        if value == "":
            return None
        aet, at, address = value.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and host and port.isdigit() and 0 < int(port) <= 65535):
            raise ValueError("the destination is AET@host:port, e.g. KDRAYPACS@10.213.0.2:4242")
        return ListenJobConfig.ae_title_of(aet), host, int(port)
