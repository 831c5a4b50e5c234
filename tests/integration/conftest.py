"""Fixtures of the cloud integration tests: a local EC2 (moto) and an environment without the
host's cloud settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudroutes.lab.aws import MotoServer


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One moto server per module (all servers in a process share state); tests reset it."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS_* variable or ~/.aws file from the host may reach botocore in these tests."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
