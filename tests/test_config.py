import pytest

from kdray import KdrayError
from kdray.config import (
    EvalJobConfig, PipelineConfig, ScoreJobConfig, TrainJobConfig, dump_yaml, load_config, options_help,
)


def test_defaults_file_flags_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  lr: 0.01\n  epochs: 7\nmodel:\n  name: student\n")
    cfg = load_config(TrainJobConfig, ["--config", str(cfg_file), "--optim.epochs", "2"], {"optim": {"lr": 0.5}})
    assert cfg.optim.lr == 0.01  # file beats job defaults
    assert cfg.optim.epochs == 2  # flag beats file
    assert cfg.model.name == "student"
    assert cfg.optim.batch_size == 32  # dataclass default


def test_short_names_aliases_and_types():
    cfg = load_config(TrainJobConfig, ["--lr=3e-4", "--data", "s3://b/x", "--class_balance", "true",
                                       "--classes", "a,b"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.root == "s3://b/x"
    assert cfg.optim.class_balance is True
    assert cfg.data.classes == ["a", "b"]
    assert load_config(TrainJobConfig, ["--model.weights", "none"]).model.weights is None


@pytest.mark.parametrize("argv, message", [
    (["--nope", "1"], "unknown option --nope"),
    (["--epochs", "many"], "cannot read 'many' as int"),
    (["--class_balance", "maybe"], "cannot read 'maybe' as bool"),
    (["--class_balance"], "option --class_balance needs a value"),  # a bare flag no longer means true
    (["positional"], "unexpected argument"),
])
def test_bad_flags_are_clear(argv, message):
    with pytest.raises(KdrayError, match=message):
        load_config(TrainJobConfig, argv)


def test_ambiguous_short_name():
    with pytest.raises(KdrayError, match="ambiguous.*--teacher.optim.epochs"):
        load_config(PipelineConfig, ["--epochs", "3"])


def test_bad_file(tmp_path):
    with pytest.raises(KdrayError, match="not found"):
        load_config(TrainJobConfig, ["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(KdrayError, match=r"unknown config key optim\.lrr; known in optim: optimizer, lr, "):
        load_config(TrainJobConfig, ["--config", str(bad)])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PipelineConfig, ["--data", "/d", "--student.optim.epochs", "5"])
    (tmp_path / "args.yaml").write_text(dump_yaml(cfg))
    again = load_config(PipelineConfig, ["--config", str(tmp_path / "args.yaml")])
    assert again == cfg
    stage = cfg.stage("student", 0.0, "run-x", None)
    assert stage.optim.epochs == 5 and stage.kd.alpha == 0.0 and stage.run.name == "run-x"


def test_pipeline_stages_may_run_at_their_own_resolution():
    cfg = load_config(PipelineConfig, ["--image_size", "128", "--teacher.image_size", "64"])
    assert cfg.image_size("teacher") == 64 and cfg.image_size("student") == 128
    assert cfg.stage("teacher", 0.0, "t").data.image_size == 64
    assert cfg.stage("student", 0.7, "s", "cache").data.image_size == 128
    assert cfg.data.image_size == 128  # the stages get copies; the shared data config is unchanged


def test_accuracy_presets_load():
    from pathlib import Path

    for mode in ("quick", "full"):
        cfg = load_config(PipelineConfig, ["--config", str(Path(__file__).parents[1] / "configs" / f"accuracy-{mode}.yaml")])
        assert cfg.image_size("teacher") == 64 and cfg.kd.alpha > 0 and cfg.calibrate.target_sensitivity == 0.95
        assert cfg.student.optim.ema_decay > 0 and not cfg.demo.serve


def test_kd_sweep_settings_and_bad_entries():
    cfg = load_config(PipelineConfig, ["--kd.temperature", "3", "--kd_sweep", "0.5/4/1,0.9/2/4"])
    settings = cfg.kd_settings()
    assert [(s.alpha, s.temperature, s.views) for s in settings] == [(0.5, 4.0, 1), (0.9, 2.0, 4)]
    stage = cfg.stage("student", settings[1].alpha, "s", "cache", settings[1])
    assert (stage.kd.alpha, stage.kd.temperature, stage.kd.views, stage.kd.cache) == (0.9, 2.0, 4, "cache")
    assert load_config(PipelineConfig, ["--kd.temperature", "3"]).kd_settings()[0].temperature == 3.0  # no sweep: kd
    for bad, message in (("0.5/4", "expected alpha/temperature/views"), ("x/4/1", "expected"),
                         ("0.5/4/1/2", "expected"), ("0/4/1", "0 < alpha <= 1"), ("0.5/4/0", "views >= 1")):
        with pytest.raises(KdrayError, match=message):
            load_config(PipelineConfig, ["--kd_sweep", bad]).kd_settings()


def test_enums_are_plain_strings_and_use_gpu_reads_yaml_bools(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("run:\n  use_gpu: false\noptim:\n  optimizer: SGD\nmodel:\n  name: tiny_student\n")
    cfg = load_config(TrainJobConfig, ["--config", str(cfg_file)])
    assert (cfg.run.use_gpu, cfg.optim.optimizer, cfg.model.name) == ("false", "sgd", "tiny_student")
    assert type(cfg.run.use_gpu) is str
    assert load_config(TrainJobConfig, ["--use_gpu", "True"]).run.use_gpu == "true"
    assert load_config(TrainJobConfig, ["--run.use_gpu=auto"]).run.use_gpu == "auto"  # --key=value still works
    from kdray.config import RunConfig

    assert RunConfig(use_gpu=True).use_gpu == "true" and RunConfig(use_gpu=False).use_gpu == "false"  # from code
    assert load_config(EvalJobConfig, ["--model", "m", "--backend", "onnx-int8"]).backend == "onnx-int8"
    (tmp_path / "args.yaml").write_text(dump_yaml(cfg))  # args.yaml round-trips, "false" stays a string
    assert load_config(TrainJobConfig, ["--config", str(tmp_path / "args.yaml")]) == cfg


def test_yaml_scalars_are_read_as_the_declared_types(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  classes: [a, b]\n  root:\noptim:\n  lr: 1\n  epochs: 2.0\nrun:\n  name: 7\n")
    cfg = load_config(TrainJobConfig, ["--config", str(cfg_file)])
    assert cfg.data.classes == ["a", "b"] and cfg.data.root == ""
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 2 and isinstance(cfg.optim.epochs, int)
    assert cfg.run.name == "7"


def test_help_lists_choices_ranges_and_required_keys(capsys):
    text = options_help(ScoreJobConfig)
    assert '--model ""  (required)' in text
    assert '--backend "auto"  (auto | torch | onnx-fp32 | onnx-int8)' in text
    assert "--batch_size 32  (>= 1)" in text
    with pytest.raises(SystemExit) as exit_info:  # --help wins over a missing required key
        load_config(ScoreJobConfig, ["--help"])
    assert exit_info.value.code == 0
    assert "--run.use_gpu \"auto\"  (auto | true | false)" in options_help(PipelineConfig)
    assert "--model" in capsys.readouterr().out


def test_required_is_generic_and_checked_after_resolution(tmp_path):
    from dataclasses import dataclass, field

    from kdray.config import DataConfig

    @dataclass
    class Job:
        data: DataConfig = field(default_factory=DataConfig)
        model: str = ""
        REQUIRED = ("model", "data.root")  # a tuple of keys also works; no phrase then

    with pytest.raises(KdrayError, match=r"^--model is required$"):
        load_config(Job, [])
    with pytest.raises(KdrayError, match=r"^--data.root is required$"):
        load_config(Job, ["--model", "m"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: m\n")
    assert load_config(Job, ["--config", str(cfg_file), "--data.root", "/d"]).model == "m"  # the file counts
    assert load_config(ScoreJobConfig, [], {"model": "m", "input": "i", "output": "o"}).model == "m"


def test_a_partial_section_keeps_the_other_defaults_of_its_parent(tmp_path):
    """defaults < file < flags per key: naming run.num_workers or teacher.optim.epochs must not reset the
    pipeline's own defaults for that section (run.output "" = the embedded S3; the teacher's lr, batch size)."""
    from kdray.config import PipelineConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_text("run:\n  num_workers: 2\nteacher:\n  optim: {epochs: 1}\n")
    from_file = load_config(PipelineConfig, ["--config", str(path)])
    from_flag = load_config(PipelineConfig, ["--teacher.optim.epochs", "7", "--run.num_workers", "2"])
    defaults = PipelineConfig()
    for cfg, epochs in ((from_file, 1), (from_flag, 7)):
        assert cfg.run.num_workers == 2 and cfg.run.output == defaults.run.output == ""
        assert cfg.teacher.optim.epochs == epochs
        assert (cfg.teacher.optim.lr, cfg.teacher.optim.batch_size) == (defaults.teacher.optim.lr, 16)
        assert cfg.teacher.model.name == "teacher" and cfg.student.model.dropout == 0.2
