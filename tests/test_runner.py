"""kdray.runner: the one line a failed job shows."""

from kdray import KdrayError
from kdray.runner import root_cause


class _Wrapped(Exception):
    """Stands for Ray's wrapping of a worker's error: the remote traceback carried as text."""


def test_root_cause_names_the_kdray_error_inside_a_chain():
    try:
        try:
            raise KdrayError("s3_unavailable: the store did not answer")
        except KdrayError as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "s3_unavailable: the store did not answer"


def test_root_cause_takes_the_error_line_of_a_remote_traceback():
    remote = _Wrapped("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                      "ValueError: the batch had no images")
    outer = RuntimeError("worker group failed")
    outer.__cause__ = remote
    assert root_cause(outer) == "_Wrapped: ValueError: the batch had no images"


def test_root_cause_of_a_plain_error_is_its_first_line_and_bounded():
    assert root_cause(OSError("disk full\nmore detail")) == "OSError: disk full"
    assert len(root_cause(ValueError("x" * 5000))) < 320
    assert root_cause(ValueError()) == "ValueError"
