"""A newcomer's first hour (issue 15): what certbatch says when something is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import run


def test_a_missing_config_says_where_certbatch_looked(tmp_path: Path) -> None:
    if os.path.exists("/etc/certbatch/certbatch.yaml"):
        pytest.skip("this machine has /etc/certbatch/certbatch.yaml: it would be found")
    default = run(["status"], None, cwd=tmp_path)
    assert default.returncode == 2
    assert default.stderr == (
        "certbatch: error: /etc/certbatch/certbatch.yaml: file not found; looked for "
        f"{tmp_path}/certbatch.yaml and /etc/certbatch/certbatch.yaml (give another with "
        "--config or $CERTBATCH_CONFIG)\n")
    env = run(["status"], None, env={"CERTBATCH_CONFIG": str(tmp_path / "env.yaml")})
    assert (env.returncode, env.stderr) == (
        2, f"certbatch: error: {tmp_path}/env.yaml: file not found; named by "
           f"$CERTBATCH_CONFIG\n")
    explicit = run(["status"], tmp_path / "x.yaml")
    assert (explicit.returncode, explicit.stderr) == (
        2, f"certbatch: error: {tmp_path}/x.yaml: file not found; named by --config\n")
