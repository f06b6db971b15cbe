"""Fault injection for tests, kept out of the product: slow local writes in every process of a job.

A test that kills a job in the middle of a write needs the job's driver and the Ray workers it starts to be
slow at the same point: between writing a file's temporary copy and renaming it
(``kdray.storage._move_into_place``). Python imports ``sitecustomize`` as it starts, from the first folder on
``sys.path`` that has one, and Ray's processes inherit the environment of the process that starts them, so a
``sitecustomize.py`` in a folder put first on ``PYTHONPATH`` reaches all of them. It patches the function as
``kdray.storage`` is imported, so that processes that never write import nothing more than they would.
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''"""Written by tests/fault_hooks.py: kdray.storage._move_into_place waits {delay_s} s before each rename."""
import importlib.abc
import sys
import time

DELAY_S = {delay_s!r}


class _Delegate(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        move = module._move_into_place

        def slow_move(*args, **kwargs):
            time.sleep(DELAY_S)
            return move(*args, **kwargs)

        module._move_into_place = slow_move


class _SlowWrites(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "kdray.storage":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _Delegate(spec.loader)
                    return spec
        return None


sys.meta_path.insert(0, _SlowWrites())
'''


def slow_writes_env(env: dict[str, str], folder: Path, delay_s: float) -> dict[str, str]:
    """``env`` with a ``sitecustomize.py`` (written into ``folder``) first on PYTHONPATH: every Python process
    started with it, and every Ray process those start, waits ``delay_s`` before each local write's rename."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(delay_s=float(delay_s)))
    rest = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": str(folder) + (os.pathsep + rest if rest else "")}
