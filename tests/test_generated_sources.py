"""CPU: csrc/instantiations/*.cu and csrc/sources.txt are what csrc/generate_instantiations.py's
kernel list says (the list is the one place to add a kernel configuration)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "csrc" / "generate_instantiations.py"


def test_instantiation_files_match_the_kernel_list():
    if not SCRIPT.exists():
        pytest.skip("csrc/ is not beside tests/ (an installed-package test run)")
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
