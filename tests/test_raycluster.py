"""What kdray passes to Ray workers."""

from kdray.raycluster import worker_env_vars


def test_worker_env_turns_train_print_patch_off_by_default(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    env = worker_env_vars()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # else each worker progress line reaches the driver twice
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"


def test_worker_env_keeps_the_callers_choice(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    env = worker_env_vars()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    assert "AWS_ENDPOINT_URL" not in env
