"""kdray.config (the typed configs) and kdray.config_cli (flags, YAML, --help, args.yaml), without a job."""

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdray import KdrayError
from kdray.config import (
    CacheJobConfig, EvalJobConfig, ExplainJobConfig, ExportJobConfig, ImageLimits, MakeDataJobConfig,
    PipelineConfig, PredictJobConfig, RunConfig, ScoreJobConfig, TrainJobConfig, dump_yaml, load_config,
)

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCORE = ["--model", "m", "--input", "i", "--output", "o"]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_job_defaults_file_flags_precedence(tmp_path):
    cfg_file = write(tmp_path, "optim:\n  lr: 0.01\n  epochs: 7\nmodel:\n  name: student\n")
    job = {"optim": {"lr": 0.5, "weight_decay": 0.2}}
    cfg = load_config(TrainJobConfig, ["--config", cfg_file, "--optim.epochs", "2"], job)
    assert cfg.optim.lr == 0.01  # file beats job defaults
    assert cfg.optim.weight_decay == 0.2  # job defaults beat the class's
    assert cfg.optim.epochs == 2  # flag beats file
    assert cfg.model.name == "student" and cfg.optim.batch_size == 32  # file; class default


def test_short_names_aliases_and_flag_spellings():
    cfg = load_config(TrainJobConfig, ["--lr=3e-4", "--data", "s3://b/x", "--class_balance", "true",
                                       "--classes", "a,b", "--output", "out", "--warmup-epochs", "0.5"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.warmup_epochs == 0.5  # unique leaf; - for _
    assert (cfg.data.root, cfg.run.output) == ("s3://b/x", "out")  # ALIASES
    assert cfg.optim.class_balance is True and cfg.data.classes == ["a", "b"]
    assert load_config(TrainJobConfig, ["--model.weights", "none"]).model.weights is None
    assert load_config(CacheJobConfig, ["--model", "t"]).teacher == "t"  # the cache's --model is its teacher
    assert load_config(PipelineConfig, ["--image_size", "96"]).data.image_size == 96  # alias over two leaves
    with pytest.raises(KdrayError, match=r"^--epochs is ambiguous: use one of --teacher\.optim\.epochs, "):
        load_config(PipelineConfig, ["--epochs", "3"])


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("yes", True), ("on", True),
                                         ("false", False), ("0", False), ("no", False), ("False", False)])
def test_bools_read_every_usual_spelling(text, value):
    assert load_config(TrainJobConfig, ["--hflip", text]).augment.hflip is value


def test_lists_are_comma_separated_and_empty_means_none():
    cfg = load_config(ScoreJobConfig, [*SCORE, "--allowed_roots", "s3://a, /b", "--modalities", "CR,DX,MG"])
    assert cfg.allowed_roots == ["s3://a", "/b"] and cfg.limits.modalities == ("CR", "DX", "MG")
    assert load_config(ScoreJobConfig, [*SCORE, "--allowed_roots", ""]).allowed_roots == []
    assert load_config(ScoreJobConfig, [*SCORE, "--modalities", ""]).limits.modalities is None  # any modality
    sweep = load_config(PipelineConfig, ["--kd_sweep", "0.5/4/4,1/2/1"]).kd_sweep
    assert sweep == ["0.5/4/4", "1/2/1"]


def test_score_embeds_the_image_limits_with_the_scoring_defaults():
    from kdray.images import DEFAULT_LIMITS, SERVING_LIMITS
    from kdray.images import ImageLimits as FromImages

    assert FromImages is ImageLimits and ScoreJobConfig().limits == DEFAULT_LIMITS == ImageLimits()
    assert DEFAULT_LIMITS == ImageLimits(32, 64_000_000, 512 * 2**20, ("CR", "DX"), 2**30, 64)
    assert (SERVING_LIMITS.max_bytes, SERVING_LIMITS.max_decode_bytes, SERVING_LIMITS.max_frames) == \
        (64 * 2**20, 512 * 2**20, 16)
    cfg = load_config(ScoreJobConfig, [*SCORE, "--max_bytes", "5", "--min_side", "8", "--max_pixels", "9",
                                       "--max_decode_bytes", "10", "--limits.max_frames", "2"])
    assert cfg.limits == ImageLimits(8, 9, 5, ("CR", "DX"), 10, 2)
    assert ImageLimits(modalities=[]).modalities is None and ImageLimits(modalities=["CT"]).modalities == ("CT",)


def test_resolved_config_round_trips_through_args_yaml(tmp_path):
    for cls, argv in ((PipelineConfig, ["--data", "/d", "--student.optim.epochs", "5", "--use_gpu", "false",
                                        "--kd_sweep", "0.5/4/1"]),
                      (ScoreJobConfig, [*SCORE, "--modalities", "", "--allowed_roots", "a,b"]),
                      (TrainJobConfig, ["--classes", "x,y", "--name", "7"]),
                      (PredictJobConfig, ["a.png", "--model", "m", "--threads", "2"])):
        cfg = load_config(cls, argv)
        (tmp_path / "args.yaml").write_text(dump_yaml(cfg))
        assert load_config(cls, ["--config", str(tmp_path / "args.yaml")]) == cfg, cls.__name__
    stage = load_config(PipelineConfig, ["--student.optim.epochs", "5"]).stage("student", 0.0, "run-x", None)
    assert stage.optim.epochs == 5 and stage.kd.alpha == 0.0 and stage.run.name == "run-x"


def test_use_gpu_is_auto_or_a_bool(tmp_path):
    cfg = load_config(TrainJobConfig, ["--config", write(tmp_path, "run:\n  use_gpu: false\n")])
    assert cfg.run.use_gpu is False  # a YAML bool
    assert load_config(TrainJobConfig, ["--use_gpu", "True"]).run.use_gpu is True  # command-line text
    assert load_config(TrainJobConfig, ["--run.use_gpu=auto"]).run.use_gpu == "auto"
    assert RunConfig(use_gpu=True).use_gpu is True and RunConfig().use_gpu == "auto"
    with pytest.raises(ValidationError):
        RunConfig(use_gpu="maybe")


def test_yaml_values_are_read_as_the_declared_types(tmp_path):
    cfg_file = write(tmp_path, "data:\n  classes: [a, b]\noptim:\n  lr: 1\n  epochs: 2.0\n  optimizer: sgd\n"
                               "run:\n  name: 7\n")
    cfg = load_config(TrainJobConfig, ["--config", cfg_file])
    assert cfg.data.classes == ["a", "b"] and cfg.optim.optimizer == "sgd"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 2 and isinstance(cfg.optim.epochs, int)
    assert cfg.run.name == "7"


def test_configs_are_frozen_and_replace_checks_again():
    cfg = TrainJobConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 0.1
    assert dataclasses.replace(cfg.optim, lr=0.1).lr == 0.1
    with pytest.raises(ValidationError):
        dataclasses.replace(cfg.optim, lr=-1.0)


def test_help_lists_defaults_choices_ranges_and_required_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:  # --help wins over a missing required key
        load_config(ScoreJobConfig, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert '--model ""  (required)  exported model folder' in text
    assert '--backend "auto"  (auto | torch | onnx-fp32 | onnx-int8)' in text
    assert "--batch_size 32  (>= 1)" in text
    assert "--limits.max_bytes 536870912  (>= 1; = --max_bytes)" in text
    with pytest.raises(SystemExit):
        load_config(TrainJobConfig, ["-h"], {"kd": {"views": 0}})
    text = capsys.readouterr().out
    assert "--kd.views 0  (>= 0)" in text and "--optim.lr 0.001  (> 0)" in text  # job defaults over the class's
    assert '--run.use_gpu "auto"  (auto | true | false)' in text
    assert "--augment.translate 0.06  (>= 0, < 1)" in text and '--data.root ""  (= --data)' in text
    with pytest.raises(SystemExit):
        load_config(PredictJobConfig, ["--help"])
    assert "--images []  (required; or IMAGES... as arguments)" in capsys.readouterr().out


def test_required_keys_are_checked_after_defaults_file_and_flags(tmp_path):
    with pytest.raises(KdrayError, match=r"^--model is required \(an exported model folder, "):
        load_config(ScoreJobConfig, [])
    assert load_config(ScoreJobConfig, [], {"model": "m", "input": "i", "output": "o"}).model == "m"
    cfg_file = write(tmp_path, "model: m\ninput: i\n")
    assert load_config(ScoreJobConfig, ["--config", cfg_file, "--output", "o"]).input == "i"  # the file counts


def test_a_partial_section_keeps_the_other_defaults_of_its_parent(tmp_path):
    """Naming run.num_workers or teacher.optim.epochs must not reset the pipeline's own defaults for that
    section (run.output "" = the embedded S3; the teacher's lr, batch size)."""
    from_file = load_config(PipelineConfig, ["--config", write(tmp_path, "run:\n  num_workers: 2\n"
                                                                          "teacher:\n  optim: {epochs: 1}\n")])
    from_flag = load_config(PipelineConfig, ["--teacher.optim.epochs", "7", "--run.num_workers", "2"])
    defaults = PipelineConfig()
    for cfg, epochs in ((from_file, 1), (from_flag, 7)):
        assert cfg.run.num_workers == 2 and cfg.run.output == defaults.run.output == ""
        assert cfg.teacher.optim.epochs == epochs
        assert (cfg.teacher.optim.lr, cfg.teacher.optim.batch_size) == (defaults.teacher.optim.lr, 16)
        assert cfg.teacher.model.name == "teacher" and cfg.student.model.dropout == 0.2


def test_pipeline_stages_may_run_at_their_own_resolution():
    cfg = load_config(PipelineConfig, ["--image_size", "128", "--teacher.image_size", "64"])
    assert cfg.image_size("teacher") == 64 and cfg.image_size("student") == 128
    assert cfg.stage("teacher", 0.0, "t").data.image_size == 64
    assert cfg.stage("student", 0.7, "s", "cache").data.image_size == 128
    assert cfg.data.image_size == 128  # the stages get copies; the shared data config is unchanged


def test_kd_sweep_settings_are_checked_at_load():
    cfg = load_config(PipelineConfig, ["--kd.temperature", "3", "--kd_sweep", "0.5/4/1,0.9/2/4"])
    settings = cfg.kd_settings()
    assert [(s.alpha, s.temperature, s.views) for s in settings] == [(0.5, 4.0, 1), (0.9, 2.0, 4)]
    stage = cfg.stage("student", settings[1].alpha, "s", "cache", settings[1])
    assert (stage.kd.alpha, stage.kd.temperature, stage.kd.views, stage.kd.cache) == (0.9, 2.0, 4, "cache")
    assert load_config(PipelineConfig, ["--kd.temperature", "3"]).kd_settings()[0].temperature == 3.0  # no sweep
    for bad, message in (("0.5/4", "expected alpha/temperature/views"), ("x/4/1", "expected"),
                         ("0.5/4/1/2", "expected"), ("0/4/1", "0 < alpha <= 1"), ("0.5/4/0", "views >= 1")):
        with pytest.raises(KdrayError, match=rf"^config key kd_sweep\[0\]: .*{message}"):
            load_config(PipelineConfig, ["--kd_sweep", bad])


@pytest.mark.parametrize("name, cls", [("teacher", TrainJobConfig), ("student", TrainJobConfig),
                                       ("cache", CacheJobConfig), ("tiny", PipelineConfig),
                                       ("cxr-cpu", PipelineConfig), ("paper", PipelineConfig),
                                       ("accuracy-quick", PipelineConfig), ("accuracy-full", PipelineConfig)])
def test_every_preset_loads(name, cls):
    required = {"teacher": "t"} if cls is CacheJobConfig else None
    cfg = load_config(cls, ["--config", str(CONFIGS / f"{name}.yaml")], required)
    if name.startswith("accuracy"):
        assert cfg.image_size("teacher") == 64 and cfg.kd.alpha > 0 and cfg.calibrate.target_sensitivity == 0.95
        assert cfg.student.optim.ema_decay > 0 and not cfg.demo.serve


# ----------------------------------------------------------------------------- the jobs that used argparse


def test_predict_and_explain_take_the_images_as_arguments():
    cfg = load_config(PredictJobConfig, ["a.png", "s3://b/c.dcm", "--model", "m"])
    assert (cfg.images, cfg.model, cfg.backend, cfg.threads) == (["a.png", "s3://b/c.dcm"], "m", "auto", None)
    cfg = load_config(PredictJobConfig, ["--model", "m", "--backend", "onnx-fp32", "--threads", "1", "a.png"])
    assert (cfg.images, cfg.backend, cfg.threads) == (["a.png"], "onnx-fp32", 1)
    with pytest.raises(KdrayError, match=r"^images is required \(image files\)$"):
        load_config(PredictJobConfig, ["--model", "m"])
    with pytest.raises(KdrayError, match=r"^--model is required"):
        load_config(PredictJobConfig, ["a.png"])
    with pytest.raises(KdrayError, match=r"^config key threads: must be greater than or equal to 1"):
        load_config(PredictJobConfig, ["a.png", "--model", "m", "--threads", "0"])
    cfg = load_config(ExplainJobConfig, ["a.png", "b.png", "--model", "m", "--output", "o"])
    assert (cfg.images, cfg.output, cfg.backend) == (["a.png", "b.png"], "o", "auto")
    with pytest.raises(KdrayError, match=r"^--output is required \(a folder for the overlays\)$"):
        load_config(ExplainJobConfig, ["a.png", "--model", "m"])


def test_make_data_keeps_its_command_line():
    assert load_config(MakeDataJobConfig, ["out"]) == MakeDataJobConfig("out", 60, 20, 128, 0)
    cfg = load_config(MakeDataJobConfig, ["s3://b/d", "--train-per-class", "5", "--val-per-class", "2",
                                          "--size", "64", "--seed", "3"])
    assert cfg == MakeDataJobConfig("s3://b/d", 5, 2, 64, 3)
    with pytest.raises(KdrayError, match=r"^output is required"):
        load_config(MakeDataJobConfig, [])


def test_export_config_lives_with_the_others():
    from kdray import export

    assert export.ExportJobConfig is ExportJobConfig
    cfg = load_config(ExportJobConfig, ["--model", "m", "--data", "d", "--output", "o", "--int8", "false"])
    assert (cfg.int8, cfg.calibration, cfg.target_sensitivity) == (False, 128, 0.95)
    with pytest.raises(KdrayError, match=r"^config key target_sensitivity: must be greater than 0"):
        load_config(ExportJobConfig, ["--model", "m", "--data", "d", "--output", "o", "--target_sensitivity", "0"])
    assert load_config(EvalJobConfig, ["--model", "m", "--backend", "onnx-int8"]).backend == "onnx-int8"
