"""kdray: distil a ResNet50V2+VGG19 teacher into a MobileNetV2 student for chest X-rays, on Ray."""

import os as _os
import sys as _sys

#: A local Ray binds to 127.0.0.1 only while this is 0; set later, Ray binds the machine's address.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_os.environ.setdefault(LOOPBACK_ENV, "0")


def keep_ray_on_loopback() -> None:
    """Give Ray the loopback setting even when ``ray`` was imported before kdray set it.

    Ray 2.60 reads :data:`LOOPBACK_ENV` once, as it is imported, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``. After ``from ray import serve`` in a script that imports
    kdray later, that copy still says True, and ``ray.init`` turns ``127.0.0.1`` into the machine's address
    (``services.resolve_ip_for_localhost`` → ``get_node_ip_address``). The processes Ray starts import Ray
    afresh, with the variable in the environment they inherit: only this process's copy can be stale, and it
    is set to what Ray would have read had kdray come first. Ray is not imported here."""
    constants = _sys.modules.get("ray._private.ray_constants")
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(LOOPBACK_ENV, not constants.IS_WINDOWS_OR_OSX)


keep_ray_on_loopback()

__version__ = "0.1.0"


class KdrayError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""
