"""kdray: distil a ResNet50V2+VGG19 teacher into a MobileNetV2 student for chest X-rays, on Ray."""

__version__ = "0.1.0"


class KdrayError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""
