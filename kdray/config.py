"""Typed configuration: dataclass defaults < YAML file < ``--key value`` flags.

Keys are dotted paths into nested dataclasses (``--optim.lr 3e-4``). A leaf name that is
unique in the tree may be used alone (``--lr 3e-4``), and each config class may declare
``ALIASES`` such as ``{"data": "data.root"}``. Every job writes the config it resolved
next to its outputs (``args.yaml``, as timm does).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from kdray import KdrayError

T = TypeVar("T")


@dataclass
class DataConfig:
    root: str = ""  # ImageFolder tree (<root>/<split>/<class>/*.png) or manifest (.csv/.parquet); folder or s3://
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 64
    classes: list[str] | None = None  # default: the class folders / labels found in the data
    limit: int = 0  # use at most this many images per split (0 = all); for smoke runs


@dataclass
class AugmentConfig:
    """On-the-fly augmentation for radiographs (see docs/recipe.md for the reasoning)."""

    enabled: bool = True
    rotate_deg: float = 7.0  # patient positioning varies by a few degrees
    translate: float = 0.06  # fraction of the side
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.1  # exposure differs between machines
    contrast: float = 0.2
    hflip: bool = False  # off: the heart is on the left; a flip makes anatomically impossible images


@dataclass
class ModelConfig:
    name: str = "teacher"  # teacher | student | tiny_teacher | tiny_student
    weights: str | None = None  # backbone weights: torchvision name ("DEFAULT"), local path or URI
    dropout: float = 0.3


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 3
    batch_size: int = 32  # per worker
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    class_balance: bool = False  # weight the loss by inverse class frequency
    early_stop_patience: int = 0  # epochs without val macro-F1 improvement before stopping (0 = never)
    bn_recalibrate_batches: int = 8  # before each validation, re-estimate BatchNorm statistics on this many
    #                                  clean training batches (precise BN); 0 = use the running averages
    ema_decay: float = 0.0  # > 0: validate and checkpoint an exponential moving average of the weights


@dataclass
class KDConfig:
    alpha: float = 0.0  # weight of the KD term; 0 = plain cross-entropy (the no-KD baseline)
    temperature: float = 4.0
    cache: str | None = None  # URI of a logit cache built by jobs.build_cache
    views: int = 1  # teacher views per image (view 0 clean, 1.. seeded augmentations): the pipeline caches this
    # many, and training uses the first this many of the cache's views (0 = all of them)


@dataclass
class RunConfig:
    output: str = "runs"  # folder or s3:// prefix; each run writes to <output>/<name>
    name: str | None = None  # default: derived from the model and a timestamp; reuse a name to resume
    num_workers: int = 0  # Ray Train workers (0 = one per CPU, up to 2 on a small box; GPUs when present)
    use_gpu: str = "auto"  # auto | true | false
    seed: int = 0


@dataclass
class TrainJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    run: RunConfig = field(default_factory=RunConfig)

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root", "output": "run.output", "name": "run.name"}


# ----------------------------------------------------------------------------- machinery


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], values: dict | None, where: str = "") -> T:
    """Build ``cls`` from a (possibly partial) nested dict, rejecting unknown keys."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise KdrayError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; known: {sorted(fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [_coerce(v, args[0], key) for v in value]
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError):
        raise KdrayError(f"config key {key}: cannot read {value!r} as {hint.__name__}") from None
    return value


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaf_paths(hint, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _resolve_key(cls: type, key: str) -> str:
    aliases = getattr(cls, "ALIASES", {})
    if key in aliases:
        return aliases[key]
    paths = _leaf_paths(cls)
    if key in paths:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KdrayError(f"--{key} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    raise KdrayError(f"unknown option --{key}; known: {', '.join('--' + p for p in paths)}")


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def parse_overrides(cls: type, argv: list[str]) -> tuple[str | None, dict]:
    """Split ``argv`` into the ``--config`` file and a nested dict of ``--key value`` overrides."""
    config_file, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise KdrayError(f"unexpected argument {arg!r}: options are --key value")
        key, has_equals, value = arg[2:].partition("=")
        if not has_equals:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                value = "true"  # a bare flag means true
            else:
                i += 1
                value = argv[i]
        i += 1
        if key == "config":
            config_file = value
            continue
        _set_path(overrides, _resolve_key(cls, key.replace("-", "_")), value)
    return config_file, overrides


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], argv: list[str] | None = None, job_defaults: dict | None = None) -> T:
    """Resolve ``cls`` from defaults < the job's own defaults < YAML file (``--config``) < command-line flags.

    ``--help`` (or ``-h``) prints every option with its default and exits.
    """
    if any(arg in ("-h", "--help") for arg in argv or []):
        print(options_help(cls, job_defaults))
        raise SystemExit(0)
    config_file, overrides = parse_overrides(cls, list(argv or []))
    values: dict = {}
    if config_file:
        try:
            with open(config_file) as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise KdrayError(f"config file not found: {config_file}") from None
        except yaml.YAMLError as exc:
            raise KdrayError(f"config file {config_file} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise KdrayError(f"config file {config_file} must hold a mapping at the top level")
    return from_dict(cls, _merge(_merge(job_defaults or {}, values), overrides))


def options_help(cls: type, job_defaults: dict | None = None) -> str:
    """Every ``--key`` of ``cls`` with its default (after the job's own defaults)."""
    defaults = to_dict(from_dict(cls, job_defaults))
    lines = ["options (defaults < --config FILE.yaml < --key value):", "  --config FILE.yaml"]
    for path in _leaf_paths(cls):
        value = defaults
        for part in path.split("."):
            value = value[part]
        lines.append(f"  --{path} {json.dumps(value)}")
    aliases = getattr(cls, "ALIASES", {})
    if aliases:
        lines.append("short names: " + ", ".join(f"--{a} = --{p}" for a, p in aliases.items()))
    return "\n".join(lines)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


@dataclass
class CacheJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # used for views 1..K-1
    teacher: str = ""  # teacher checkpoint or run folder
    views: int = 1  # 1 = one clean view per image; K > 1 adds K-1 seeded augmented views (consistent teaching)
    output: str = "runs"  # the cache goes to <output>/logit_cache/<fingerprint>/
    batch_size: int = 32

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root", "model": "teacher"}


@dataclass
class EvalJobConfig:
    model: str = ""  # checkpoint, run folder or exported model folder
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"
    output: str = ""  # default: <model>/eval-<split>
    backend: str = "auto"  # auto | torch | onnx-fp32 | onnx-int8
    batch_size: int = 64
    name: str = ""  # a label for tables and plot titles

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root"}


@dataclass
class ScoreJobConfig:
    model: str = ""  # exported model folder (ONNX Runtime) or a checkpoint / run folder (torch)
    input: str = ""  # folder or s3:// prefix; every image below it is scored
    output: str = ""  # folder or s3:// prefix for predictions/, errors/ and summary.json
    backend: str = "auto"  # auto = the fastest validated artifact: onnx-int8, then onnx-fp32, then torch
    batch_size: int = 32
    overwrite: bool = False


@dataclass
class StageConfig:
    """The model and optimiser of one training stage of the pipeline."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    image_size: int = 0  # 0 = data.image_size; the teacher may run at another size than the student


@dataclass
class CalibrateConfig:
    """Temperature scaling and the COVID operating point, fitted on a held-out split after training."""

    enabled: bool = True
    split: str = "val"
    target_sensitivity: float = 0.95  # the covid threshold is the largest one that reaches this sensitivity


@dataclass
class CalibrateJobConfig:
    model: str = ""  # a training checkpoint or run folder; its meta.json receives T and the covid threshold
    data: DataConfig = field(default_factory=DataConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root"}


@dataclass
class DemoConfig:
    """What the pipeline does around training: the generated data set, export, serving and scoring."""

    train_per_class: int = 60  # generated images per class when --data is not given
    val_per_class: int = 20
    source_size: int = 128  # side of the generated PNGs
    export: bool = True
    serve: bool = True
    score: bool = True
    serve_port: int = 0  # 0 = a free port on 127.0.0.1
    s3_dir: str = ".kdray/s3"  # where the embedded local S3 keeps its data, so outputs outlive the run


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)  # empty root = generated data in a local S3
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: StageConfig = field(default_factory=lambda: StageConfig(
        ModelConfig(name="teacher"), OptimConfig(epochs=4, lr=1e-3, batch_size=16, warmup_epochs=0.5)))
    student: StageConfig = field(default_factory=lambda: StageConfig(
        ModelConfig(name="student", dropout=0.2), OptimConfig(epochs=12, lr=5e-3, batch_size=16, warmup_epochs=0.5)))
    kd: KDConfig = field(default_factory=lambda: KDConfig(alpha=0.5, temperature=4.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(output=""))
    demo: DemoConfig = field(default_factory=DemoConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    teacher_run: str = ""  # an existing teacher run or checkpoint: skip teacher training and use it
    kd_sweep: list[str] = field(default_factory=list)  # KD settings "alpha/temperature/views" to train instead of
    # kd's; the one with the best val macro-F1 becomes student_kd (T and alpha chosen on val)

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root", "output": "run.output",
                                                 "image_size": "data.image_size"}

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
