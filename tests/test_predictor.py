"""kdray.predictor: the ONNX path loads without torch (kdray predict, scoring and serving start fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_the_onnx_path_imports_neither_torch_nor_ray_nor_scikit_learn():
    code = ("import sys; import kdray.predictor, kdray.inputs, kdray.images, jobs.predict; "
            "print(sorted(m for m in ('torch', 'ray', 'sklearn', 'scipy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
