"""Typed configuration: dataclass defaults < YAML file < ``--key value`` flags.

Keys are dotted paths into nested dataclasses (``--optim.lr 3e-4``). A leaf name that is
unique in the tree may be used alone (``--lr 3e-4``), and each config class may declare
``ALIASES`` such as ``{"data": "data.root"}``. Every job writes the config it resolved
next to its outputs (``args.yaml``, as timm does).

Everything is checked when the config is loaded, before a job starts anything: types (an enum
field is a ``Literal``), value ranges (a class's ``CHECKS``), unknown keys, flags without a
value, and the keys a job cannot run without (its ``REQUIRED``, checked by ``load_config``).
Every problem is one ``KdrayError`` line that names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml

from kdray import KdrayError

T = TypeVar("T")

# Enum-like fields: the stored values stay plain strings, so args.yaml round-trips.
ModelName = Literal["teacher", "student", "tiny_teacher", "tiny_student"]  # kdray.models.MODEL_NAMES
Optimizer = Literal["adamw", "sgd"]
UseGpu = Literal["auto", "true", "false"]  # YAML true/false (bools) are read as "true"/"false"
Backend = Literal["auto", "torch", "onnx-fp32", "onnx-int8"]  # kdray.predictor.BACKENDS
ExplainMode = Literal["none", "covid_suspect", "all"]  # kdray.explain.EXPLAIN_MODES
ScoringEngine = Literal["auto", "local", "ray"]  # kdray.scoring_engines.ENGINES


# ----------------------------------------------------------------------------- value checks


@dataclass(frozen=True)
class Check:
    """A value range for one field, declared in a config class's ``CHECKS`` (``{"lr": gt(0)}``).

    Calling it returns the problem (``"must be > 0, got -1.0"``) or None. ``text`` is shown by ``--help``.
    """

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value: Any) -> str | None:
        try:
            ok = bool(self.test(value))
        except TypeError:
            ok = False
        return None if ok else f"must be {self.text}, got {value!r}"


def gt(lo: float) -> Check:
    return Check(lambda v: v > lo, f"> {lo}")


def ge(lo: float) -> Check:
    return Check(lambda v: v >= lo, f">= {lo}")


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    """``lo <= v <= hi``; an open end excludes it, written as in interval notation: ``(0, 1]``."""
    def test(v: Any) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return Check(test, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def zero_or_ge(lo: float) -> Check:
    return Check(lambda v: v == 0 or v >= lo, f"0 or >= {lo}")


@dataclass
class DataConfig:
    root: str = ""  # ImageFolder tree (<root>/<split>/<class>/*.png) or manifest (.csv/.parquet); folder or s3://
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 64
    classes: list[str] | None = None  # default: the class folders / labels found in the data
    limit: int = 0  # use at most this many images per split (0 = all); for smoke runs

    CHECKS: typing.ClassVar[dict[str, Check]] = {"image_size": ge(8), "limit": ge(0)}


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

    CHECKS: typing.ClassVar[dict[str, Check]] = {
        "rotate_deg": between(0, 180), "translate": between(0, 1, hi_open=True), "scale_min": gt(0),
        "scale_max": gt(0), "brightness": between(0, 1), "contrast": between(0, 1)}


@dataclass
class ModelConfig:
    name: ModelName = "teacher"
    weights: str | None = None  # backbone weights: torchvision name ("DEFAULT"), local path or URI
    dropout: float = 0.3

    CHECKS: typing.ClassVar[dict[str, Check]] = {"dropout": between(0, 1, hi_open=True)}


@dataclass
class OptimConfig:
    optimizer: Optimizer = "adamw"
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

    CHECKS: typing.ClassVar[dict[str, Check]] = {
        "lr": gt(0), "weight_decay": ge(0), "epochs": ge(1), "batch_size": ge(1), "warmup_epochs": ge(0),
        "label_smoothing": between(0, 1, hi_open=True), "early_stop_patience": ge(0),
        "bn_recalibrate_batches": ge(0), "ema_decay": between(0, 1, hi_open=True)}


@dataclass
class KDConfig:
    alpha: float = 0.0  # weight of the KD term; 0 = plain cross-entropy (the no-KD baseline)
    temperature: float = 4.0
    cache: str | None = None  # URI of a logit cache built by jobs.build_cache
    views: int = 1  # teacher views per image (view 0 clean, 1.. seeded augmentations): the pipeline caches this
    # many, and training uses the first this many of the cache's views (0 = all of them)

    CHECKS: typing.ClassVar[dict[str, Check]] = {"alpha": between(0, 1), "temperature": gt(0), "views": ge(0)}


@dataclass
class RunConfig:
    output: str = "runs"  # folder or s3:// prefix; each run writes to <output>/<name>
    name: str | None = None  # default: derived from the model and a timestamp; reuse a name to resume
    num_workers: int = 0  # Ray Train workers (0 = one per CPU, up to 2 on a small box; GPUs when present)
    use_gpu: UseGpu = "auto"
    seed: int = 0
    # Worker-group restarts after a worker or its node dies: Ray Train starts the workers again from the run's
    # latest checkpoint (every epoch writes one), up to this many times per run. Ray 2.60's default, 0,
    # fails the whole run on the first dead worker; 3 rides out a lost node or two without looping forever
    # on a run that fails every time.
    max_failures: int = 3

    CHECKS: typing.ClassVar[dict[str, Check]] = {"num_workers": ge(0), "seed": ge(0), "max_failures": ge(0)}

    def __post_init__(self) -> None:
        if isinstance(self.use_gpu, bool):  # RunConfig(use_gpu=True) from code: stored as the string, as YAML is
            self.use_gpu = "true" if self.use_gpu else "false"


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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, Any]:
    """Field name → resolved type hint (ClassVars excluded)."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _show(value: Any) -> str:
    """A value for an error message, on one line."""
    if isinstance(value, dict):
        return f"a section {json.dumps(value, default=str)[:80]}"
    if isinstance(value, bool):
        return f"a bool ({str(value).lower()})"
    if value is None:
        return "nothing (null)"
    return repr(value)[:80]


def from_dict(cls: type[T], values: dict | None, where: str = "") -> T:
    """Build ``cls`` from a (possibly partial) nested dict: types and ranges are checked, unknown keys rejected.

    ``where`` is the dotted prefix of ``cls`` in the whole config (``"teacher.optim."``), for messages.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise KdrayError(f"config key {where.rstrip('.') or cls.__name__}: expected a section "
                         f"(keys: {', '.join(_fields(cls))}), got {_show(values)}")
    fields = _fields(cls)
    unknown = [str(k) for k in values if k not in fields]
    if unknown:
        keys = ", ".join(sorted(where + k for k in unknown))
        raise KdrayError(f"unknown config key{'s' if len(unknown) > 1 else ''} {keys}; "
                         f"known in {where.rstrip('.') or cls.__name__}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = fields[name]
        if dataclasses.is_dataclass(hint):
            # a partial section changes only the keys it names: the rest keep this class's default for the
            # field (PipelineConfig's run.output "" or teacher.optim, not RunConfig's or OptimConfig's own)
            default = _field_default(cls, name)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                value = _overlay(to_dict(default), value)
            kwargs[name] = value if isinstance(value, hint) else from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    cfg = cls(**kwargs)
    _check_ranges(cfg, where)
    return cfg


def _overlay(base: dict, values: dict) -> dict:
    """``values`` over ``base``, section by section; where either side is not a section, ``values`` wins (and
    :func:`from_dict` judges it)."""
    out = dict(base)
    for key, value in values.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _overlay(out[key], value) if both else value
    return out


def _field_default(cls: type, name: str) -> Any:
    """The default value of field ``name`` of dataclass ``cls`` (from its default_factory), or None."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


def _check_ranges(cfg: Any, where: str = "") -> None:
    for name, check in getattr(type(cfg), "CHECKS", {}).items():
        value = getattr(cfg, name)
        problem = None if value is None else check(value)
        if problem:
            raise KdrayError(f"config key {where}{name}: {problem}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in args:  # YAML use_gpu: true
            return str(value).lower()
        if isinstance(value, str):
            for choice in args:
                if isinstance(choice, str) and choice.lower() == value.strip().lower():
                    return choice
        elif value in args and not isinstance(value, bool):
            return value
        shown = repr(value) if isinstance(value, str) else _show(value)
        raise KdrayError(f"config key {key}: {shown} is not one of {', '.join(map(str, args))}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            raise KdrayError(f"config key {key}: expected a list (YAML list or a,b,c), got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif hint is str:
        if value is None:  # YAML "key:" with nothing after it
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (int, float, str)):
            return str(value)
    else:
        return value
    shown = repr(value) if isinstance(value, str) else _show(value)
    raise KdrayError(f"config key {key}: cannot read {shown} as {hint.__name__}")


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, hint in _fields(cls).items():
        if dataclasses.is_dataclass(hint):
            out += _leaf_paths(hint, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
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
    """Split ``argv`` into the ``--config`` file and a nested dict of ``--key value`` overrides.

    Every option takes a value (``--key value`` or ``--key=value``); a bool is ``--key true``.
    """
    config_file, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise KdrayError(f"unexpected argument {arg!r}: options are --key value")
        key, has_equals, value = arg[2:].partition("=")
        path = None if key == "config" else _resolve_key(cls, key.replace("-", "_"))
        if not has_equals:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise KdrayError(f"option --{key} needs a value")
            i += 1
            value = argv[i]
        i += 1
        if path is None:
            config_file = value
        else:
            _set_path(overrides, path, value)
    return config_file, overrides


def _merge(base: dict, extra: dict, where: str = "") -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        elif isinstance(v, dict) and out.get(k) is not None:  # e.g. YAML "data: 5", then --data.image_size 32
            raise KdrayError(f"config key {where}{k}: expected a section (key: value mapping), got {_show(out[k])}")
        else:
            out[k] = v
    return out


def _read_yaml(config_file: str) -> dict:
    try:
        with open(config_file) as fh:
            values = yaml.safe_load(fh)
    except FileNotFoundError:
        raise KdrayError(f"config file not found: {config_file}") from None
    except OSError as exc:
        raise KdrayError(f"config file {config_file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise KdrayError(f"config file {config_file} is not valid YAML: {problem}{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise KdrayError(f"config file {config_file} must hold a mapping at the top level, got {_show(values)}")
    return values


def _required(cls: type) -> dict[str, str]:
    """A class's ``REQUIRED``: dotted key → a short phrase for the message (a tuple of keys also works)."""
    required = getattr(cls, "REQUIRED", {})
    return dict(required) if isinstance(required, dict) else {key: "" for key in required}


def check_required(cfg: Any) -> None:
    """Raise ``--key is required (phrase)`` for the first ``REQUIRED`` key that is empty or None."""
    for key, phrase in _required(type(cfg)).items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None or value == "" or value == []:
            raise KdrayError(f"--{key} is required" + (f" ({phrase})" if phrase else ""))


def load_config(cls: type[T], argv: list[str] | None = None, job_defaults: dict | None = None) -> T:
    """Resolve ``cls`` from defaults < the job's own defaults < YAML file (``--config``) < command-line flags.

    ``--help`` (or ``-h``) prints every option with its default and exits. Every problem (unknown key, bad
    type or value, flag without a value, missing required key) raises one ``KdrayError`` line.
    """
    if any(arg in ("-h", "--help") for arg in argv or []):
        print(options_help(cls, job_defaults))
        raise SystemExit(0)
    config_file, overrides = parse_overrides(cls, list(argv or []))
    values = _read_yaml(config_file) if config_file is not None else {}
    cfg = from_dict(cls, _merge(_merge(job_defaults or {}, values), overrides))
    check_required(cfg)
    return cfg


def _constraint(cls: type, path: str) -> str:
    """What ``--help`` says about a leaf beyond its default: its choices or its range."""
    *parents, leaf = path.split(".")
    for part in parents:
        cls = _fields(cls)[part]
    hint = _fields(cls)[leaf]
    literal = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal]
    if literal:
        return " | ".join(map(str, typing.get_args(literal[0])))
    check = getattr(cls, "CHECKS", {}).get(leaf)
    return getattr(check, "text", "")


def options_help(cls: type, job_defaults: dict | None = None) -> str:
    """Every ``--key`` of ``cls`` with its default (after the job's own defaults), choices and range."""
    defaults = to_dict(from_dict(cls, job_defaults))
    required = _required(cls)
    lines = ["options (defaults < --config FILE.yaml < --key value):", "  --config FILE.yaml"]
    for path in _leaf_paths(cls):
        value = defaults
        for part in path.split("."):
            value = value[part]
        notes = [n for n in ("required" if path in required else "", _constraint(cls, path)) if n]
        lines.append(f"  --{path} {json.dumps(value)}" + (f"  ({'; '.join(notes)})" if notes else ""))
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
    CHECKS: typing.ClassVar[dict[str, Check]] = {"views": ge(1), "batch_size": ge(1)}
    REQUIRED: typing.ClassVar[dict[str, str]] = {"teacher": "a teacher checkpoint or run folder"}


@dataclass
class EvalJobConfig:
    model: str = ""  # checkpoint, run folder or exported model folder
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"
    output: str = ""  # default: <model>/eval-<split>
    backend: Backend = "auto"
    batch_size: int = 64
    name: str = ""  # a label for tables and plot titles

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root"}
    CHECKS: typing.ClassVar[dict[str, Check]] = {"batch_size": ge(1)}
    REQUIRED: typing.ClassVar[dict[str, str]] = {"model": "a checkpoint, run folder or exported model"}


@dataclass
class ScoreJobConfig:
    model: str = ""  # exported model folder (ONNX Runtime) or a checkpoint / run folder (torch)
    input: str = ""  # folder or s3:// prefix; every image below it is scored
    output: str = ""  # folder or s3:// prefix for predictions/, errors/ and summary.json
    backend: Backend = "auto"  # auto = the export's served artifact; torch = its source checkpoint
    batch_size: int = 32
    overwrite: bool = False  # true: delete a previous run's results in --output and start again
    shard_size: int = 0  # inputs per output file (0 = about 16 shards, 32 to 256 inputs each); a re-run after
    #                      a crash redoes only unfinished shards
    min_side: int = 32  # images with a shorter side are refused as too_small
    max_pixels: int = 64_000_000  # larger images are refused as too_large, from the header, before decoding
    max_bytes: int = 512 * 2**20  # larger files are refused as file_too_large before they are read
    max_decode_bytes: int = 2**30  # the decode budget: images whose decode would take more memory are too_large
    max_frames: int = 64  # DICOMs with more frames are refused (too_large); of the others the first frame is scored
    modalities: list[str] = field(default_factory=lambda: ["CR", "DX"])  # DICOM Modality allowed ([] = any)
    explain: ExplainMode = "none"  # Grad-CAM overlays under explanations/ for: none | covid_suspect | all rows
    engine: ScoringEngine = "auto"  # ray: Ray Data actors; local: threads of this process; auto: ray on a cluster
    allowed_roots: list[str] = field(default_factory=list)  # folders or s3:// prefixes inputs may also be read from;
    #                      by default only the input's own (a manifest's folder): rows elsewhere are outside_roots

    CHECKS: typing.ClassVar[dict[str, Check]] = {"batch_size": ge(1), "shard_size": ge(0), "min_side": ge(1),
                                                 "max_pixels": ge(1), "max_bytes": ge(1),
                                                 "max_decode_bytes": ge(1), "max_frames": ge(1)}
    REQUIRED: typing.ClassVar[dict[str, str]] = {
        "model": "an exported model folder, a checkpoint or a run folder",
        "input": "a folder or s3:// prefix of images", "output": "a folder or s3:// prefix for the results"}


@dataclass
class StageConfig:
    """The model and optimiser of one training stage of the pipeline."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    image_size: int = 0  # 0 = data.image_size; the teacher may run at another size than the student

    CHECKS: typing.ClassVar[dict[str, Check]] = {"image_size": zero_or_ge(8)}


@dataclass
class CalibrateConfig:
    """Temperature scaling and the COVID operating point, fitted on a held-out split after training."""

    enabled: bool = True
    split: str = "val"
    target_sensitivity: float = 0.95  # the covid threshold is the largest one that reaches this sensitivity

    CHECKS: typing.ClassVar[dict[str, Check]] = {"target_sensitivity": between(0, 1, lo_open=True)}


@dataclass
class CalibrateJobConfig:
    model: str = ""  # a training checkpoint or run folder; its meta.json receives T and the covid threshold
    data: DataConfig = field(default_factory=DataConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    ALIASES: typing.ClassVar[dict[str, str]] = {"data": "data.root"}
    REQUIRED: typing.ClassVar[dict[str, str]] = {"model": "a training checkpoint or run folder"}


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

    CHECKS: typing.ClassVar[dict[str, Check]] = {"train_per_class": ge(1), "val_per_class": ge(1),
                                                 "source_size": ge(8), "serve_port": between(0, 65535)}


def _kd_sweep_problem(entries: list[str]) -> str | None:
    """The ``CHECKS`` entry of ``kd_sweep``: every entry must parse as alpha/temperature/views."""
    for entry in entries:
        try:
            parse_kd_setting(entry, KDConfig())
        except KdrayError as exc:
            return str(exc).removeprefix("kd_sweep ")
    return None


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
    CHECKS: typing.ClassVar[dict[str, Callable[[Any], str | None]]] = {"kd_sweep": _kd_sweep_problem}

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
