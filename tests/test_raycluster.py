"""What kdray passes to Ray workers."""

import pytest

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


def _kept(messages: list[str]) -> list[bool]:
    """Which of these warnings the placement-group cleaner's logger would emit, in this process."""
    import logging

    from kdray.raycluster import UNAVAILABLE_STATE_API_LOGGER

    logger = logging.getLogger(UNAVAILABLE_STATE_API_LOGGER)
    return [bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 0, m, None, None)))
            for m in messages]


MESSAGES = ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
            "Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group = [pg]."]


def test_drop_state_api_warnings_drops_that_message_only_and_installs_once():
    import logging

    from kdray.raycluster import UNAVAILABLE_STATE_API_LOGGER, drop_state_api_warnings

    logger = logging.getLogger(UNAVAILABLE_STATE_API_LOGGER)
    before = list(logger.filters)
    try:
        drop_state_api_warnings()
        drop_state_api_warnings()
        assert len(logger.filters) == len(before) + 1
        assert _kept(MESSAGES) == [False, True]
    finally:
        logger.filters[:] = before


@pytest.mark.integration
def test_local_ray_workers_run_the_hook(ray_local):
    import sys

    import ray

    this_module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(this_module)  # so that the worker need not import tests/
    try:
        assert ray.get(ray.remote(num_cpus=0.1)(_kept).remote(MESSAGES)) == [False, True]
    finally:
        ray.cloudpickle.unregister_pickle_by_value(this_module)
