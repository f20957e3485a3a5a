"""A newcomer's first hour (issue 15): what certbatch says when something is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import NoCA, run, write_config


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


def test_a_dry_run_writes_nothing_not_even_the_log_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, NoCA(tmp_path), {"web": {"domains": ["web.example.com"]}},
                       logging={"file": "./certbatch.log"})
    log = tmp_path / "certbatch.log"
    for args in (["renew", "--dry-run"], ["run-hook", "--dry-run"]):
        result = run(args, cfg)
        assert result.returncode == 0, result.stderr
        assert not log.exists(), args
    # status still logs that it ran (the README says so), and --log-file is always written
    assert run(["status"], cfg).returncode == 0 and "status: started" in log.read_text()
    log.unlink()
    other = tmp_path / "asked.log"
    assert run(["--log-file", str(other), "renew", "--dry-run"], cfg).returncode == 0
    assert other.exists() and not log.exists()
