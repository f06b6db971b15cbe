"""kdray: distil a ResNet50V2+VGG19 teacher into a MobileNetV2 student for chest X-rays, on Ray.

Importing kdray changes nothing outside it: no environment variable, no Ray setting. What a local Ray needs
(loopback only) is set by ``kdray.raycluster.init_ray`` right before Ray starts."""

__version__ = "0.1.0"


class KdrayError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """An error's message as one line for a log or an error of ours: its first line, at most ``limit``
    characters, or the error's type name when it has no message."""
    text = str(error)
    line = text.splitlines()[0] if text.strip() else ""
    return line[:limit] if line else (type(error).__name__ if isinstance(error, BaseException) else "")
