"""serve/options.py: the serving knobs are typed, frozen and checked, and give Serve the dicts it takes."""

import dataclasses

import pytest
from pydantic import ValidationError

pytestmark = pytest.mark.unit


def test_serving_options_are_typed_and_give_serve_its_dict():
    from serve import options

    deployment = options.DEPLOYMENT.serve_options()
    assert deployment == {
        "max_ongoing_requests": 256, "max_queued_requests": 64,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                               "upscale_delay_s": 5, "downscale_delay_s": 30},
        "ray_actor_options": {"num_cpus": 2.0, "runtime_env": {"env_vars": {options.CALLBACK_ENV: options.CALLBACK}}}}
    deployment["ray_actor_options"]["runtime_env"]["env_vars"]["X"] = "1"  # the caller's copy
    assert "X" not in options.DEPLOYMENT.serve_options()["ray_actor_options"]["runtime_env"]["env_vars"]
    assert (options.BATCHING.enabled, options.BATCHING.max_batch_size, options.BATCHING.batch_wait_timeout_s) == \
        ("auto", 16, 0.002)
    assert dataclasses.asdict(options.ADMISSION) == {"limit": 64, "hold_s": 0.025, "prefixes": ("/predict", "/v2/models")}
    assert dataclasses.asdict(options.EXPLAIN) == {"max_in_flight": 2, "threads": 1, "nice": 19}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ADMISSION.limit = 1
    assert options.BatchingOptions(enabled="off").enabled is False
    for bad in ({"enabled": "maybe"}, {"max_batch_size": 0}):
        with pytest.raises(ValidationError):
            options.BatchingOptions(**bad)
    with pytest.raises(ValidationError):
        options.ExplainOptions(max_in_flight=0)


def test_admission_settings_come_from_the_options_and_the_environment(monkeypatch):
    from serve.admission import LIMIT_ENV, Admission, admission_settings

    settings = admission_settings("app")
    assert settings == {"limit": 64, "hold_s": 0.025, "prefixes": ("/predict", "/v2/models"), "retry_after_s": 1,
                        "layer": "app"}
    monkeypatch.setenv(LIMIT_ENV, "5")
    assert Admission(None, **settings).limit == 5
