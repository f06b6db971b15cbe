"""kdray: distil a ResNet50V2+VGG19 teacher into a MobileNetV2 student for chest X-rays, on Ray."""

import os as _os

# A local Ray started by kdray binds to 127.0.0.1 only. Ray reads this when it is imported, so it is
# set here, before any kdray module imports ray: set later, Ray binds the machine's address.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"


class KdrayError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""
