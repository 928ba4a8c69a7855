"""Shared test setup: the object builders are importable, and CI never skips the kernel."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("CI") and os.geteuid() != 0:
    pytest.exit("CI runs the kernel and end-to-end tests, which need root", returncode=1)
