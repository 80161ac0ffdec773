"""docker-compose.yml stays valid (checked where a compose client is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .conftest import REPO_ROOT


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_validates():
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose client installed")
    env = dict(os.environ, POSTGRES_PASSWORD="example")
    result = subprocess.run(command + ["-f", "docker-compose.yml", "config", "--quiet"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
