"""The build explains itself when torch is missing, as in pip's default isolated build environment."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_build_without_torch_fails_early_with_instructions():
    hide_torch = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
    code = hide_torch + "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr
    assert "pip install torch==2.13.0" in result.stderr
