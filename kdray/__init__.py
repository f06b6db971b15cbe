"""kdray: distil a ResNet50V2+VGG19 teacher into a MobileNetV2 student for chest X-rays, on Ray.

Importing kdray changes nothing outside it: no environment variable, no Ray setting. What a local Ray needs
(loopback only) is set by ``kdray.raycluster.init_ray`` right before Ray starts."""

__version__ = "0.1.0"


class KdrayError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""
