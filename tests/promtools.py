"""Debian's Prometheus tools for the tests of deploy/: found on the PATH, else a skip (a failure on CI, which
installs them: .ci/run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest

DEPLOY: Final[Path] = Path(__file__).resolve().parents[1] / "deploy"


def tool(name: str) -> str:
    """The path of ``name`` (promtool, prometheus); skips the test without it, and fails it on CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install -y prometheus (Debian's package ships it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; the result whatever its exit code (the tests look at it)."""
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
